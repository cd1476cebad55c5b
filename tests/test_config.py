from pathlib import Path
from typing import get_args

import pytest
from helpers import committed_params_text

from sentiment_nb.config import PARAMS_ENV, LRScheduler, ParamsError, find_params_file, load_params

REPO = Path(__file__).resolve().parents[1]


def test_committed_params_file_is_valid(tmp_path):
    assert load_params(REPO / "params.yaml").root == REPO  # the workspace copy, maybe with `dvc exp run -S` values
    (tmp_path / "params.yaml").write_text(committed_params_text())
    s = load_params(tmp_path / "params.yaml")
    assert s.model.checkpoint == "distilbert-base-uncased"
    assert s.data.source == "rotten_tomatoes"


@pytest.mark.parametrize("body, expected", [
    ("train:\n  learnig_rate: 1.0e-5\n", "unknown key `train.learnig_rate`. Did you mean `train.learning_rate`?"),
    ("trian:\n  epochs: 1\n", "unknown key `trian`. Did you mean `train`?"),
    ("train:\n  batch_size: many\n", "`train.batch_size` = 'many'"),
    ("train:\n  precision: int4\n", "`train.precision` = 'int4'"),
    ("train:\n  lr_scheduler: cosin\n", "`train.lr_scheduler` = 'cosin': Input should be 'linear', 'cosine'"),
    ("data:\n  max_length: -3\n", "`data.max_length` = -3"),
    ("train:\n  max_steps: 0\n", "`train.max_steps` = 0: Value error, must be -1"),
    ("train:\n  max_steps: -7\n", "`train.max_steps` = -7"),
    ("train:\n  eval_steps: 50.7\n", "`train.eval_steps` = 50.7: Value error, must be a fraction of the run"),
    ("serve:\n  max_queued_requests: 0\n", "`serve.max_queued_requests` = 0: Value error, must be -1 (no limit) or at least 1"),
    ("- a\n- list\n", "must hold a mapping of sections"),
    ("train: [unclosed\n", "is not valid YAML"),
])
def test_bad_params_name_the_key(tmp_path, body, expected):
    f = tmp_path / "params.yaml"
    f.write_text(body)
    with pytest.raises(ParamsError) as e:
        load_params(f)
    assert expected in str(e.value)
    assert str(f) in str(e.value)


def test_every_allowed_lr_scheduler_is_one_of_transformers_schedulers():
    from transformers.trainer_utils import SchedulerType

    assert set(get_args(LRScheduler)) <= {s.value for s in SchedulerType}


@pytest.mark.parametrize("name", get_args(LRScheduler))
def test_every_allowed_lr_scheduler_needs_no_kwargs(name):
    import torch
    from transformers import get_scheduler

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    scheduler = get_scheduler(name, optimizer, num_warmup_steps=1, num_training_steps=10)
    for _ in range(3):
        optimizer.step()
        scheduler.step()


def test_overrides_use_dvc_syntax_and_are_validated(tmp_path):
    f = tmp_path / "params.yaml"
    f.write_text("train:\n  epochs: 1\n")
    s = load_params(f, ["train.learning_rate=3e-5", "data.limit=10"])
    assert (s.train.learning_rate, s.data.limit, s.train.epochs) == (3e-5, 10, 1)
    with pytest.raises(ParamsError, match="section.key=value"):
        load_params(f, ["train.learning_rate"])
    with pytest.raises(ParamsError, match="train.epochs"):
        load_params(f, {"train.epochs": "forever"})


def test_params_file_lookup_order(tmp_path, monkeypatch):
    (tmp_path / "a").mkdir()
    (tmp_path / "params.yaml").write_text("{}\n")
    other = tmp_path / "other.yaml"
    other.write_text("{}\n")
    monkeypatch.chdir(tmp_path / "a")
    monkeypatch.delenv(PARAMS_ENV, raising=False)
    assert find_params_file() == tmp_path / "params.yaml"  # nearest upwards
    monkeypatch.setenv(PARAMS_ENV, str(other))
    assert find_params_file() == other  # the environment variable wins
    assert find_params_file(tmp_path / "params.yaml") == tmp_path / "params.yaml"  # an explicit path wins
    with pytest.raises(ParamsError, match="does not exist"):
        find_params_file(tmp_path / "missing.yaml")
    with pytest.raises(ParamsError, match=f"is a folder. Pass a YAML file. Did you mean '{tmp_path / 'params.yaml'}'"):
        find_params_file(tmp_path)
    with pytest.raises(ParamsError, match=r"'\.' is a folder\. Pass a YAML file\.$"):  # the cwd, `a`, has none
        find_params_file(".")


def test_paths_are_relative_to_the_params_file(tmp_path):
    f = tmp_path / "params.yaml"
    f.write_text("paths:\n  model: out/model\n  eval: /abs/eval\n")
    s = load_params(f)
    assert s.path("model") == tmp_path / "out" / "model"
    assert s.path("eval") == Path("/abs/eval")
