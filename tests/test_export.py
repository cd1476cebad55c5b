"""sentiment_nb.export: a tiny model and made-up metrics exported into a temporary folder."""
import json
import shutil

import pytest

from sentiment_nb.config import load_params
from sentiment_nb.export import ExportError, check_pipeline, read_card_metadata, write_export

METRICS = {"n": 1066, "accuracy": 0.84334, "f1": 0.84511, "ece": 0.03127,
           "negative": {"precision": 0.8512, "recall": 0.8321}, "positive": {"precision": 0.8367, "recall": 0.8587}}


@pytest.fixture
def project(tmp_path, tiny_model_dir):
    shutil.copytree(tiny_model_dir, tmp_path / "artifacts/train/best_model")
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval/metrics.json").write_text(json.dumps(METRICS, indent=2) + "\n")
    (tmp_path / "params.yaml").write_text(
        "model:\n  checkpoint: distilbert-base-uncased\ndata:\n  source: rotten_tomatoes\n  max_length: 96\n"
        "train:\n  learning_rate: 3.0e-5\n  epochs: 3\n")
    return load_params(tmp_path / "params.yaml")


def test_export_writes_safetensors_tokenizer_metrics_and_card(project):
    out = write_export(project)
    assert out == project.path("model")
    names = {f.name for f in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "metrics.json", "README.md"} <= names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl"))]
    assert (out / "metrics.json").read_bytes() == (project.path("eval") / "metrics.json").read_bytes()


def test_card_numbers_equal_the_metrics_file(project):
    card = (write_export(project) / "README.md").read_text()
    meta = read_card_metadata(card)
    assert meta["license"] and meta["pipeline_tag"] == "text-classification"
    assert meta["base_model"] == "distilbert-base-uncased"
    assert meta["datasets"] == ["rotten_tomatoes"]
    values = {m["name"]: m["value"] for m in meta["model-index"][0]["results"][0]["metrics"]}
    assert values["Accuracy"] == METRICS["accuracy"]
    assert values["F1 (positive)"] == METRICS["f1"]
    for label in ("negative", "positive"):
        for m in ("precision", "recall"):
            assert values[f"{m.capitalize()} ({label})"] == METRICS[label][m]
    body = card.split("\n---\n", 1)[1]
    assert "| accuracy | 0.8433 |" in body and "| F1 (positive) | 0.8451 |" in body
    assert "| expected calibration error | 0.0313 |" in body and "(1066 sentences)" in body
    # training settings come from params.yaml, not from the defaults
    assert "| `learning_rate` | 3e-05 |" in body and "| `epochs` | 3.0 |" in body
    assert "truncated at 96 tokens" in body and "`distilbert-base-uncased`" in body


def test_local_sources_stay_out_of_hub_metadata(project, tmp_path):
    (tmp_path / "data_dir").mkdir()
    p = tmp_path / "params.yaml"
    p.write_text(p.read_text().replace("source: rotten_tomatoes", "source: ./data_dir"))
    card = (write_export(load_params(p)) / "README.md").read_text()
    meta = read_card_metadata(card)
    assert "datasets" not in meta and "model-index" not in meta and meta["base_model"] == "distilbert-base-uncased"
    assert str(tmp_path) not in card and "| accuracy | 0.8433 |" in card


def test_pipeline_loads_the_export(project):
    answers = check_pipeline(write_export(project), texts=["a gorgeous film", "dull"])
    assert len(answers) == 2
    for a in answers:
        assert sorted(x["label"] for x in a) == ["negative", "positive"]
        assert sum(x["score"] for x in a) == pytest.approx(1.0, abs=1e-5)


def test_pipeline_check_fails_on_wrong_labels(project):
    with pytest.raises(ExportError, match="labels are"):
        check_pipeline(write_export(project), labels=["bad", "good"])


def test_reexport_replaces_old_files(project):
    out = project.path("model")
    out.mkdir(parents=True)
    (out / "config.json").write_text("{}")
    (out / "pytorch_model.bin").write_bytes(b"old")
    write_export(project)
    assert not (out / "pytorch_model.bin").exists()


def test_an_export_that_cannot_load_keeps_the_previous_one(project):
    first = write_export(project)
    weights = (first / "model.safetensors").read_bytes()
    (project.path("best_model") / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ExportError, match="Could not load the trained model in .*Run `dvc repro train` again"):
        write_export(project)
    assert (first / "model.safetensors").read_bytes() == weights


def test_an_interrupted_export_keeps_the_previous_one_whole(project, monkeypatch):
    from sentiment_nb import export

    first = write_export(project)
    files = {f.name: f.read_bytes() for f in first.iterdir() if f.is_file()}
    assert {"model.safetensors", "metrics.json", "README.md"} <= set(files)

    def interrupted(*args, **kwargs):  # Ctrl-C after the weights are written, before the card
        raise KeyboardInterrupt

    monkeypatch.setattr(export, "model_card", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_export(project)
    assert {f.name: f.read_bytes() for f in first.iterdir() if f.is_file()} == files
    assert sorted(p.name for p in first.parent.iterdir() if p.name.startswith(".model.")) == []
    monkeypatch.undo()
    assert write_export(project) == first  # and the next export goes through


def test_an_export_is_readable_as_a_folder_made_by_mkdir(project):
    import os

    umask = os.umask(0o022)
    try:
        out = write_export(project)
    finally:
        os.umask(umask)
    assert oct(out.stat().st_mode & 0o777) == oct(0o755)  # not mkdtemp's 0700: other users and containers read it


def test_a_failed_swap_puts_the_previous_export_back(project, monkeypatch):
    from pathlib import Path

    first = write_export(project)
    weights = (first / "model.safetensors").read_bytes()
    real_rename = Path.rename

    def rename(self, target):
        if self.name.startswith(".model.export-"):  # the new export, on its way in
            raise KeyboardInterrupt
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        write_export(project)
    monkeypatch.undo()
    assert (first / "model.safetensors").read_bytes() == weights
    assert sorted(p.name for p in first.parent.iterdir() if p.name.startswith(".model.")) == []


def test_the_card_leaves_out_where_training_ran(tmp_path, project):
    p = tmp_path / "params.yaml"
    body = (write_export(load_params(p, ["ray.address=10.1.2.3:6379", "ray.storage_path=/mnt/alice-nfs/runs"])) / "README.md").read_text()
    assert "| `learning_rate` | 3e-05 |" in body
    assert "10.1.2.3" not in body and "alice-nfs" not in body and "address" not in body


def test_refuses_to_empty_a_foreign_folder(project):
    out = project.path("model")
    out.mkdir(parents=True)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="does not look like an earlier export"):
        write_export(project)
    assert (out / "notes.txt").exists()


def test_missing_or_bad_metrics(project):
    (project.path("eval") / "metrics.json").unlink()
    with pytest.raises(ExportError, match="dvc repro evaluate"):
        write_export(project)
    (project.path("eval") / "metrics.json").write_text('{"accuracy": 1}')
    with pytest.raises(ExportError, match="has no n, f1, ece"):
        write_export(project)
