"""The reproducibility record (`environment_info`, `sentiment-nb info`), the new `train.*` settings and what
DVC tracks for them, and the default DVC remote."""
import configparser
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import REPO, git

from sentiment_nb.cli import main
from sentiment_nb.config import Params, ParamsError, RayParams, TrainParams, environment_info, git_revision, load_params
from sentiment_nb.train import resolve_device, run_fingerprint, samples_per_step, steps_per_epoch

RECORD_KEYS = {"sentiment_nb", "python", "platform", "git", "packages", "device"}


def test_environment_info_records_versions_git_device_params_and_seeds(smoke_params_file):
    s = load_params(smoke_params_file)
    info = environment_info(s)
    assert RECORD_KEYS | {"params", "params_file", "seeds"} <= set(info)
    for name in ("torch", "transformers", "datasets", "ray"):
        assert info["packages"][name], name
    assert info["device"]["type"] == "cpu"
    assert info["seeds"] == {"data": s.data.seed, "train": s.train.seed}
    assert info["params"] == s.as_dict() and info["params_file"] == str(smoke_params_file)
    json.dumps(info)  # plain JSON


def test_git_revision_of_a_repo_and_its_changes(tmp_path):
    git(tmp_path, "init", "-q")
    (tmp_path / "f").write_text("1")
    git(tmp_path, "add", "f")
    git(tmp_path, "commit", "-qm", "one")
    head = git(tmp_path, "rev-parse", "HEAD").strip()
    assert git_revision(tmp_path) == {"commit": head, "dirty": False}
    (tmp_path / "f").write_text("2")
    assert git_revision(tmp_path) == {"commit": head, "dirty": True}


def test_a_missing_library_is_recorded_as_none(monkeypatch):
    import importlib.metadata as md

    real = md.version
    monkeypatch.setattr(md, "version", lambda name: (_ for _ in ()).throw(md.PackageNotFoundError(name))
                        if name == "ray" else real(name))
    assert environment_info()["packages"]["ray"] is None


def test_info_command_prints_the_record_as_json(capsys, smoke_params_file):
    assert main(["info", "--params", str(smoke_params_file)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert RECORD_KEYS | {"params", "seeds"} <= set(info)
    assert info["params"]["train"]["num_workers"] == 1


def test_info_command_without_a_params_file(tmp_path, monkeypatch):
    monkeypatch.delenv("SENTIMENT_NB_PARAMS")
    p = subprocess.run([str(Path(sys.executable).parent / "sentiment-nb"), "info"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    info = json.loads(p.stdout)
    assert RECORD_KEYS <= set(info) and "params" not in info


def test_info_command_with_a_missing_params_file(capsys):
    assert main(["info", "--params", "/nonexistent/params.yaml"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_train_scaling_settings(tmp_path):
    t = TrainParams()
    assert (t.num_workers, t.use_gpu, RayParams().address) == (1, "auto", None)
    f = tmp_path / "params.yaml"
    f.write_text("train:\n  num_workers: 4\n  use_gpu: false\nray:\n  address: 10.0.0.5:6379\n")
    s = load_params(f)
    assert (s.train.num_workers, s.train.use_gpu, s.ray.address) == (4, False, "10.0.0.5:6379")
    with pytest.raises(ParamsError, match="unknown key `train.ray_address`"):  # moved to the ray section
        load_params(f, ["train.ray_address=10.0.0.5:6379"])
    for bad in ("train.num_workers=0", "train.use_gpu=sometimes"):
        with pytest.raises(ParamsError, match=bad.split("=")[0]):
            load_params(f, [bad])
    assert resolve_device(False) == "cpu"


def test_samples_per_step_and_epoch():
    assert samples_per_step(TrainParams(batch_size=8)) == samples_per_step(TrainParams(batch_size=4, num_workers=2)) == 8
    assert samples_per_step(TrainParams(batch_size=4, num_workers=2, gradient_accumulation_steps=3)) == 24
    assert steps_per_epoch(33, TrainParams(batch_size=8)) == 5


def test_where_a_run_happens_is_not_part_of_it(smoke_params_file):
    s = load_params(smoke_params_file)
    there = load_params(smoke_params_file, ["ray.address=10.0.0.1:6379", "ray.storage_path=s3://bucket/runs"])
    assert run_fingerprint(s, "d") == run_fingerprint(there, "d")  # a checkpoint resumes on another cluster
    assert run_fingerprint(s, "d") != run_fingerprint(load_params(smoke_params_file, ["train.num_workers=2"]), "d")


@pytest.mark.parametrize("stage", ["train", "export"])  # export: the card's training table
def test_dvc_stage_tracks_every_train_setting_but_where_it_runs(stage):
    params = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"][stage]["params"]
    assert "train" in params  # the whole section, as example-get-started declares it
    assert not any(isinstance(p, str) and p.startswith("ray") for p in params)  # where it runs reruns nothing
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    assert set(params["train"]) == set(TrainParams.model_fields)
    assert not {"address", "storage_path"} & set(TrainParams.model_fields)


def test_params_yaml_holds_exactly_the_schema_defaults():
    "The defaults live in the pydantic fields; params.yaml states them for DVC, and may not drift from them."
    assert yaml.safe_load((REPO / "params.yaml").read_text()) == Params().model_dump(mode="json")


def test_default_dvc_remote_is_a_local_folder_outside_the_working_tree():
    cfg = configparser.ConfigParser()
    cfg.read(REPO / ".dvc" / "config")
    assert cfg["core"]["remote"] == "local"
    url = (REPO / ".dvc" / cfg["'remote \"local\"'"]["url"]).resolve()  # relative to .dvc/
    assert url == REPO.parent / "sentiment_nb-dvc-remote"
    assert REPO not in url.parents


def test_what_a_resumed_train_continues_survives_the_rerun():
    "DVC deletes a stage's outputs before it reruns it, unless they persist: the checkpoints and the curves must."
    train = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["train"]
    entries = {k: v for section in ("outs", "metrics", "plots") for o in train.get(section, [])
               if isinstance(o, dict) for k, v in o.items()}
    for path in ("${paths.checkpoints}", "${paths.train_live}/metrics.json", "${paths.train_live}/plots/metrics"):
        assert entries.get(path, {}).get("persist") is True, path
    # and out of DVC's cache: `dvc exp run` checks the cached outputs out first, which dropped a killed run's checkpoints
    assert entries["${paths.checkpoints}"].get("cache") is False
    ignored = subprocess.run(["git", "check-ignore", "-q", "artifacts/train/checkpoints/checkpoint-40/model.safetensors"],
                             cwd=REPO).returncode
    kept = subprocess.run(["git", "check-ignore", "-q", "artifacts/train/checkpoints/fingerprint.json"], cwd=REPO).returncode
    assert (ignored, kept) == (0, 1)  # a checkpoint stays out of git, the fingerprint goes in


def test_everything_needed_to_serve_or_resume_is_a_dvc_out():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    outs = {next(iter(o)) if isinstance(o, dict) else o for st in stages.values() for o in st.get("outs", [])}
    for needed in ("${paths.prepared}", "${paths.best_model}", "${paths.checkpoints}", "${paths.model}",
                   "${paths.reports}/02_data.ipynb", "${paths.reports}/03_train.ipynb",
                   "${paths.reports}/06_evaluate.ipynb", "${paths.reports}/07_export.ipynb"):
        assert needed in outs, needed
