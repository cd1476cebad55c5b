"""Monitoring (`sentiment_nb.features`, `sentiment_nb.monitor`, `sentiment-nb monitor` / `reference`): each signal, each
kind of shift, the false-alarm rate of the correction, and each bad input with its message. The end-to-end check on a
running server's own logs is in test_serve_e2e.py."""
import json
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from helpers import REPO, fixture_texts

from sentiment_nb.features import FEATURES, text_features
from sentiment_nb.model_dir import REFERENCE_FILE, model_version
from sentiment_nb.monitor import (
    EXIT_CODES,
    MIN_WINDOW,
    SIGNALS,
    MonitorError,
    compare,
    load_reference,
    pick_window,
    read_request_logs,
    read_traffic_file,
    traffic_frame,
    write_reference,
)

PRODUCT_REVIEWS = ["the battery drains overnight and the charger overheats within minutes of plugging it in",
                   "shipping took three weeks , the box arrived crushed and customer support never answered",
                   "great headphones : crisp treble , deep bass , comfortable earcups 🎧👍",
                   "firmware update bricked my router ; refund requested twice , no reply"]


# --- the features ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_each_feature_moves_with_its_kind_of_text(tokenizer):
    known = fixture_texts()[:20]
    f_known = text_features(tokenizer, known)
    f_other = text_features(tokenizer, PRODUCT_REVIEWS)
    assert list(f_known) == list(FEATURES) and all(len(v) == len(known) for v in f_known.values())
    assert np.mean(f_other["n_tokens"]) > 2 * np.mean(f_known["n_tokens"])  # longer texts
    assert np.mean(f_other["split_share"]) > np.mean(f_known["split_share"]) + 0.2  # words the vocabulary lacks
    assert text_features(tokenizer, ["🎬 🍿"])["unk_share"] == [1.0] and f_known["unk_share"] == [0.0] * len(known)


def test_the_onnx_predictors_tokenizer_gives_the_same_features(tokenizer, tiny_model_dir):
    from tokenizers import Tokenizer

    rust = Tokenizer.from_file(str(tiny_model_dir / "tokenizer.json"))
    texts = fixture_texts()[:10] + PRODUCT_REVIEWS
    assert text_features(rust, texts) == text_features(tokenizer, texts)


# --- the comparison -------------------------------------------------------------------------------------------------

def profiles(n, positive=0.5, tokens=20, split=1 / 20, seed=0):
    "Synthetic per-text profiles, as replicas log them."
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"label": np.where(rng.random(n) < positive, "positive", "negative"),
                         "confidence": rng.beta(5, 1, n).round(4), "n_tokens": rng.poisson(tokens, n),
                         "unk_share": (rng.random(n) < 0.02) * 0.1,
                         "split_share": rng.beta(1, 1 / split - 1, n).round(4)})


REFERENCE = profiles(2000, seed=1)


@pytest.mark.parametrize("shift, kw, signals", [
    ("a flipped label share", {"positive": 0.2}, {"label"}),
    ("longer texts", {"tokens": 26}, {"n_tokens"}),
    ("another domain's words", {"split": 1 / 5}, {"split_share"}),
])
def test_each_kind_of_shift_is_found_on_its_signal(shift, kw, signals):
    _, summary = compare(REFERENCE, profiles(500, seed=7, **kw))
    assert summary["verdict"] == "drift" and set(summary["drifted"]) == signals, (shift, summary["drifted"])
    by_name = {s["signal"]: s for s in summary["signals"]}
    assert set(by_name) == set(SIGNALS)
    assert all(s["statistic"] < s["threshold"] for name, s in by_name.items() if name in signals)


@pytest.mark.slow  # 60 Evidently runs
def test_windows_from_the_reference_distribution_raise_at_most_5_percent_false_alarms():
    alarms = sum(compare(REFERENCE, profiles(MIN_WINDOW, seed=100 + i))[1]["verdict"] == "drift" for i in range(60))
    assert alarms <= 3, alarms  # each of the 5 tests at 0.01: without the correction, about 1 window in 5 would


def test_a_window_below_the_minimum_is_too_small_to_judge():
    _, summary = compare(REFERENCE, profiles(MIN_WINDOW - 1, positive=0.1, seed=3))
    assert summary["verdict"] == "too small" and summary["window"] == MIN_WINDOW - 1
    assert EXIT_CODES["too small"] not in (EXIT_CODES["drift"], EXIT_CODES["no drift"], 2)


# --- bad input ------------------------------------------------------------------------------------------------------

def record(labels, version="sha256:aaaa", **per):
    n = len(labels)
    return {"event": "predict", "status": 200, "n_texts": n, "model_version": version, "backend": "torch",
            "per_text": {"label": labels, "confidence": [0.9] * n, "n_tokens": [8] * n, "unk_share": [0.0] * n,
                         "split_share": [0.1] * n, **per}}


def write_log(folder, lines, name="replica_sentiment_SentimentAPI_a1.log"):
    folder.mkdir(exist_ok=True)
    (folder / name).write_text("".join(f"INFO 2026-12-07 12:00:00,000 replica.py:10 -- {x}\n" for x in lines))
    return folder


def test_a_missing_or_empty_log_folder_says_which_and_what_to_pass(tmp_path):
    with pytest.raises(MonitorError, match="does not exist. Pass --logs"):
        read_request_logs(tmp_path / "nope")
    with pytest.raises(MonitorError, match="has no request logs"):
        read_request_logs(tmp_path)


def test_corrupt_and_truncated_lines_are_skipped_and_counted(tmp_path):
    good = json.dumps(record(["positive", "negative"]))
    logs = write_log(tmp_path / "logs", [good, good[:40], "no json at all", good[:-1],
                                         json.dumps(record(["positive"], confidence=[0.9, 0.8]))])
    records, read = read_request_logs(logs)
    assert read == {"log_files": 1, "records": 2, "corrupt_lines": 2}
    frame, skipped = traffic_frame(records)
    assert len(frame) == 2 and skipped == {"records_without_features": 1}  # lists that do not line up


def test_a_window_with_no_records_says_so(tmp_path):
    frame, _ = traffic_frame([{"event": "predict", "status": 200, "n_texts": 1}])  # a server without features
    with pytest.raises(MonitorError, match="The traffic has no records: send requests"):
        pick_window(frame, "sha256:aaaa")


def test_records_of_two_models_in_one_window_are_refused_with_both_named():
    frame, _ = traffic_frame([record(["positive"] * 3), record(["negative"] * 2, version="sha256:bbbb")])
    with pytest.raises(MonitorError, match=r"2 models \(sha256:aaaa: 3 texts, sha256:bbbb: 2 texts\).*--model-version"):
        pick_window(frame, "sha256:aaaa")
    assert len(pick_window(frame, "sha256:bbbb", version="sha256:bbbb")) == 2
    with pytest.raises(MonitorError, match="answered by model sha256:bbbb, but the reference is of model sha256:aaaa"):
        pick_window(frame, "sha256:aaaa", version="sha256:bbbb")


@pytest.fixture(scope="module")
def referenced_model(tiny_model_dir, tmp_path_factory):
    "A copy of the tiny model with the reference of the fixture sentences (what `export` writes)."
    model = tmp_path_factory.mktemp("referenced") / "model"
    shutil.copytree(tiny_model_dir, model)
    write_reference(model, fixture_texts(), backend="torch")
    return model


def test_the_reference_holds_the_answers_and_features_of_each_sentence(referenced_model):
    reference, meta = load_reference(referenced_model)
    assert list(reference.columns) == ["text", *SIGNALS] and len(reference) == len(fixture_texts())
    assert meta == {"model_version": model_version(referenced_model), "backend": "torch"}
    assert reference["confidence"].between(0.5, 1).all() and set(reference["label"]) <= {"negative", "positive"}


def test_a_traffic_file_without_a_text_column_names_its_columns(tmp_path, referenced_model):
    pd.DataFrame({"id": [1], "review": ["fun"]}).to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(MonitorError, match=r"has no column 'text'; its columns are 'id', 'review'. Pass --text-column"):
        read_traffic_file(tmp_path / "t.csv", referenced_model)
    frame, read = read_traffic_file(tmp_path / "t.csv", referenced_model, text_column="review")
    assert len(frame) == 1 and read == {"rows": 1, "rows_without_text": 0}


# --- the commands ---------------------------------------------------------------------------------------------------

def cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-c", "import sys; from sentiment_nb.cli import main; sys.exit(main())",
                           *map(str, args)], capture_output=True, text=True, timeout=timeout, cwd=REPO)


def test_a_model_without_a_reference_gets_the_one_command_that_makes_it(tmp_path, tiny_model_dir):
    pd.DataFrame({"text": fixture_texts()}).to_json(tmp_path / "t.jsonl", orient="records", lines=True)
    r = cli("monitor", "--traffic", tmp_path / "t.jsonl", "--model", tiny_model_dir, "--out", tmp_path / "out")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "has no reference profile (reference.parquet)" in r.stderr
    assert f"sentiment-nb reference --model {tiny_model_dir}" in r.stderr
    copy = tmp_path / "model"
    shutil.copytree(tiny_model_dir, copy)
    made = cli("reference", "--model", copy, "--data", tmp_path / "t.jsonl")
    assert made.returncode == 0 and f"{len(fixture_texts())} sentences" in made.stdout, made.stderr
    assert (copy / REFERENCE_FILE).is_file()


@pytest.mark.slow  # three command starts with Evidently
def test_monitor_exits_with_its_verdict_and_writes_the_report(tmp_path, referenced_model):
    same = tmp_path / "same.jsonl"
    pd.DataFrame({"text": fixture_texts() * 4}).to_json(same, orient="records", lines=True)
    shifted = tmp_path / "shifted.parquet"
    pd.DataFrame({"text": PRODUCT_REVIEWS * 60}).to_parquet(shifted)
    runs = {name: cli("monitor", "--traffic", f, "--model", referenced_model, "--out", tmp_path / name, *extra)
            for name, f, extra in [("same", same, []), ("shifted", shifted, []), ("small", same, ["--window", "20"])]}
    assert [runs[n].returncode for n in ("same", "shifted", "small")] == [0, 1, 3], {n: r.stderr[-2000:] for n, r in runs.items()}
    assert "no drift" in runs["same"].stdout and "DRIFT in" in runs["shifted"].stdout
    assert "too small to judge (20 texts" in runs["small"].stdout
    summary = json.loads((tmp_path / "shifted" / "summary.json").read_text())
    assert {"n_tokens", "split_share", "text"} <= set(summary["drifted"]) and summary["with_text"]
    assert (tmp_path / "shifted" / "report.html").stat().st_size > 100_000  # Evidently's self-contained page
    assert pd.read_csv(tmp_path / "shifted" / "signals.csv")["signal"].tolist() == [s["signal"] for s in summary["signals"]]
