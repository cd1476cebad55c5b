"""End to end: `dvc repro` in a copy of the repo, on the smoke params (tiny model, fixture data)."""
import json
from pathlib import Path

import nbformat
import pytest
import yaml
from conftest import dvc
from helpers import git, write_params

pytestmark = pytest.mark.slow

STAGES = ["prepare", "train", "onnx", "evaluate", "export"]


@pytest.fixture(scope="module")
def project(smoke_project):
    "The smoke project after its one `dvc repro` (shared with test_dvc_remote)."
    return smoke_project


def ran(output: str) -> list[str]:
    return [s for s in STAGES if f"Running stage '{s}'" in output]


def executed_report(path: Path) -> nbformat.NotebookNode:
    nb = nbformat.read(path, as_version=4)
    assert nb.metadata.papermill.exception is False or nb.metadata.papermill.exception is None
    code = [c for c in nb.cells if c.cell_type == "code" and c.source.strip()]
    assert all(c.execution_count for c in code), f"{path.name} has unexecuted cells"
    assert any(c.outputs for c in code), f"{path.name} has no outputs"
    # ipywidgets is installed with the package: progress bars are widgets in JupyterLab, not tqdm's warning
    assert "IProgress not found" not in json.dumps([c.get("outputs", []) for c in code]), path.name
    injected = [c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert injected and "params_file = \"params.yaml\"" in injected[0].source
    return nb


def test_repro_runs_every_stage(project):
    root, first = project
    assert ran(first.stdout) == STAGES
    assert (root / "dvc.lock").is_file()


def test_prepare_outputs(project):
    from datasets import load_from_disk

    root, _ = project
    dsd = load_from_disk(str(root / "data" / "prepared"))
    assert dsd.num_rows == {"train": 32, "validation": 12, "test": 12}
    assert {"text", "label", "input_ids", "attention_mask", "n_tokens"} <= set(dsd["train"].column_names)
    summary = json.loads((root / "reports" / "data" / "summary.json").read_text())
    assert summary["rows"] == {"train": 32, "validation": 12, "test": 12}
    assert summary["positive_fraction"]["train"] == 0.5
    assert summary["tokens"]["max"] >= summary["tokens"]["p50"] > 0
    hist = (root / "reports" / "data" / "token_lengths.csv").read_text().splitlines()
    assert hist[0] == "tokens,train,validation,test" and len(hist) > 1
    executed_report(root / "reports" / "02_data.ipynb")


def test_train_outputs(project):
    root, _ = project
    assert (root / "artifacts" / "train" / "best_model" / "model.safetensors").is_file()
    live = json.loads((root / "dvclive" / "train" / "metrics.json").read_text())
    assert 0 <= live["best_validation"]["accuracy"] <= 1
    assert (root / "dvclive" / "train" / "plots" / "metrics" / "train" / "loss.tsv").is_file()
    executed_report(root / "reports" / "03_train.ipynb")


def test_evaluate_outputs(project):
    root, _ = project
    m = json.loads((root / "eval" / "metrics.json").read_text())
    assert m["n"] == 12
    for key in ("accuracy", "f1", "ece"):
        assert 0 <= m[key] <= 1, key
    for label in ("negative", "positive"):
        assert 0 <= m[label]["precision"] <= 1 and 0 <= m[label]["recall"] <= 1
    confusion = (root / "eval" / "plots" / "confusion.csv").read_text().splitlines()
    assert confusion[0] == "actual,predicted" and len(confusion) == 13
    assert {r.split(",")[0] for r in confusion[1:]} <= {"negative", "positive"}
    assert (root / "eval" / "plots" / "reliability.csv").read_text().startswith("bin_lower,bin_upper,confidence,accuracy")
    assert (root / "eval" / "plots" / "confidence.csv").is_file()
    assert set(m["backends"]) == {"torch", "onnx", "onnx-int8"}
    for scores in m["backends"].values():
        assert {"accuracy", "f1", "agreement"} <= set(scores) and 0 <= scores["agreement"] <= 1
    assert m["backends"]["torch"]["accuracy"] == m["accuracy"] and m["backends"]["onnx"]["agreement"] == 1.0
    executed_report(root / "reports" / "06_evaluate.ipynb")


def test_the_trained_model_is_calibrated_and_every_reader_of_model_applies_it(project):
    "The temperature is folded into the weights: the ONNX graphs and a plain `transformers.pipeline` apply it too."
    import numpy as np
    from transformers import pipeline

    from sentiment_nb.predict import OnnxPredictor, Predictor

    root, _ = project
    calibration = json.loads((root / "model" / "config.json").read_text())["calibration"]
    assert calibration["fitted_on"] == "validation" and calibration["temperature"] > 0
    assert calibration["nll_after"] <= calibration["nll_before"] + 1e-4  # the fit minimises the validation NLL
    m = json.loads((root / "eval" / "metrics.json").read_text())
    assert m["calibration"]["temperature"] == round(calibration["temperature"], 4)
    assert 0 <= m["calibration"]["ece_uncalibrated"] <= 1
    assert "before temperature scaling, T = " in (root / "model" / "README.md").read_text()
    texts = ["a gorgeous , witty , seductive movie .", "the plot is nothing but boilerplate clichés .", "fun"]
    torch_probs = Predictor(root / "model", device="cpu").predict_proba(texts)
    onnx_probs = OnnxPredictor(root / "model", "onnx").predict_proba(texts)
    plain = pipeline("text-classification", model=str(root / "model"), device="cpu", top_k=None)(texts)
    plain_probs = np.array([[d["score"] for d in sorted(o, key=lambda d: d["label"])] for o in plain])
    assert np.abs(onnx_probs - torch_probs).max() < 1e-4 and np.abs(plain_probs - torch_probs).max() < 1e-5


def test_onnx_outputs(project):
    root, _ = project
    assert (root / "artifacts" / "onnx" / "model.onnx").is_file() and (root / "artifacts" / "onnx" / "model.int8.onnx").is_file()
    check = json.loads((root / "artifacts" / "onnx" / "check.json").read_text())
    assert check["fp32"]["max_abs_diff"] <= check["fp32"]["atol"] and check["texts"] == 12
    executed_report(root / "reports" / "05_onnx.ipynb")


def test_exported_model_loads_without_this_project(project):
    from transformers import pipeline

    from sentiment_nb.export import read_card_metadata
    from sentiment_nb.predict import predict

    root, _ = project
    model = root / "model"
    assert (model / "model.safetensors").is_file() and not list(model.glob("*.bin"))
    metrics = json.loads((root / "eval" / "metrics.json").read_text())
    card = (model / "README.md").read_text()
    meta = read_card_metadata(card)
    assert "model-index" not in meta and "datasets" not in meta  # local data: no Hub dataset id to name
    assert f"| accuracy | {metrics['accuracy']:.4f} |" in card and f"| F1 (positive) | {metrics['f1']:.4f} |" in card
    clf = pipeline("text-classification", model=str(model), top_k=None)
    scores = clf(["a witty and moving film"])[0]
    assert {s["label"] for s in scores} == {"negative", "positive"}
    out = predict(["a witty and moving film", "dull"], model_dir=model)
    assert [set(o) for o in out] == [{"label", "score", "probabilities"}] * 2
    assert all(abs(sum(o["probabilities"].values()) - 1) < 1e-5 for o in out)
    assert {f.name for f in (model / "onnx").iterdir()} == {"model.onnx", "model.int8.onnx", "check.json"}
    onnx_out = predict(["a witty and moving film", "dull"], model_dir=model, backend="onnx")
    assert [o["label"] for o in onnx_out] == [o["label"] for o in predict(["a witty and moving film", "dull"],
                                                                           model_dir=model, backend="torch")]
    executed_report(root / "reports" / "07_export.ipynb")


def test_second_repro_is_a_noop(project):
    root, _ = project
    again = dvc(root, "repro")
    assert ran(again.stdout) == []
    assert "Data and pipelines are up to date" in again.stdout
    assert dvc(root, "status").stdout.strip() == "Data and pipelines are up to date."


def test_rerunning_onnx_on_the_same_model_leaves_export_up_to_date(project):
    root, _ = project
    assert ran(dvc(root, "repro", "--force", "--single-item", "onnx").stdout) == ["onnx"]
    assert dvc(root, "status").stdout.strip() == "Data and pipelines are up to date."  # same graphs, same check.json


def test_params_changes_rerun_only_the_stages_that_read_them(project):
    root, _ = project
    params = yaml.safe_load((root / "params.yaml").read_text())
    try:
        params["data"]["seed"] = 7
        write_params(root / "params.yaml", params)
        status = dvc(root, "status", "--json").stdout
        assert list(json.loads(status)) == ["prepare"], status  # downstream waits on prepare's outputs

        params["data"]["seed"] = 42
        params["evaluate"]["calibration_bins"] = 5
        write_params(root / "params.yaml", params)
        assert sorted(json.loads(dvc(root, "status", "--json").stdout)) == ["evaluate"]

        params["evaluate"]["calibration_bins"] = 10
        params["ray"]["storage_path"] = "/mnt/elsewhere"  # where a run happens reruns nothing
        params["ray"]["address"] = "10.0.0.5:6379"
        write_params(root / "params.yaml", params)
        assert dvc(root, "status").stdout.strip() == "Data and pipelines are up to date."

        params["train"]["learning_rate"] = 5e-4
        write_params(root / "params.yaml", params)
        assert sorted(json.loads(dvc(root, "status", "--json").stdout)) == ["export", "train"]  # the card states train.*
        rerun = dvc(root, "repro")
        assert ran(rerun.stdout) == ["train", "onnx", "evaluate", "export"]
    finally:  # back to the committed run: its files from git, its outputs from DVC's cache (no second rerun)
        git(root, "checkout", "--", ".")
        dvc(root, "checkout", "--force")
    assert dvc(root, "status").stdout.strip() == "Data and pipelines are up to date."


def test_metrics_and_plots_show(project, tmp_path):
    root, _ = project
    metrics = json.loads(dvc(root, "metrics", "show", "--json").stdout)
    files = next(iter(metrics.values()))["data"]
    assert any(f.endswith("summary.json") for f in files)
    assert any(f.endswith("dvclive/train/metrics.json") for f in files)
    assert any(f.endswith("artifacts/onnx/check.json") for f in files)
    assert "backends" in next(v for f, v in files.items() if f.endswith("eval/metrics.json"))["data"]
    dvc(root, "plots", "show", "-o", str(tmp_path / "plots"))
    html = (tmp_path / "plots" / "index.html").read_text()
    assert "Token lengths" in html and "loss" in html
    # each CSV is drawn once, by its titled top-level definition, not also as a default line chart
    plots = json.loads(dvc(root, "plots", "show", "--json").stdout)
    assert not [p for p in plots if p.endswith(".csv")], list(plots)


def test_metrics_are_in_git_so_a_fresh_clone_shows_them(project, tmp_path):
    root, _ = project  # its run was committed with `git add -A`: nothing of it is ignored that should not be
    tracked = git(root, "ls-files").split()
    assert {"dvc.lock", "eval/metrics.json", "dvclive/train/metrics.json", "artifacts/onnx/check.json"} <= set(tracked)
    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", str(root), str(clone))
    shown = dvc(clone, "metrics", "show", "--json")
    assert "failed to load" not in shown.stdout + shown.stderr
    files = next(iter(json.loads(shown.stdout).values()))["data"]
    assert all("error" not in v for v in files.values()), files
    assert any(f.endswith("artifacts/onnx/check.json") for f in files)


def test_experiment_with_a_changed_learning_rate(project):
    root, _ = project
    out = dvc(root, "exp", "run", "-S", "train.learning_rate=3e-5", "-n", "lr-3e-5")
    assert "Running stage 'train'" in out.stdout and "Running stage 'prepare'" not in out.stdout
    table = json.loads(dvc(root, "exp", "show", "--json").stdout)
    names = json.dumps(table)
    assert "lr-3e-5" in names  # the experiment is the last test of the module: it leaves its results applied
