"""The `prepare` stage's library: loading, every validation error, the report, tokenizing."""
import json
import shutil

import pandas as pd
import pytest

from sentiment_nb.config import load_params
from sentiment_nb.data import (
    PROXY_VARS,
    DataError,
    data_report,
    load_hub_splits,
    load_local_splits,
    load_splits,
    load_tokenizer,
    sample_splits,
    token_histogram,
    token_summary,
    tokenize_splits,
)

GOOD = [{"text": "a witty, warm film", "label": 1}, {"text": "a dull mess", "label": 0}]


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")


@pytest.fixture
def folder(tmp_path):
    for split in ("train", "validation", "test"):
        write_jsonl(tmp_path / f"{split}.jsonl", GOOD)
    return tmp_path


def error_of(folder) -> str:
    with pytest.raises(DataError) as e:
        load_local_splits(folder)
    return str(e.value)


def test_fixture_folder_loads(tiny_data_dir):
    dsd = load_local_splits(tiny_data_dir)
    assert dsd.num_rows == {"train": 32, "validation": 12, "test": 12}
    assert dsd["train"].features["label"].names == ["negative", "positive"]
    assert set(dsd["train"]["label"]) == {0, 1}


def test_csv_and_parquet_load_like_jsonl(folder):
    pd.DataFrame(GOOD).to_csv(folder / "validation.csv", index=False)
    pd.DataFrame(GOOD).to_parquet(folder / "test.parquet")
    (folder / "validation.jsonl").unlink()
    (folder / "test.jsonl").unlink()
    dsd = load_local_splits(folder)
    assert dsd["validation"]["text"] == dsd["test"]["text"] == [r["text"] for r in GOOD]


def test_missing_folder(tmp_path):
    msg = error_of(tmp_path / "nope")
    assert "does not exist" in msg and "data.source" in msg


def test_missing_split(folder):
    (folder / "validation.jsonl").unlink()
    assert "No validation split" in error_of(folder) and "validation.csv" in error_of(folder)


def test_two_files_for_one_split(folder):
    pd.DataFrame(GOOD).to_csv(folder / "train.csv", index=False)
    assert "Several train files" in error_of(folder)


def test_invalid_json_line_names_the_line(folder):
    write_jsonl(folder / "train.jsonl", [GOOD[0], '{"text": "oops", "label": }'])
    msg = error_of(folder)
    assert "train.jsonl line 2 is not valid JSON" in msg


def test_json_line_that_is_not_an_object(folder):
    write_jsonl(folder / "test.jsonl", [GOOD[0], '["a list", 1]'])
    assert "test.jsonl line 2 is a JSON list" in error_of(folder)


def test_missing_column_names_what_was_found(folder):
    write_jsonl(folder / "train.jsonl", [{"sentence": "x", "label": 1}])
    msg = error_of(folder)
    assert "has no `text` column (found: sentence, label)" in msg and "Rename" in msg


@pytest.mark.parametrize("row, expected", [
    ({"text": "   ", "label": 1}, "line 3: `text` is empty"),
    ({"text": 42, "label": 1}, "line 3: `text` is 42, not a string"),
    ({"text": None, "label": 0}, "line 3: `text` is missing"),
    ({"text": "ok", "label": 2}, "line 3: `label` is 2; it must be 0 (negative) or 1 (positive)"),
    ({"text": "ok", "label": "pos"}, "line 3: `label` is 'pos'"),
    ({"text": "ok", "label": True}, "line 3: `label` is True"),
    ({"label": 1}, "line 3: `text` is missing"),
    ({"text": "ok"}, "line 3: `label` is None"),
])
def test_bad_rows_name_file_row_and_fix(folder, row, expected):
    write_jsonl(folder / "validation.jsonl", [*GOOD, row])
    msg = error_of(folder)
    assert "validation.jsonl: 1 bad row(s). Fix or remove them" in msg
    assert expected in msg


def test_csv_rows_are_numbered_as_file_lines(folder):
    (folder / "train.jsonl").unlink()
    pd.DataFrame([*GOOD, {"text": "", "label": 1}]).to_csv(folder / "train.csv", index=False)
    assert "line 4: `text` is empty" in error_of(folder)  # header is line 1


def test_many_bad_rows_are_summarised(folder):
    write_jsonl(folder / "train.jsonl", [{"text": "x", "label": 5}] * 9)
    msg = error_of(folder)
    assert "9 bad row(s)" in msg and "... and 4 more" in msg


def test_hub_unreachable_says_how_to_go_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError) as e:
        load_hub_splits("rotten_tomatoes")
    msg = str(e.value)
    assert "Could not reach the Hugging Face Hub" in msg and "data.source" in msg
    assert "Traceback" not in msg
    with pytest.raises(DataError, match="model.checkpoint"):
        load_tokenizer("distilbert-base-uncased")


def test_a_mistyped_local_folder_is_named_in_the_offline_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "params.yaml").write_text("data:\n  source: data/rt\n")  # no such folder: read as a Hub id
    with pytest.raises(DataError) as e:
        load_splits(load_params(tmp_path / "params.yaml"))
    assert f"There is no local folder {str(tmp_path.resolve() / 'data' / 'rt')!r} either." in str(e.value)


def test_a_mistyped_local_folder_is_named_when_the_hub_has_no_such_dataset(monkeypatch, tmp_path):
    import datasets
    from datasets.exceptions import DatasetNotFoundError

    def not_on_the_hub(name, *args, **kwargs):  # what an online Hub answers for an unknown id
        raise DatasetNotFoundError(f"Dataset '{name}' doesn't exist on the Hub or cannot be accessed.")

    monkeypatch.setattr(datasets, "load_dataset", not_on_the_hub)
    (tmp_path / "params.yaml").write_text("data:\n  source: data/rt\n")
    with pytest.raises(DataError) as e:
        load_splits(load_params(tmp_path / "params.yaml"))
    msg = str(e.value)
    assert "Could not load dataset 'data/rt' from the Hub (DatasetNotFoundError" in msg
    assert f"There is no local folder {str(tmp_path.resolve() / 'data' / 'rt')!r} either." in msg


def test_missing_local_checkpoint(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_tokenizer(str(tmp_path / "no-model"))


def test_source_relative_to_params_file(tmp_path, tiny_data_dir, monkeypatch):
    shutil.copytree(tiny_data_dir, tmp_path / "project" / "rt")
    (tmp_path / "project" / "params.yaml").write_text("data:\n  source: rt\n")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # so `rt` resolves against the params file, not the working folder
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # were it read as a Hub id, fail at once
    assert load_splits(load_params(tmp_path / "project" / "params.yaml")).num_rows["test"] == 12


def test_report_counts_duplicates_and_leaks(folder):
    write_jsonl(folder / "train.jsonl", [*GOOD, GOOD[0]])
    write_jsonl(folder / "test.jsonl", [GOOD[1], {"text": "new", "label": 1}])
    r = data_report(load_local_splits(folder))
    assert r["rows"] == {"train": 3, "validation": 2, "test": 2}
    assert r["duplicates"]["train"] == 1
    assert r["shared_between_splits"] == {"train/validation": 2, "train/test": 1, "validation/test": 1}


def test_sample_keeps_both_classes(tiny_data_dir):
    dsd = sample_splits(load_local_splits(tiny_data_dir), 10, seed=1)
    assert dsd.num_rows == {"train": 10, "validation": 10, "test": 10}
    assert set(dsd["train"]["label"]) == {0, 1}


def test_tokenize_truncates_and_records_true_length(tiny_data_dir, tiny_model_dir):
    dsd = load_local_splits(tiny_data_dir)
    tok = tokenize_splits(dsd, load_tokenizer(str(tiny_model_dir)), max_length=6)
    assert {"input_ids", "attention_mask", "n_tokens", "text", "label"} <= set(tok["train"].column_names)
    assert max(len(x) for x in tok["train"]["input_ids"]) == 6
    assert max(tok["train"]["n_tokens"]) > 6
    summary = token_summary(tok, max_length=6)
    assert 0 < summary["truncated_fraction"] <= 1 and summary["p50"] <= summary["p99"] <= summary["max"]
    hist = token_histogram(tok)
    assert list(hist.columns) == ["tokens", "train", "validation", "test"]
    assert hist[["train", "validation", "test"]].sum().tolist() == [32, 12, 12]


@pytest.fixture
def hub_out_of_reach(monkeypatch):
    "The Hub's endpoint on a loopback port that nothing listens on, outside offline mode and without a proxy."
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", *PROXY_VARS):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")


def spy_on_from_pretrained(monkeypatch, cls) -> list[dict]:
    "Record the keyword arguments of every `cls.from_pretrained` call, then make the call."
    calls, real = [], cls.from_pretrained

    def spy(name, *args, **kwargs):
        calls.append(kwargs)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(cls, "from_pretrained", spy)
    return calls


def test_an_unreachable_hub_is_not_retried_for_the_tokenizer(hub_out_of_reach, monkeypatch):
    from transformers import AutoTokenizer

    calls = spy_on_from_pretrained(monkeypatch, AutoTokenizer)
    with pytest.raises(DataError, match="(?s)Could not reach the Hugging Face Hub.*model.checkpoint"):
        load_tokenizer("distilbert-base-uncased")
    assert calls == [{"local_files_only": True}]  # the cache or nothing: no minute of retries


def test_an_unreachable_hub_is_not_retried_for_the_model(hub_out_of_reach, monkeypatch):
    from transformers import AutoModelForSequenceClassification

    from sentiment_nb.train import load_model

    calls = spy_on_from_pretrained(monkeypatch, AutoModelForSequenceClassification)
    with pytest.raises(DataError, match="Could not reach the Hugging Face Hub to download model"):
        load_model("distilbert-base-uncased")
    assert [c.get("local_files_only") for c in calls] == [True]


def test_a_local_checkpoint_never_probes_the_hub(tiny_model_dir, monkeypatch):
    import socket

    def no_network(*args, **kwargs):
        raise AssertionError("a local folder must not open a connection")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert load_tokenizer(str(tiny_model_dir)).vocab_size > 0


def test_an_unreachable_hub_still_loads_a_cached_checkpoint(hub_out_of_reach, tiny_model_dir, tmp_path):
    "A checkpoint in the Hugging Face cache loads with the Hub out of reach (in a fresh process: the cache is set at import)."
    import os
    import shutil
    import subprocess
    import sys

    repo = tmp_path / "hub" / "models--someone--tiny"
    shutil.copytree(tiny_model_dir, repo / "snapshots" / "abc123")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    code = ("from sentiment_nb.data import load_tokenizer; from sentiment_nb.train import load_model; "
            "print(load_tokenizer('someone/tiny').vocab_size, load_model('someone/tiny').config.id2label)")
    p = subprocess.run([sys.executable, "-c", code], env={**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub")},
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    vocab, labels = p.stdout.split(" ", 1)
    assert int(vocab) > 0 and "positive" in labels
