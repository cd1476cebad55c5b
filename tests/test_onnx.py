"""ONNX Runtime backends on the tiny model: export and agreement with torch, the exported folder, backend selection
(`auto` and its accuracy limit), the error for missing ONNX files, and an ONNX replica that never imports torch."""
import json
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
from helpers import MIXED_TEXTS, TEST_METRICS, backend_scores, build_tiny_model, export_with_onnx, fixture_texts

from sentiment_nb.onnx_export import FP32_ATOL, OnnxExportError, check_onnx, write_onnx
from sentiment_nb.predict import (
    ModelDirError,
    OnnxPredictor,
    Predictor,
    load_predictor,
    predict,
    select_backend,
)

TEXTS = MIXED_TEXTS
@pytest.fixture(scope="module")
def onnx_dir(tiny_model_dir, tmp_path_factory):
    "The `onnx` stage's outputs for the tiny model: one real export, shared by the module."
    out = tmp_path_factory.mktemp("onnx")
    write_onnx(tiny_model_dir, out, fixture_texts(), batch_size=8)
    return out


@pytest.fixture(scope="module")
def exported(tiny_model_dir, onnx_dir, tmp_path_factory):
    "A project folder after `export`: model/ with weights, tokenizer, onnx/ and metrics with per-backend scores."
    return export_with_onnx(tiny_model_dir, onnx_dir, tmp_path_factory.mktemp("project"))


def with_metrics(model_dir, tmp_path, scores):
    "A copy of the exported `model_dir` whose metrics.json records `scores` per backend."
    d = shutil.copytree(model_dir, tmp_path / "model")
    (d / "metrics.json").write_text(json.dumps({**TEST_METRICS, "backends": scores}))
    return d


# --- export and agreement -------------------------------------------------------------------------------------------

def test_export_writes_both_graphs_and_the_check(onnx_dir):
    assert {f.name for f in onnx_dir.iterdir()} == {"model.onnx", "model.int8.onnx", "check.json"}
    check = json.loads((onnx_dir / "check.json").read_text())
    assert check["texts"] == len(fixture_texts())
    assert check["fp32"]["max_abs_diff"] <= FP32_ATOL == check["fp32"]["atol"]
    assert check["fp32"]["label_agreement"] == 1.0
    assert 0 <= check["int8"]["label_agreement"] <= 1 and check["int8"]["max_abs_diff"] >= 0
    assert 0 < check["int8"]["size_mb"] < check["fp32"]["size_mb"]


def test_a_rerun_writes_the_same_bytes_so_export_does_not_rerun(tiny_model_dir, onnx_dir, tmp_path):
    again = write_onnx(tiny_model_dir, tmp_path, fixture_texts(), batch_size=8)
    for name in ("model.onnx", "model.int8.onnx", "check.json"):  # all three are dependencies of `export`
        assert (tmp_path / name).read_bytes() == (onnx_dir / name).read_bytes(), name
    assert "seconds" in again and "seconds" not in json.loads((tmp_path / "check.json").read_text())
    graph = onnx.load(tmp_path / "model.onnx").graph  # a stack trace names the (notebook's temporary) source file
    assert graph.node and not [p for n in graph.node for p in n.metadata_props if "stack_trace" in p.key]


def test_fp32_graph_matches_torch_for_any_batch_and_length(tiny_model_dir, onnx_dir):
    ref = Predictor(tiny_model_dir, device="cpu").predict_logits(TEXTS)
    onnx = OnnxPredictor(tiny_model_dir, "onnx", onnx_dir=onnx_dir)
    for bs in (1, 3, len(TEXTS)):  # dynamic batch axis; each batch has its own padded length
        np.testing.assert_allclose(onnx.predict_logits(TEXTS, batch_size=bs), ref, atol=FP32_ATOL)
    long = ["word " * 500]  # truncated to the model's 128 positions, past the export example's length
    np.testing.assert_allclose(onnx.predict_logits(long), Predictor(tiny_model_dir, device="cpu").predict_logits(long),
                               atol=FP32_ATOL)
    assert onnx.labels == ["negative", "positive"]


def test_int8_graph_answers_in_the_same_shape(tiny_model_dir, onnx_dir):
    res = OnnxPredictor(tiny_model_dir, "onnx-int8", onnx_dir=onnx_dir).predict(TEXTS)
    assert len(res) == len(TEXTS) and all(set(r) == {"label", "score", "probabilities"} for r in res)
    assert all(abs(sum(r["probabilities"].values()) - 1) < 1e-5 for r in res)


def test_check_fails_when_the_graph_is_of_another_model(tiny_model_dir, onnx_dir, tmp_path):
    other = build_tiny_model(tmp_path / "other", seed=1)  # the same tokenizer, other weights
    with pytest.raises(OnnxExportError, match="differ from PyTorch's"):
        check_onnx(other, onnx_dir, TEXTS)
    check_onnx(tiny_model_dir, onnx_dir, TEXTS)  # at the same tolerance, its own model passes


def test_export_copies_the_graphs_into_the_model_folder(exported):
    assert {f.name for f in (exported / "onnx").iterdir()} == {"model.onnx", "model.int8.onnx", "check.json"}
    assert "backends" in json.loads((exported / "metrics.json").read_text())
    card = (exported / "README.md").read_text()
    assert "| `onnx-int8` | 0.8450 | 0.8450 | 0.9800 |" in card


# --- choosing a backend ---------------------------------------------------------------------------------------------

def test_auto_picks_the_fastest_backend_within_the_limit(exported, tmp_path):
    assert select_backend(exported, "auto")[0] == "onnx-int8"  # 0.5 points below torch: at the limit
    assert select_backend(with_metrics(exported, tmp_path, backend_scores(int8=0.90)), "auto")[0] == "onnx-int8"


def test_auto_refuses_a_backend_that_loses_too_much_accuracy(exported, tmp_path):
    d = with_metrics(exported, tmp_path, backend_scores(int8=0.84))  # 1 point below torch
    backend, why = select_backend(d, "auto", max_accuracy_drop=0.5)
    assert backend == "onnx" and "fastest" in why
    assert select_backend(d, "auto", max_accuracy_drop=1.0)[0] == "onnx-int8"
    (d / "metrics.json").write_text(json.dumps({**TEST_METRICS, "backends": backend_scores(onnx=0.80, int8=0.80)}))
    backend, why = select_backend(d, "auto")
    assert backend == "torch" and "over the limit of 0.5" in why
    assert select_backend(d, "onnx-int8")[0] == "onnx-int8"  # an explicit choice is taken as it is


def test_auto_is_torch_without_recorded_scores_or_on_a_gpu(exported, tiny_model_dir):
    assert select_backend(tiny_model_dir, "auto") == ("torch", f"{tiny_model_dir / 'metrics.json'} records no "
                                                               "per-backend scores")
    assert select_backend(exported, "auto", device="cuda")[0] == "torch"


def test_auto_device_means_torch_where_torch_finds_a_gpu(exported, monkeypatch):
    import torch

    from sentiment_nb import predict as mod

    here = "torch" if torch.cuda.is_available() or torch.backends.mps.is_available() else "onnx-int8"
    assert select_backend(exported, "auto", device="auto")[0] == here
    monkeypatch.setattr(mod, "pick_device", lambda prefer="auto": "cuda")
    assert select_backend(exported, "auto", device="auto") == ("torch", "the device is cuda; the ONNX backends run "
                                                                        "on the CPU")


def test_an_onnx_backend_refuses_a_gpu_device(exported, capsys):
    from sentiment_nb.cli import main

    with pytest.raises(ValueError, match="runs on the CPU, not on 'cuda': pass --device cpu"):
        select_backend(exported, "onnx-int8", device="cuda")
    assert main(["predict", "fine", "--model", str(exported), "--backend", "onnx", "--device", "cuda"]) == 2
    assert "Backend 'onnx' runs on the CPU, not on 'cuda'" in capsys.readouterr().err


@pytest.mark.parametrize("file, content, words", [
    ("onnx/model.onnx", b"version https://git-lfs.github.com/spec/v1\noid sha256:0\n", "Could not load"),
    ("onnx/model.onnx", b"", "Could not load"),
    ("tokenizer.json", b'{"version": "1.0", "truncation"', "Could not read"),
])
def test_a_broken_model_file_is_named(exported, tmp_path, file, content, words):
    d = shutil.copytree(exported, tmp_path / "model").resolve()
    (d / file).write_bytes(content)
    with pytest.raises(ModelDirError) as e:
        OnnxPredictor(d, "onnx")
    assert f"{words} {d / file}" in str(e.value), e.value


@pytest.mark.parametrize("content, words", [
    ('{"accuracy": 0.85, "backends": ', "metrics.json is not valid JSON"),
    ("[0.85]", "metrics.json holds a JSON list, not an object"),
    ('{"backends": {"torch": 0.85}}', 'metrics.json: `backends` should map each backend to its test scores'),
    ('{"backends": [0.85]}', "`backends` should map each backend"),
])
def test_a_broken_metrics_file_is_named(exported, tmp_path, capsys, smoke_params_file, content, words):
    from sentiment_nb.cli import main
    from sentiment_nb.serve.app import build_app

    d = shutil.copytree(exported, tmp_path / "model")
    (d / "metrics.json").write_text(content)
    with pytest.raises(ModelDirError, match=words.replace("[", r"\[")):
        select_backend(d, "auto")
    assert main(["predict", "fine", "--model", str(d), "--device", "cpu"]) == 2  # on a GPU, auto is torch
    err = capsys.readouterr().err
    assert f"{d / 'metrics.json'}" in err and words in err and "dvc repro" in err
    with pytest.raises(ModelDirError, match="metrics.json"):  # before Ray starts
        build_app({"params": str(smoke_params_file), "model": str(d), "backend": "auto"})


def test_auto_is_torch_where_onnxruntime_is_not_installed(exported, monkeypatch):
    from sentiment_nb import predict as mod

    monkeypatch.setattr(mod, "_has_onnxruntime", lambda: False)
    backend, why = select_backend(exported, "auto")
    assert backend == "torch" and "onnxruntime is not installed" in why


def test_load_predictor_follows_the_choice(exported):
    p = load_predictor(exported, "auto", batch_size=4)
    assert isinstance(p, OnnxPredictor) and p.backend == "onnx-int8"
    assert load_predictor(exported, "torch", device="cpu").backend == "torch"
    with pytest.raises(ValueError, match="choose one of torch, onnx, onnx-int8, auto"):
        load_predictor(exported, "tensorrt")


@pytest.mark.parametrize("backend", ["onnx", "onnx-int8"])
def test_missing_onnx_files_give_a_clear_error(tiny_model_dir, backend):
    with pytest.raises(ModelDirError) as e:
        predict(["fine"], model_dir=tiny_model_dir, backend=backend)
    msg = str(e.value)
    assert str(tiny_model_dir / "onnx") in msg and "has no ONNX export" in msg
    assert "dvc repro" in msg and "`torch`" in msg


def test_cli_predict_with_a_missing_onnx_backend_exits_2(capsys, tiny_model_dir):
    from sentiment_nb.cli import main

    assert main(["predict", "fine", "--model", str(tiny_model_dir), "--backend", "onnx"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sentiment-nb: error: Backend 'onnx' needs") and err.count("\n") == 1


def test_cli_predict_with_the_onnx_backend(capsys, exported):
    from sentiment_nb.cli import main

    assert main(["predict", *TEXTS[:2], "--model", str(exported), "--backend", "onnx"]) == 0
    got = json.loads(capsys.readouterr().out)
    want = Predictor(exported, device="cpu").predict(TEXTS[:2])
    assert [g["label"] for g in got] == [w["label"] for w in want]
    assert [g["score"] for g in got] == pytest.approx([w["score"] for w in want], abs=1e-5)


def test_onnx_replica_never_imports_torch(exported):
    code = ("import json, sys\n"
            "from sentiment_nb.predict import predict\n"
            f"res = predict({TEXTS[:3]!r}, model_dir={str(exported)!r}, backend='onnx')\n"
            "print(json.dumps({'torch': 'torch' in sys.modules, 'transformers': 'transformers' in sys.modules,"
            " 'res': res}))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["torch"] is False and out["transformers"] is False
    want = Predictor(exported, device="cpu").predict(TEXTS[:3])
    assert [r["score"] for r in out["res"]] == pytest.approx([w["score"] for w in want], abs=1e-5)


# --- serving settings -----------------------------------------------------------------------------------------------

def test_serve_binds_the_resolved_backend_and_threads(smoke_params_file, exported):
    from sentiment_nb.serve.app import (
        build_app,
        forward_batch_size,
        ingress_grouping,
        replica_threads,
        resolve_settings,
    )

    def replica(app) -> tuple:  # what the model replica loads: .bind(model_dir=, backend=, settings=)
        kw = app._bound_deployment.init_kwargs["model"]._bound_deployment.init_kwargs
        return kw["backend"], replica_threads(kw["settings"]), forward_batch_size(kw["settings"])

    app = build_app({"params": str(smoke_params_file), "model": str(exported), "backend": "auto",
                     "num_cpus": 0.5})
    assert replica(app) == ("onnx-int8", 1, 8)
    args = {"params": str(smoke_params_file), "model": str(exported), "backend": "onnx", "intra_op_threads": 2,
            "num_replicas": 2, "ingress_replicas": 1}
    app = build_app(dict(args))
    assert replica(app) == ("onnx", 2, 8)
    sp = resolve_settings(dict(args)).serve  # one ingress feeds two model replicas: half a batch per call
    size = sp.max_batch_size // 2
    bound = app._bound_deployment.init_kwargs["settings"]  # the ingress's: .bind(model=, settings=)
    assert (*ingress_grouping(bound), bound.batch_wait_timeout_s) == (size, 2 * sp.max_ongoing_requests // size,
                                                                      sp.batch_wait_timeout_s)
    assert ingress_grouping(sp) == (size, 2 * sp.max_ongoing_requests // size)


def test_serve_refuses_a_missing_onnx_backend_before_ray_starts(smoke_params_file, tiny_model_dir):
    from sentiment_nb.serve.app import build_app

    with pytest.raises(ModelDirError, match="has no ONNX export"):
        build_app({"params": str(smoke_params_file), "model": str(tiny_model_dir), "backend": "onnx-int8"})


def test_serve_refuses_an_onnx_backend_on_a_gpu_before_ray_starts(smoke_params_file, exported, capsys):
    from sentiment_nb.cli import main
    from sentiment_nb.config import ParamsError
    from sentiment_nb.serve.app import build_app

    with pytest.raises(ParamsError, match="serve.backend 'onnx' runs on the CPU, but serve.num_gpus is 1: set "
                                          "serve.num_gpus: 0, or serve.backend: torch"):
        build_app({"params": str(smoke_params_file), "model": str(exported), "backend": "onnx", "num_gpus": 1})
    import yaml
    from helpers import free_port

    params = yaml.safe_load(smoke_params_file.read_text())
    params["serve"]["num_gpus"] = 1
    p = smoke_params_file.parent / "gpu_onnx.yaml"
    p.write_text(yaml.safe_dump(params))
    assert main(["serve", "--params", str(p), "--model", str(exported), "--backend", "onnx-int8",
                 "--port", str(free_port())]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sentiment-nb: error: serve.backend 'onnx-int8' runs on the CPU") and err.count("\n") == 1


def test_cli_serve_backend_option(smoke_params_file):
    from sentiment_nb.cli import build_parser, serve_settings

    s = serve_settings(build_parser().parse_args(["serve", "--params", str(smoke_params_file), "--backend", "onnx"]))
    assert s.serve.backend == "onnx"
    assert serve_settings(build_parser().parse_args(["serve", "--params", str(smoke_params_file)])).serve.backend == "auto"
