"""A fresh clone: run the smoke pipeline, `dvc push` to the default remote (a folder next to the project),
`git clone`, `dvc pull`; then, with no training, the clone is up to date and answers predictions, and a
forced rerun on the clone gives the same metrics (CPU runs are deterministic)."""
import json
import sys
import time
from pathlib import Path

import nbformat
import pytest
from conftest import dvc
from helpers import git, run

pytestmark = pytest.mark.slow

SENTENCES = ["a gorgeous , witty , seductive movie .", "the plot is nothing but boilerplate clichés ."]


def predict(root):
    out = run([str(Path(sys.executable).parent / "sentiment-nb"), "predict", *SENTENCES, "--model", "model"], cwd=root)
    return json.loads(out.stdout)


def metrics(root):
    live = json.loads((root / "dvclive" / "train" / "metrics.json").read_text())
    return json.loads((root / "eval" / "metrics.json").read_text()), live["best_validation"]


def test_push_clone_pull_then_serve_and_reproduce(tmp_path, smoke_project):
    first, _ = smoke_project  # after `dvc repro`, its run committed: dvc.lock, metrics and plots go through git
    git(first, "checkout", "--", ".")  # back to that run, whatever an earlier test applied (an experiment, say)
    dvc(first, "checkout", "--force")
    assert dvc(first, "status").stdout.strip() == "Data and pipelines are up to date."

    start = time.perf_counter()
    dvc(first, "push")
    remote = first.parent / "sentiment_nb-dvc-remote"  # the default remote: next to the project folder
    assert remote.is_dir() and any(remote.rglob("*"))
    clone = first.parent / f"clone-of-{first.name}"  # next to the project: the remote's relative path holds for both
    git(first.parent, "clone", "-q", str(first), clone.name)
    assert not (clone / "model").exists()
    dvc(clone, "pull")
    print(f"push + clone + pull: {time.perf_counter() - start:.1f} s")

    # no training: everything the clone needs came from the remote
    assert dvc(clone, "status").stdout.strip() == "Data and pipelines are up to date."
    assert (clone / "artifacts" / "train" / "checkpoints" / "fingerprint.json").is_file()
    assert (clone / "data" / "prepared").is_dir()
    assert predict(clone) == predict(first)
    for stage in ("02_data", "03_train", "05_onnx", "06_evaluate", "07_export"):  # each report carries its reproducibility record
        report = clone / "reports" / f"{stage}.ipynb"
        text = json.dumps([c.get("outputs", []) for c in nbformat.read(report, as_version=4).cells])
        assert "'packages'" in text and "'git'" in text and "'seeds'" in text, report.name

    expected = metrics(first)
    dvc(clone, "repro", "--force")
    assert metrics(clone) == expected
