"""Batch scoring of files (`sentiment_nb.batch`, `sentiment-nb predict --input/--output`): formats in and out, columns
and order kept, chunking, rejects, `--on-error fail`, the user's mistakes, resume after a kill; and (slow) the same
job on Ray Data on a local Ray, equal to the single process, with ONNX actors that never import torch."""
import csv
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import MIXED_TEXTS, REPO, export_with_onnx, fixture_texts

from sentiment_nb.batch import (
    BatchError,
    added_columns,
    count_rows,
    model_version,
    partial_dir,
    read_chunks,
    rejects_path,
    score_file,
)
from sentiment_nb.predict import Predictor

TEXTS = MIXED_TEXTS + fixture_texts()[:20]
FORMATS = ["jsonl", "csv", "parquet", "txt"]


def write_input(path: Path, texts, ids=None, column="text") -> Path:
    "`texts` (and an `id` column, except in .txt) in the format of `path`'s suffix."
    ids = list(range(100, 100 + len(texts))) if ids is None else ids
    rows = [{"id": i, column: t} for i, t in zip(ids, texts, strict=True)]
    fmt = path.suffix[1:]
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "csv":
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, ["id", column])
            w.writeheader()
            w.writerows(rows)
    elif fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        path.write_text("".join(t + "\n" for t in texts))
    return path


def read_output(path: Path) -> list[dict]:
    "The rows of a scored file, as dicts (a .txt output: label, score and text of each line)."
    fmt = path.suffix[1:]
    if fmt == "parquet":
        return pq.read_table(path).to_pylist()
    if fmt == "jsonl":
        return [json.loads(line) for line in path.read_text().splitlines()]
    if fmt == "csv":
        with open(path, newline="") as f:
            return list(csv.DictReader(f))
    return [dict(zip(("label", "score", "text"), line.split("\t"), strict=True))
            for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    "The torch predictor's probabilities for TEXTS, one call, in order."
    p = Predictor(tiny_model_dir, device="cpu")
    return p.labels, p.predict_proba(TEXTS)


def check_scores(rows, texts, reference, ids=None, atol=1e-5):
    labels, probs = reference
    want = {t: p for t, p in zip(TEXTS, probs, strict=True)}
    assert [r["text"] for r in rows] == list(texts)  # order kept
    if ids is not None:
        assert [int(r["id"]) for r in rows] == list(ids)  # the other columns kept
    for r in rows:
        p = want[r["text"]]
        assert r["label"] == labels[int(p.argmax())], r
        assert float(r["score"]) == pytest.approx(float(p.max()), abs=atol)
        if "prob_negative" in r:
            assert [float(r[f"prob_{lab}"]) for lab in labels] == pytest.approx(p.tolist(), abs=atol)
            assert r["backend"] == "torch" and r["model_version"].startswith("sha256:")


# --- formats, columns, order ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("fin", FORMATS)
@pytest.mark.parametrize("fout", FORMATS)
def test_each_format_in_and_out_keeps_columns_and_order(tmp_path, tiny_model_dir, reference, fin, fout):
    src = write_input(tmp_path / f"in.{fin}", TEXTS)
    summary = score_file(src, tmp_path / f"out.{fout}", tiny_model_dir, backend="torch", device="cpu", chunk_rows=5)
    assert (summary["rows"], summary["scored"], summary["rejected"]) == (len(TEXTS), len(TEXTS), 0)
    rows = read_output(tmp_path / f"out.{fout}")
    check_scores(rows, TEXTS, reference, ids=None if "txt" in (fin, fout) else range(100, 100 + len(TEXTS)))
    if fout in ("parquet", "jsonl", "csv"):
        first = ["text"] if fin == "txt" else ["id", "text"]
        assert list(rows[0]) == first + added_columns(reference[0])
    assert rejects_path(tmp_path / f"out.{fout}").read_text() == ""
    assert not partial_dir(tmp_path / f"out.{fout}").exists()  # the finished chunks are cleaned up


def test_parquet_types_survive(tmp_path, tiny_model_dir):
    src = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": pa.array([7, 8], pa.int64()), "when": pa.array([1.5, None]),
                             "review": ["fine film", "dull"]}), src)
    score_file(src, tmp_path / "out.parquet", tiny_model_dir, text_column="review", backend="torch", device="cpu")
    out = pq.read_table(tmp_path / "out.parquet")
    assert out.schema.field("id").type == pa.int64() and out.column("when").to_pylist() == [1.5, None]
    assert out.schema.field("score").type == pa.float32()


@pytest.mark.parametrize("chunk_rows", [1, 3, 1000])
def test_chunk_size_changes_nothing_but_speed(tmp_path, tiny_model_dir, reference, chunk_rows):
    src = write_input(tmp_path / "in.jsonl", TEXTS)
    score_file(src, tmp_path / "out.parquet", tiny_model_dir, backend="torch", device="cpu", chunk_rows=chunk_rows,
               batch_size=4)
    check_scores(read_output(tmp_path / "out.parquet"), TEXTS, reference, ids=range(100, 100 + len(TEXTS)))


def test_chunks_have_fixed_rows_whatever_the_row_groups(tmp_path):
    src = tmp_path / "in.parquet"
    pq.write_table(pa.table({"text": [f"t{i}" for i in range(10)]}), src, row_group_size=3)
    assert [len(t) for t, _ in read_chunks(src, "text", 4)] == [4, 4, 2]
    assert [t.column("text")[0].as_py() for t, _ in read_chunks(src, "text", 4, skip_rows=4)] == ["t4", "t8"]
    assert count_rows(src) == 10


def test_prefix_and_a_column_clash(tmp_path, tiny_model_dir):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"text": "fine", "label": 1}) + "\n")
    with pytest.raises(BatchError, match=r"already has column\(s\) 'label'.*--prefix"):
        score_file(src, tmp_path / "out.jsonl", tiny_model_dir, backend="torch", device="cpu")
    score_file(src, tmp_path / "out.jsonl", tiny_model_dir, backend="torch", device="cpu", prefix="pred_")
    row = read_output(tmp_path / "out.jsonl")[0]
    assert row["label"] == 1 and row["pred_label"] in ("negative", "positive") and "pred_prob_positive" in row


def test_a_column_that_csv_cannot_hold_is_a_clear_error(tmp_path, tiny_model_dir):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"text": "fine", "meta": {"source": "web"}}) + "\n")
    with pytest.raises(BatchError, match="Cannot write the scores as csv"):
        score_file(src, tmp_path / "out.csv", tiny_model_dir, backend="torch", device="cpu")
    score_file(src, tmp_path / "out.jsonl", tiny_model_dir, backend="torch", device="cpu")
    assert read_output(tmp_path / "out.jsonl")[0]["meta"] == {"source": "web"}


def test_empty_input_gives_an_empty_output(tmp_path, tiny_model_dir):
    (tmp_path / "in.txt").write_text("")
    s = score_file(tmp_path / "in.txt", tmp_path / "out.parquet", tiny_model_dir, backend="torch", device="cpu")
    assert s["rows"] == 0 and pq.read_table(tmp_path / "out.parquet").num_rows == 0


def test_model_version_is_the_weights_hash(tiny_model_dir, sharp_model_dir):
    assert model_version(tiny_model_dir) == model_version(tiny_model_dir) != model_version(sharp_model_dir)


# --- bad rows and the user's mistakes -------------------------------------------------------------------------------

BAD = ['{"id": 1, "text": "a fine film"}', '{"id": 2, "text": ""}', '{"id": 3, "text": "   "}',
       '{"id": 4, "text": null}', '{"id": 5}', '{"id": 6, "text": 42}', 'not json', '[1, 2]',
       '{"id": 9, "text": "dull"}']


def test_bad_rows_go_to_the_rejects_file(tmp_path, tiny_model_dir):
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(BAD) + "\n")
    s = score_file(src, tmp_path / "out.csv", tiny_model_dir, backend="torch", device="cpu", chunk_rows=4)
    assert (s["rows"], s["scored"], s["rejected"]) == (9, 2, 7)
    assert [r["id"] for r in read_output(tmp_path / "out.csv")] == ["1", "9"]
    rejects = [json.loads(line) for line in rejects_path(tmp_path / "out.csv").read_text().splitlines()]
    assert [r["row"] for r in rejects] == [2, 3, 4, 5, 6, 7, 8]
    reasons = [r["reason"] for r in rejects]
    assert reasons[:5] == ["empty text", "empty text", "no text (missing or null)", "no text (missing or null)",
                           "text is a int, not a string"]
    assert reasons[5].startswith("not a JSON object") and "not an object" in reasons[6]


def test_bad_rows_in_csv_parquet_and_txt(tmp_path, tiny_model_dir):
    (tmp_path / "in.txt").write_text("fine\n\nbad\n")
    s = score_file(tmp_path / "in.txt", tmp_path / "a.jsonl", tiny_model_dir, backend="torch", device="cpu")
    assert s["rejected"] == 1 and json.loads(rejects_path(tmp_path / "a.jsonl").read_text())["row"] == 2
    pq.write_table(pa.table({"text": ["fine", None, ""]}), tmp_path / "in.parquet")
    s = score_file(tmp_path / "in.parquet", tmp_path / "b.jsonl", tiny_model_dir, backend="torch", device="cpu")
    assert s["rejected"] == 2
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "ints.parquet")
    s = score_file(tmp_path / "ints.parquet", tmp_path / "c.jsonl", tiny_model_dir, backend="torch", device="cpu")
    assert s["rejected"] == 2 and "int64, not a string" in rejects_path(tmp_path / "c.jsonl").read_text()
    (tmp_path / "in.csv").write_text('id,text\n1,fine\n2,\n3,"a film, with a comma"\n')
    s = score_file(tmp_path / "in.csv", tmp_path / "d.jsonl", tiny_model_dir, backend="torch", device="cpu")
    assert s["rejected"] == 1 and [r["id"] for r in read_output(tmp_path / "d.jsonl")] == ["1", "3"]


def test_on_error_fail_stops_at_the_first_bad_row(tmp_path, tiny_model_dir):
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(BAD) + "\n")
    with pytest.raises(BatchError, match=r"in.jsonl, row 2: empty text in column 'text'"):
        score_file(src, tmp_path / "out.csv", tiny_model_dir, backend="torch", device="cpu", on_error="fail")
    assert not (tmp_path / "out.csv").exists()


def test_a_missing_input(tmp_path, tiny_model_dir):
    with pytest.raises(BatchError, match="does not exist"):
        score_file(tmp_path / "nope.jsonl", tmp_path / "out.csv", tiny_model_dir)


def test_an_unreadable_file(tmp_path, tiny_model_dir):
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really parquet")
    with pytest.raises(BatchError, match=r"Cannot read .*bad.parquet as parquet"):
        score_file(tmp_path / "bad.parquet", tmp_path / "out.csv", tiny_model_dir, backend="torch", device="cpu")
    (tmp_path / "bad.csv").write_text("id,text\n1,fine\n2,too,many,fields\n")
    with pytest.raises(BatchError, match=r"Cannot read .*bad.csv as csv"):
        score_file(tmp_path / "bad.csv", tmp_path / "out.csv", tiny_model_dir, backend="torch", device="cpu")
    with pytest.raises(BatchError, match="is a folder"):
        score_file(tmp_path, tmp_path / "out.csv", tiny_model_dir)
    (tmp_path / "in.xlsx").write_bytes(b"PK")
    with pytest.raises(BatchError, match=r"unknown file type '\.xlsx'"):
        score_file(tmp_path / "in.xlsx", tmp_path / "out.csv", tiny_model_dir)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_a_file_without_read_permission(tmp_path, tiny_model_dir):
    f = write_input(tmp_path / "in.jsonl", ["fine"])
    f.chmod(0)
    with pytest.raises(BatchError, match="Cannot read"):
        score_file(f, tmp_path / "out.csv", tiny_model_dir)


def test_an_existing_output_is_refused_unless_overwrite(tmp_path, tiny_model_dir):
    src = write_input(tmp_path / "in.jsonl", ["fine", "dull"])
    (tmp_path / "out.jsonl").write_text("precious\n")
    with pytest.raises(BatchError, match="already exists; pass --overwrite"):
        score_file(src, tmp_path / "out.jsonl", tiny_model_dir, backend="torch", device="cpu")
    assert (tmp_path / "out.jsonl").read_text() == "precious\n"
    score_file(src, tmp_path / "out.jsonl", tiny_model_dir, backend="torch", device="cpu", overwrite=True)
    assert len(read_output(tmp_path / "out.jsonl")) == 2
    with pytest.raises(BatchError, match="is the input file"):
        score_file(src, src, tiny_model_dir, overwrite=True)


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_a_missing_text_column(tmp_path, tiny_model_dir, fmt):
    src = write_input(tmp_path / f"in.{fmt}", ["fine", "dull"], column="review")
    with pytest.raises(BatchError, match=r"has no column 'text'; its columns are 'id', 'review'. Pass --text-column"):
        score_file(src, tmp_path / "out.jsonl", tiny_model_dir, backend="torch", device="cpu")
    assert not (tmp_path / "out.jsonl").exists()


# --- resume ---------------------------------------------------------------------------------------------------------

def test_an_interrupted_run_resumes_from_its_last_chunk(tmp_path, tiny_model_dir, monkeypatch):
    import sentiment_nb.batch as batch

    src = write_input(tmp_path / "in.jsonl", TEXTS)
    score_file(src, tmp_path / "whole.parquet", tiny_model_dir, backend="torch", device="cpu", chunk_rows=4)
    calls, real = [], batch.score_table

    def stop_at_the_third_chunk(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(batch, "score_table", stop_at_the_third_chunk)
    out = tmp_path / "out.parquet"
    with pytest.raises(KeyboardInterrupt):
        score_file(src, out, tiny_model_dir, backend="torch", device="cpu", chunk_rows=4)
    assert not out.exists() and len(list(partial_dir(out).glob("part-*.parquet"))) == 2
    monkeypatch.setattr(batch, "score_table", real)
    scored, logged = [], []
    monkeypatch.setattr(batch, "score_table", lambda *a, **k: (scored.append(len(a[0])), real(*a, **k))[1])
    s = score_file(src, out, tiny_model_dir, backend="torch", device="cpu", chunk_rows=4, log=logged.append)
    assert s["resumed_chunks"] == 2 and sum(scored) == len(TEXTS) - 8 and "Resuming" in logged[0]
    assert pq.read_table(out).equals(pq.read_table(tmp_path / "whole.parquet"))


def test_a_changed_input_starts_afresh(tmp_path, tiny_model_dir):
    src = write_input(tmp_path / "in.jsonl", TEXTS)
    out = tmp_path / "out.parquet"
    partial_dir(out).mkdir()
    (partial_dir(out) / "manifest.json").write_text('{"input": "another file"}')
    pq.write_table(pa.table({"text": ["stale"]}), partial_dir(out) / "part-000000.parquet")
    logged = []
    s = score_file(src, out, tiny_model_dir, backend="torch", device="cpu", log=logged.append)
    assert s["resumed_chunks"] == 0 and "starting afresh" in logged[0]
    assert "stale" not in pq.read_table(out).column("text").to_pylist()


def cli(*args):
    return [sys.executable, "-c", "import sys; from sentiment_nb.cli import main; sys.exit(main(sys.argv[1:]))", *args]


@pytest.mark.slow  # three command starts: tens of seconds on a busy machine
def test_a_killed_cli_run_resumes_and_equals_an_uninterrupted_run(tmp_path, tiny_model_dir):
    texts = [f"{t} {i}" for i in range(30) for t in TEXTS][:600]
    src = write_input(tmp_path / "in.jsonl", texts)
    common = ["--model", str(tiny_model_dir), "--backend", "torch", "--device", "cpu", "--chunk-size", "20",
              "--batch-size", "4"]
    score_file(src, tmp_path / "whole.parquet", tiny_model_dir, backend="torch", device="cpu", chunk_rows=20,
               batch_size=4)
    out = tmp_path / "out.parquet"
    proc = subprocess.Popen(cli("predict", "--input", str(src), "--output", str(out), *common),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while len(list(partial_dir(out).glob("part-*.parquet"))) < 2 and time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    done = len(list(partial_dir(out).glob("part-*.parquet")))
    assert not out.exists() and 2 <= done < 30, done  # killed in the middle
    again = subprocess.run(cli("predict", "--input", str(src), "--output", str(out), *common),
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "Resuming" in again.stderr and json.loads(again.stdout)["resumed_chunks"] >= 2
    assert pq.read_table(out).equals(pq.read_table(tmp_path / "whole.parquet"))


# --- the command line -----------------------------------------------------------------------------------------------

def test_cli_scores_a_file_and_prints_a_summary(tmp_path, tiny_model_dir, reference, capsys):
    from sentiment_nb.cli import main

    src = write_input(tmp_path / "in.csv", TEXTS)
    out = tmp_path / "out.jsonl"
    assert main(["predict", "--input", str(src), "--output", str(out), "--model", str(tiny_model_dir),
                 "--backend", "torch", "--device", "cpu"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["scored"] == len(TEXTS) and summary["output"] == str(out)
    check_scores(read_output(out), TEXTS, reference, ids=range(100, 100 + len(TEXTS)))
    assert main(["predict", "--input", str(src), "--output", str(out), "--model", str(tiny_model_dir)]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--input", "x.jsonl"], "--input needs --output"),
    (["--output", "x.jsonl"], "--output needs --input"),
    (["a text", "--input", "x.jsonl", "--output", "y.jsonl"], "either TEXTs or --input"),
    (["--input", "missing.jsonl", "--output", "y.jsonl"], "does not exist"),
])
def test_cli_file_mode_mistakes_exit_2_with_one_line(tmp_path, tiny_model_dir, capsys, monkeypatch, args, message):
    from sentiment_nb.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["predict", *args, "--model", str(tiny_model_dir)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_cli_predict_without_texts_or_input_shows_the_usage(capsys):
    from sentiment_nb.cli import main

    with pytest.raises(SystemExit) as e:
        main(["predict"])
    assert e.value.code == 2 and "--input FILE --output FILE" in capsys.readouterr().err


def test_progress_bar_only_on_a_terminal(tmp_path, tiny_model_dir, capsys):
    src = write_input(tmp_path / "in.jsonl", TEXTS)
    score_file(src, tmp_path / "a.csv", tiny_model_dir, backend="torch", device="cpu")  # stderr is not a tty here
    assert "rows/s" not in capsys.readouterr().err
    score_file(src, tmp_path / "b.csv", tiny_model_dir, backend="torch", device="cpu", progress=True)
    assert "rows/s" in capsys.readouterr().err


# --- Ray Data (slow: a local Ray) ------------------------------------------------------------------------------------

RAY_RESUME_ROWS = 2000  # enough for Ray to commit some rows before the test stops the job

RAY_SCRIPT = r'''
import json, sys
import pyarrow as pa
import ray
from sentiment_nb.batch_ray import ChunkScorer, score_with_ray
from sentiment_nb.batch import BatchError

args = json.loads(sys.argv[1])
ray.init(address="local", num_cpus=3, include_dashboard=False, _node_ip_address="127.0.0.1",
         _temp_dir=args["temp_dir"], log_to_driver=False)
result = {}


class Probe(ChunkScorer):
    "The job's actor, reporting whether torch is loaded in its process."
    def __call__(self, batch):
        out = super().__call__(batch)
        return out.append_column("torch_loaded", pa.array(["torch" in sys.modules] * len(out)))


import ray.data as rd
# first, in fresh worker processes: an ONNX actor scores without ever importing torch
ds = rd.read_json(args["input"]).map_batches(
    Probe, batch_format="pyarrow", batch_size=4, compute=rd.ActorPoolStrategy(size=1), num_cpus=1,
    fn_constructor_kwargs={"model_dir": args["onnx_model"], "backend": "onnx"})
rows = ds.take_all()
result["probe"] = {"rows": len(rows), "torch_loaded": sorted({r["torch_loaded"] for r in rows}),
                   "labels": [r["label"] for r in rows]}
common = dict(chunk_rows=4, num_actors=2, cpus_per_actor=1)
result["onnx"] = score_with_ray(args["input"], args["out_onnx"], args["onnx_model"], backend="onnx", **common)
result["torch"] = score_with_ray(args["input"], args["out_torch"], args["torch_model"], backend="torch", **common)
result["csv"] = score_with_ray(args["csv"], args["out_csv"], args["torch_model"], backend="torch", **common)
try:
    score_with_ray(args["bad"], args["out_fail"], args["torch_model"], backend="torch", on_error="fail", **common)
    result["fail"] = None
except BatchError as e:
    result["fail"] = str(e)
result["skip"] = score_with_ray(args["bad"], args["out_skip"], args["torch_model"], backend="torch", **common)
# URIs in and out, as s3:// or gs:// would be: Ray Data and pyarrow open them, and the output is written in place
result["uri"] = score_with_ray("file://" + args["bad"], "file://" + args["out_uri"], args["torch_model"],
                               backend="torch", **common)
ray.shutdown()
print("RESULT " + json.dumps(result))
'''


@pytest.fixture(scope="module")
def ray_run(tiny_model_dir, tmp_path_factory):
    "One local Ray (in a child process, its temp folder short) that runs every Ray Data job of the tests below."
    from sentiment_nb.onnx_export import write_onnx

    tmp = tmp_path_factory.mktemp("ray")
    onnx_dir = tmp / "onnx"
    write_onnx(tiny_model_dir, onnx_dir, fixture_texts(), batch_size=8)
    (tmp / "project").mkdir()
    exported = export_with_onnx(tiny_model_dir, onnx_dir, tmp / "project")
    texts = TEXTS * 3
    bad = tmp / "bad.jsonl"
    bad.write_text("\n".join(BAD[:5]) + "\n")  # Ray's JSON reader needs objects on every line, one type per key
    args = {"input": str(write_input(tmp / "in.jsonl", texts)), "csv": str(write_input(tmp / "in.csv", texts)),
            "bad": str(bad), "onnx_model": str(exported), "torch_model": str(tiny_model_dir),
            "temp_dir": f"/tmp/ray-{uuid.uuid4().hex[:8]}"}
    for name in ("onnx", "torch", "csv", "fail", "skip", "uri"):
        args[f"out_{name}"] = str(tmp / f"out_{name}.parquet")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    try:
        p = subprocess.run([sys.executable, "-c", RAY_SCRIPT, json.dumps(args)], capture_output=True, text=True,
                           timeout=600, env=env)
    finally:
        import shutil

        shutil.rmtree(args["temp_dir"], ignore_errors=True)
    assert p.returncode == 0, p.stderr[-5000:]
    result = json.loads(next(line for line in p.stdout.splitlines() if line.startswith("RESULT "))[7:])
    return args, result, texts, exported


@pytest.mark.slow
def test_ray_onnx_actor_never_imports_torch(ray_run):
    args, result, texts, _ = ray_run
    assert result["probe"]["rows"] == len(texts) and result["probe"]["torch_loaded"] == [False]


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "onnx", "csv"])
def test_ray_data_equals_the_single_process_row_for_row(ray_run, tmp_path, backend):
    args, result, texts, exported = ray_run
    model = exported if backend == "onnx" else args["torch_model"]
    src = args["csv"] if backend == "csv" else args["input"]
    single = tmp_path / "single.parquet"
    score_file(src, single, model, backend="onnx" if backend == "onnx" else "torch", device="cpu", chunk_rows=4)
    ray_out = pq.read_table(args[f"out_{backend}"])
    assert result[backend]["rows"] == len(texts) and result[backend]["rejected"] == 0
    want = pq.read_table(single)
    assert ray_out.column("reject_reason").null_count == len(texts)
    got = ray_out.drop_columns(["reject_reason"])
    assert got.column_names == want.column_names
    assert got.column("id").to_pylist() == want.column("id").to_pylist()  # the input order
    assert got.column("label").to_pylist() == want.column("label").to_pylist()
    for c in ("score", "prob_negative", "prob_positive"):
        np.testing.assert_allclose(got.column(c).to_numpy(), want.column(c).to_numpy(), atol=1e-6)


@pytest.mark.slow
def test_ray_bad_rows_keep_a_reason_or_stop_the_job(ray_run):
    args, result, _, _ = ray_run
    fail = result["fail"]  # the first bad row that Ray meets: its blocks run in parallel, so either kind
    assert any(f"{reason} in column 'text'" in fail for reason in ("empty text", "no text (missing or null)")), fail
    assert "--on-error skip" in fail, fail
    assert (result["skip"]["rows"], result["skip"]["rejected"]) == (5, 4)
    out = pq.read_table(args["out_skip"])
    assert out.column("reject_reason").to_pylist() == [None, "empty text", "empty text", "no text (missing or null)",
                                                       "no text (missing or null)"]
    assert out.column("label").to_pylist()[0] in ("negative", "positive") and out.column("label").null_count == 4
    rejects = [json.loads(line) for line in rejects_path(Path(args["out_skip"])).read_text().splitlines()]
    assert rejects == [{"row": 2, "column": "text", "reason": "empty text"},
                       {"row": 3, "column": "text", "reason": "empty text"},
                       {"row": 4, "column": "text", "reason": "no text (missing or null)"},
                       {"row": 5, "column": "text", "reason": "no text (missing or null)"}]
    assert result["skip"]["rejects_file"] == str(rejects_path(Path(args["out_skip"])))


@pytest.mark.slow
def test_ray_reads_and_writes_uris_as_for_object_storage(ray_run):
    args, result, _, _ = ray_run
    uri, local = result["uri"], result["skip"]
    assert uri["output"] == "file://" + args["out_uri"] and (uri["rows"], uri["rejected"]) == (5, 4)
    assert pq.read_table(args["out_uri"]).equals(pq.read_table(args["out_skip"]))  # the job with local paths
    assert uri["rejects_file"] == "file://" + str(rejects_path(Path(args["out_uri"])))
    assert rejects_path(Path(args["out_uri"])).read_text() == rejects_path(Path(args["out_skip"])).read_text()
    assert local["rejects_file"] != uri["rejects_file"]


def test_ray_resume_needs_an_id_column_that_exists(tmp_path, tiny_model_dir):
    from sentiment_nb.batch_ray import score_with_ray

    src = write_input(tmp_path / "in.jsonl", TEXTS[:3])
    with pytest.raises(BatchError) as e:  # checked on the driver, before Ray starts
        score_with_ray(src, tmp_path / "out.parquet", tiny_model_dir, backend="torch", id_column="row_id")
    assert "no column 'row_id' to resume by" in str(e.value) and "'id', 'text'" in str(e.value)
    assert "--id-column" in str(e.value) and not (tmp_path / "out.parquet").exists()


def committed(folder: Path) -> list[Path]:
    "Ray Data's committed checkpoint files in `folder` (its 2-phase commit first writes `<id>.pending.parquet`)."
    return [p for p in folder.glob("*.parquet") if not p.name.endswith(".pending.parquet")] if folder.is_dir() else []


@pytest.mark.slow  # two local Ray starts
def test_a_stopped_ray_job_resumes_by_its_id_column(tmp_path, tiny_model_dir):
    import shutil

    from sentiment_nb.batch_ray import checkpoint_dir

    texts = [f"{t} {i}" for i in range(100) for t in TEXTS][:RAY_RESUME_ROWS]
    src = write_input(tmp_path / "in.jsonl", texts)
    out = tmp_path / "out.parquet"
    cmd = cli("predict", "--input", str(src), "--output", str(out), "--model", str(tiny_model_dir), "--backend",
              "torch", "--chunk-size", "20", "--batch-size", "4", "--ray", "--actors", "1", "--cpus-per-actor", "1",
              "--id-column", "id")
    ray_tmp = f"/tmp/rt-{uuid.uuid4().hex[:8]}"  # Ray's sockets need a short path
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_TMPDIR": ray_tmp}
    env.pop("RAY_ADDRESS", None)
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        deadline = time.monotonic() + 240
        while not committed(checkpoint_dir(out)) and time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()  # still running: not done before the first commit
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 130 and "run the same command again to resume" in err, err[-3000:]
        first = {p.name for p in partial_dir(out).glob("*.parquet")}
        assert first and not out.exists()
        again = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert again.returncode == 0, again.stderr[-3000:]
    summary = json.loads(again.stdout)
    assert summary["resumed"] and "Resuming" in again.stderr and summary["rows"] == len(texts)
    assert first & {p.name for p in out.glob("*.parquet")}  # rows of the first run were kept, not scored again
    assert not partial_dir(out).exists() and not checkpoint_dir(out).exists()
    score_file(src, tmp_path / "whole.parquet", tiny_model_dir, backend="torch", device="cpu", chunk_rows=20,
               batch_size=4)
    got, want = pq.read_table(out).sort_by("id"), pq.read_table(tmp_path / "whole.parquet")
    assert got.column("id").to_pylist() == want.column("id").to_pylist()  # each row once: none lost, none twice
    assert got.column("label").to_pylist() == want.column("label").to_pylist()
    np.testing.assert_allclose(got.column("score").to_numpy(), want.column("score").to_numpy(), atol=1e-6)


# --- the `score` stage (slow: dvc and papermill in a copy of the repo) ----------------------------------------------

@pytest.mark.slow
def test_score_stage_says_so_without_an_input_and_scores_one_with_it(tmp_path_factory, tiny_model_dir, monkeypatch):
    import shutil

    import yaml
    from helpers import FIXTURE_DATA, copy_repo, git, run, smoke_params, write_params

    root = copy_repo(tmp_path_factory.mktemp("project"))
    write_params(root / "params.yaml", smoke_params(FIXTURE_DATA, tiny_model_dir))
    shutil.copytree(tiny_model_dir, root / "model")  # what `export` would have made
    git(root, "commit", "-qam", "smoke params")
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")  # papermill
    dvc = [sys.executable, "-m", "dvc", "repro", "--single-item", "score"]
    first = run(dvc, cwd=root)
    assert "Running stage 'score'" in first.stdout
    assert (root / "scored").is_dir() and list((root / "scored").iterdir()) == []  # nothing written
    report = (root / "reports" / "12_batch.ipynb").read_text()
    assert "score.input is not set: nothing to score" in report
    assert "didn't change, skipping" in run(dvc, cwd=root).stdout

    write_input(root / "reviews.csv", TEXTS)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["score"].update(input="reviews.csv", format="jsonl")
    write_params(root / "params.yaml", params)
    run(dvc, cwd=root)
    rows = read_output(root / "scored" / "scored.jsonl")
    assert [int(r["id"]) for r in rows] == list(range(100, 100 + len(TEXTS)))
    summary = json.loads((root / "scored" / "summary.json").read_text())
    assert summary["scored"] == len(TEXTS) and summary["input"] == "reviews.csv" and len(summary["input_md5"]) == 32
    assert sorted(p.name for p in (root / "scored").iterdir()) == ["scored.jsonl", "scored.rejects.jsonl",
                                                                   "summary.json"]
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]["score"]
    assert lock["params"]["params.yaml"]["score"]["input"] == "reviews.csv"
    assert any(o["path"] == "scored" for o in lock["outs"])

    params["score"]["input"] = None  # back to no input: the folder is emptied, not left with the old scores
    write_params(root / "params.yaml", params)
    run(dvc, cwd=root)
    assert list((root / "scored").iterdir()) == []


@pytest.mark.slow
def test_batch_bench_runs_on_the_tiny_model(tiny_model_dir, tmp_path):
    from helpers import FIXTURE_DATA

    out = tmp_path / "bench.json"
    p = subprocess.run([sys.executable, str(REPO / "bench" / "batch_score.py"), "--model", str(tiny_model_dir),
                        "--data", str(FIXTURE_DATA / "test.jsonl"), "--rows", "40", "--only", "baseline", "job",
                        "--backends", "torch", "--baseline-batch-sizes", "8", "--sweep-rows", "16",
                        "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert figures["job:torch"]["rows"] == figures["baseline"]["rows"] == 40
    assert figures["job:torch"]["sent_per_s"] > 0 and figures["job:torch"]["peak_rss_mb"] > 0
    assert "summary (sentences/s" in p.stdout
