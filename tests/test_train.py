"""The `train` stage's library: precision, resuming an interrupted run, determinism on CPU."""
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from helpers import FIXTURE_DATA, smoke_params, write_params
from safetensors.torch import load_file
from transformers import TrainerCallback

from sentiment_nb.config import load_params
from sentiment_nb.data import load_splits, load_tokenizer, tokenize_splits
from sentiment_nb.train import resolve_precision, train


def prepared(folder, model_dir):
    "Smoke settings in `folder`, with the fixture data already prepared."
    s = load_params(write_params(folder / "params.yaml", smoke_params(FIXTURE_DATA, model_dir)))
    tok = load_tokenizer(s.model.checkpoint)
    tokenize_splits(load_splits(s), tok, s.data.max_length).save_to_disk(str(s.path("prepared")))
    return s


@pytest.fixture
def settings(tmp_path, tiny_model_dir):
    "Smoke settings in `tmp_path`, with the fixture data already prepared."
    return prepared(tmp_path, tiny_model_dir)


class Interrupt(TrainerCallback):
    "Kill the run right after its first checkpoint is written, like a Ctrl-C or a lost machine."
    def on_save(self, args, state, control, **kwargs):
        raise KeyboardInterrupt


def logged_steps(settings, name="train/loss"):
    return pd.read_csv(settings.path("train_live") / "plots" / "metrics" / f"{name}.tsv", sep="\t")["step"].tolist()


@pytest.mark.slow  # two training runs
def test_interrupted_run_resumes_from_its_checkpoint(settings):
    with pytest.raises(KeyboardInterrupt):
        train(settings, callbacks=[Interrupt()])
    ckpts = sorted(p.name for p in settings.path("checkpoints").glob("checkpoint-*"))
    assert ckpts, "the interrupted run left no checkpoint"
    assert not settings.path("best_model").exists()
    steps_before = logged_steps(settings)

    summary = train(settings)
    assert summary["resumed_from"] == ckpts[-1]
    first_step = int(ckpts[-1].split("-")[1])
    assert summary["global_step"] > first_step
    # dvclive kept the history of the interrupted part and continued it at the training step
    steps_after = logged_steps(settings)
    assert steps_after[: len(steps_before)] == steps_before
    assert max(steps_after) > first_step
    assert (settings.path("best_model") / "model.safetensors").is_file()
    # a finished run leaves nothing to resume: a forced rerun starts over
    assert not list(settings.path("checkpoints").glob("checkpoint-*"))
    assert train(settings)["resumed_from"] is None


class InterruptAfterCheckpoint(TrainerCallback):
    "Kill the run some logs after its first checkpoint: it has logged steps that the resume will redo."
    saved, logs_after = None, 0

    def on_save(self, args, state, control, **kwargs):
        self.saved = self.saved or state.global_step

    def on_log(self, args, state, control, logs=None, **kwargs):  # runs before dvclive's own on_log
        if self.saved and state.global_step > self.saved and "loss" in (logs or {}):
            self.logs_after += 1
            if self.logs_after == 2:  # dvclive has logged the first one
                raise KeyboardInterrupt


def test_a_resumed_run_logs_each_step_once(settings):
    kill = InterruptAfterCheckpoint()
    with pytest.raises(KeyboardInterrupt):
        train(settings, callbacks=[kill])
    assert max(logged_steps(settings)) > kill.saved  # logged past the checkpoint it will resume from
    before = logged_steps(settings)
    assert train(settings)["resumed_from"] == f"checkpoint-{kill.saved}"
    after = logged_steps(settings)
    assert after == sorted(set(after)), after  # no step twice
    assert after[:len([s for s in before if s <= kill.saved])] == [s for s in before if s <= kill.saved]
    assert max(after) > max(before)


class BestAtResume(TrainerCallback):
    "What the resumed Trainer holds as its best checkpoint when training starts again."
    best = "unset"

    def on_train_begin(self, args, state, control, **kwargs):
        self.best = state.best_model_checkpoint


def test_a_run_resumed_in_a_moved_project_finds_its_best_checkpoint(tmp_path, tiny_model_dir):
    s = prepared(tmp_path / "project", tiny_model_dir)
    with pytest.raises(KeyboardInterrupt):
        train(s, callbacks=[Interrupt()])
    shutil.move(tmp_path / "project", tmp_path / "moved")  # the project renamed between the kill and the resume
    moved = load_params(tmp_path / "moved" / "params.yaml")
    seen = BestAtResume()
    summary = train(moved, callbacks=[seen])
    assert summary["resumed_from"] is not None
    assert seen.best is not None and Path(seen.best).parent == moved.path("checkpoints"), seen.best
    assert Path(summary["best_checkpoint"]).parent == moved.path("checkpoints")


def test_a_checkpoint_cut_off_while_saving_is_not_resumed(settings):
    with pytest.raises(KeyboardInterrupt):
        train(settings, callbacks=[Interrupt()])
    [done] = sorted(settings.path("checkpoints").glob("checkpoint-*"))
    cut = settings.path("checkpoints") / f"checkpoint-{int(done.name.split('-')[1]) + 4}"
    shutil.copytree(done, cut)
    (cut / "trainer_state.json").unlink()  # the Trainer writes it last
    summary = train(settings)
    assert summary["resumed_from"] == done.name and summary["global_step"] > int(cut.name.split("-")[1])


def test_other_settings_do_not_resume_a_checkpoint(settings, tmp_path, tiny_model_dir):
    with pytest.raises(KeyboardInterrupt):
        train(settings, callbacks=[Interrupt()])
    changed = load_params(settings.source, ["train.learning_rate=5e-4"])
    assert train(changed)["resumed_from"] is None


def test_training_is_deterministic_on_cpu(settings):
    first = train(settings)
    weights = load_file(settings.path("best_model") / "model.safetensors")
    metrics = json.loads((settings.path("train_live") / "metrics.json").read_text())
    second = train(settings)
    assert second["resumed_from"] is None
    assert first["best_validation"] == second["best_validation"]
    again = load_file(settings.path("best_model") / "model.safetensors")
    assert all((weights[k] == again[k]).all() for k in weights)
    assert json.loads((settings.path("train_live") / "metrics.json").read_text())["best_validation"] == metrics["best_validation"]


def test_best_model_is_saved_with_labels_and_tokenizer(settings):
    summary = train(settings)
    cfg = json.loads((settings.path("best_model") / "config.json").read_text())
    assert cfg["id2label"] == {"0": "negative", "1": "positive"}
    assert (settings.path("best_model") / "tokenizer.json").is_file()
    assert summary["device"] == "cpu" and summary["precision"] == "fp32"
    assert 0 <= summary["best_validation"]["accuracy"] <= 1
    live = json.loads((settings.path("train_live") / "metrics.json").read_text())
    assert live["best_validation"]["accuracy"] == summary["best_validation"]["accuracy"]
    for curve in ("train/loss", "train/lr", "eval/accuracy", "eval/f1"):
        assert (settings.path("train_live") / "plots" / "metrics" / f"{curve}.tsv").is_file(), curve
    # the summary's step is the last one logged; no metric shares a name with a param; no TrainingArguments dump
    assert live["step"] == summary["global_step"] == max(logged_steps(settings))
    assert "learning_rate" not in live.get("train", {})
    assert not (settings.path("train_live") / "params.yaml").exists()
    # the saved tokenizer cuts texts where training did (data.max_length), not at the checkpoint's limit
    tok = json.loads((settings.path("best_model") / "tokenizer_config.json").read_text())
    assert tok["model_max_length"] == settings.data.max_length


def test_precision_choices():
    assert resolve_precision("auto", "cpu") == "fp32"
    assert resolve_precision("fp32", "cuda") == "fp32"
    with pytest.raises(ValueError, match="fp16 needs a CUDA GPU"):
        resolve_precision("fp16", "cpu")


def test_train_without_prepared_data_says_what_to_run(tmp_path, tiny_model_dir):
    s = load_params(write_params(tmp_path / "params.yaml", smoke_params(FIXTURE_DATA, tiny_model_dir)))
    with pytest.raises(ValueError, match="dvc repro prepare"):
        train(s)


def test_a_run_that_cannot_start_keeps_the_last_dvclive_record(settings):
    train(settings)
    record = (settings.path("train_live") / "metrics.json").read_text()
    too_long = load_params(settings.source, ["data.max_length=4096"])  # beyond the tiny model's 128 positions
    with pytest.raises(ValueError, match="Set `data.max_length` to 128 or less"):
        train(too_long)
    assert (settings.path("train_live") / "metrics.json").read_text() == record
