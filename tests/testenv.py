"""pytest plugin (loaded by `-p testenv` in pyproject.toml, for every pytest run): session set-up
shared by the unit tests, the end-to-end tests and the notebooks (nbval).

Before any test runs, this builds the tiny model and writes a smoke params file into a temporary
folder, and points `$SENTIMENT_NB_PARAMS` at it: the notebooks, run by nbval, then execute top to
bottom on the smoke configuration and write their outputs there, not into the repo. Every cache
(Hugging Face, DVC, Jupyter, Matplotlib, Ray) goes to the same temporary folder.
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from helpers import FIXTURE_DATA, build_tiny_model, smoke_params, write_params  # noqa: E402  (tests/ is on sys.path)

_BASE = Path(tempfile.mkdtemp(prefix="sentiment-nb-tests-"))
# Ray puts `ray/session_<date>_<time>_<pid>/sockets/plasma_store` (68 bytes) under $RAY_TMPDIR, and a UNIX socket's path
# may have at most 107 bytes: under a $TMPDIR a little longer than /tmp, _BASE/ray is too long for it.
RAY_SOCKET_TAIL = len("/ray/session_2026-12-07_19-03-26_123456_4194304/sockets/plasma_store")


def short_ray_tmpdir(base: Path) -> Path:
    "$RAY_TMPDIR for the tests: `base`/ray if Ray's socket paths fit under it, else a new folder in /tmp (one line if none)."
    if len(os.fsencode(str(base / "ray"))) + RAY_SOCKET_TAIL <= 103:
        return base / "ray"
    try:
        return Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    except OSError as e:
        raise pytest.UsageError(f"Ray's folders need a path short enough for its sockets (at most 107 bytes), and "
                                f"{base} is too long and /tmp unusable ({e.strerror}): run with TMPDIR=/tmp.") from None


_RAY_TMPDIR = short_ray_tmpdir(_BASE)


def pytest_configure(config):
    for var, sub in [("HF_HOME", "hf"), ("XDG_CACHE_HOME", "cache"), ("MPLCONFIGDIR", "mpl"), ("IPYTHONDIR", "ipython"),
                     ("JUPYTER_RUNTIME_DIR", "jupyter/runtime"), ("JUPYTER_DATA_DIR", "jupyter/data"),
                     ("DVC_SITE_CACHE_DIR", "dvc/site"), ("DVC_GLOBAL_CONFIG_DIR", "dvc/global"),
                     ("RAY_TMPDIR", _RAY_TMPDIR), ("TMPDIR", "tmp")]:
        (_BASE / sub).mkdir(parents=True, exist_ok=True)
        os.environ[var] = str(_BASE / sub)
    tempfile.tempdir = None  # re-read TMPDIR
    os.environ.update(HF_HUB_OFFLINE="1", DVC_NO_ANALYTICS="1", TOKENIZERS_PARALLELISM="false",
                      RAY_AUTH_MODE="disabled", PYTHONWARNINGS="ignore::DeprecationWarning")
    model = build_tiny_model(_BASE / "tiny_model")
    params = write_params(_BASE / "smoke" / "params.yaml", smoke_params(FIXTURE_DATA, model))
    os.environ["SENTIMENT_NB_PARAMS"] = str(params)


def pytest_unconfigure(config):
    shutil.rmtree(_BASE, ignore_errors=True)
    shutil.rmtree(_RAY_TMPDIR, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    "An untrained tiny BERT classifier and its tokenizer, saved with save_pretrained."
    return _BASE / "tiny_model"


@pytest.fixture(scope="session")
def tiny_data_dir() -> Path:
    "train/validation/test .jsonl with a few dozen labelled sentences."
    return FIXTURE_DATA


@pytest.fixture(scope="session")
def smoke_params_file() -> Path:
    "The smoke params file the notebooks run with (outputs go next to it)."
    return Path(os.environ["SENTIMENT_NB_PARAMS"])


@pytest.fixture(scope="session")
def sharp_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    "The tiny model with its classifier scaled up, so that different texts get clearly different scores."
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path_factory.mktemp("sharp")
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        model.classifier.weight.mul_(1000.0)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out
