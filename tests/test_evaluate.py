"""sentiment_nb.evaluate: metrics on known predictions, calibration by hand, and the plot files' shapes."""
import json

import numpy as np
import pandas as pd
import pytest

from sentiment_nb.evaluate import (
    check_labels,
    confidence_histogram,
    confusion_rows,
    evaluate_model,
    reliability_rows,
    worst_examples,
    write_outputs,
)
from sentiment_nb.metrics import calibration_table, compute_metrics, expected_calibration_error
from sentiment_nb.predict import Predictor

NAMES = ["negative", "positive"]
# true labels and probabilities chosen so that every count below can be done by hand
LABELS = np.array([0, 0, 0, 1, 1, 1, 1, 0])
PROBS = np.array([[0.95, 0.05],  # right, conf .95
                  [0.85, 0.15],  # right, conf .85
                  [0.30, 0.70],  # wrong, conf .70 -> predicted positive
                  [0.10, 0.90],  # right, conf .90
                  [0.45, 0.55],  # right, conf .55
                  [0.62, 0.38],  # wrong, conf .62 -> predicted negative
                  [0.20, 0.80],  # right, conf .80
                  [0.08, 0.92]])  # wrong, conf .92 -> predicted positive


def test_metrics_on_known_predictions():
    m = compute_metrics(LABELS, PROBS, NAMES, bins=10)
    # predictions: 0 0 1 1 1 0 1 1 ; truth: 0 0 0 1 1 1 1 0
    assert m["n"] == 8
    assert m["accuracy"] == pytest.approx(5 / 8)
    # positive: tp=3 (rows 3,4,6), fp=2 (rows 2,7), fn=1 (row 5)
    assert m["positive"] == pytest.approx({"precision": 3 / 5, "recall": 3 / 4})
    # negative: tp=2 (rows 0,1), fp=1 (row 5), fn=2 (rows 2,7)
    assert m["negative"] == pytest.approx({"precision": 2 / 3, "recall": 2 / 4})
    assert m["f1"] == pytest.approx(2 * (3 / 5) * (3 / 4) / (3 / 5 + 3 / 4))
    json.dumps(m)  # plain types


def test_ece_by_hand():
    conf = PROBS.max(axis=1)
    correct = PROBS.argmax(axis=1) == LABELS
    # bins of 0.1: [.5,.6): .55 right -> |1-.55|=.45 ; [.6,.7): .62 wrong -> .62 ; [.7,.8): .70 wrong -> .70
    # [.8,.9): .85 right, .80 right -> |1-.825|=.175 x2 ; [.9,1]: .95 r, .90 r, .92 w -> |2/3 - .9233..| x3
    expected = (0.45 + 0.62 + 0.70 + 2 * 0.175 + 3 * abs(2 / 3 - (0.95 + 0.90 + 0.92) / 3)) / 8
    assert expected_calibration_error(conf, correct, bins=10) == pytest.approx(expected)
    assert compute_metrics(LABELS, PROBS, NAMES, bins=10)["ece"] == pytest.approx(expected)
    # with 2 bins everything lands in [.5, 1]: |5/8 - mean conf|
    assert expected_calibration_error(conf, correct, bins=2) == pytest.approx(abs(5 / 8 - conf.mean()))


def test_perfectly_calibrated_has_zero_ece():
    conf = np.array([0.75] * 4)
    assert expected_calibration_error(conf, [1, 1, 1, 0], bins=10) == pytest.approx(0.0)


def test_calibration_bins_edges():
    t = calibration_table([0.6, 0.7, 1.0, 0.0], [1, 1, 1, 1], bins=10)
    assert t["count"].tolist() == [1, 0, 0, 0, 0, 0, 1, 1, 0, 1]
    assert t["bin_lower"].iloc[6] == pytest.approx(0.6)


def test_plot_tables_columns():
    preds, conf = PROBS.argmax(1), PROBS.max(1)
    cm = confusion_rows(LABELS, preds, NAMES)
    assert list(cm.columns) == ["actual", "predicted"] and len(cm) == 8
    assert cm.iloc[2].tolist() == ["negative", "positive"]
    rel = reliability_rows(conf, preds == LABELS, bins=10)
    assert list(rel.columns) == ["bin_lower", "bin_upper", "confidence", "accuracy", "count"]
    assert rel["count"].sum() == 8 and (rel["count"] > 0).all()
    hist = confidence_histogram(conf, preds == LABELS, num_labels=2)
    assert list(hist.columns) == ["confidence", "correct", "wrong"]
    assert hist["confidence"].iloc[0] == "0.50-0.55" and hist["confidence"].iloc[-1] == "0.95-1.00"
    assert (hist["correct"].sum(), hist["wrong"].sum()) == (5, 3)


def test_worst_examples_order():
    texts = [f"t{i}" for i in range(8)]
    w = worst_examples(texts, LABELS, PROBS, NAMES, k=2)
    assert w["text"].tolist() == ["t7", "t2"]  # wrong at .92, then .70 (.62 is cut by k)
    assert w[["actual", "predicted"]].values.tolist() == [["negative", "positive"], ["negative", "positive"]]


def test_label_mismatch_is_refused():
    with pytest.raises(ValueError, match="id2label"):
        check_labels(["LABEL_0", "LABEL_1"], NAMES)


def test_evaluate_and_write_files(tiny_model_dir, tiny_data_dir, tmp_path):
    rows = [json.loads(line) for line in (tiny_data_dir / "test.jsonl").open()]
    texts, labels = [r["text"] for r in rows], [r["label"] for r in rows]
    result = evaluate_model(Predictor(tiny_model_dir, device="cpu"), texts, labels, NAMES, bins=10, k=3)
    paths = write_outputs(result, tmp_path / "eval")
    metrics = json.loads(paths["metrics"].read_text())
    assert set(metrics) == {"n", "accuracy", "f1", "ece", "negative", "positive"}
    assert metrics["n"] == len(rows)
    cm = pd.read_csv(tmp_path / "eval/plots/confusion.csv")
    assert list(cm.columns) == ["actual", "predicted"] and len(cm) == len(rows)
    assert (cm["actual"] == np.array(NAMES, dtype=object)[labels]).all()
    assert metrics["accuracy"] == pytest.approx((cm["actual"] == cm["predicted"]).mean())
    rel = pd.read_csv(tmp_path / "eval/plots/reliability.csv")
    assert {"confidence", "accuracy", "count"} <= set(rel.columns) and rel["count"].sum() == len(rows)
    hist = pd.read_csv(tmp_path / "eval/plots/confidence.csv")
    assert list(hist.columns) == ["confidence", "correct", "wrong"]
    assert hist[["correct", "wrong"]].to_numpy().sum() == len(rows)
    assert len(result["worst"]) <= 3
