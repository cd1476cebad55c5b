"""sentiment_nb.predict on the tiny (untrained) model: shapes, order, batching, and every error message."""
import itertools
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from helpers import MIXED_TEXTS

from sentiment_nb.predict import (
    InputError,
    ModelDirError,
    Predictor,
    check_model_dir,
    check_texts,
    length_chunks,
    predict,
)

TEXTS = MIXED_TEXTS


@pytest.fixture(scope="module")
def predictor(sharp_model_dir):
    return Predictor(sharp_model_dir, device="cpu", batch_size=3)


def test_labels_come_from_the_model(predictor):
    assert predictor.labels == ["negative", "positive"]
    assert not predictor.model.training


def test_probabilities_sum_to_one_and_match_label(predictor):
    res = predictor.predict(TEXTS)
    assert len(res) == len(TEXTS)
    for r in res:
        assert set(r) == {"label", "score", "probabilities"}
        assert list(r["probabilities"]) == ["negative", "positive"]
        assert sum(r["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        assert r["label"] == max(r["probabilities"], key=r["probabilities"].get)
        assert r["score"] == r["probabilities"][r["label"]]
        assert isinstance(r["score"], float)
    json.dumps(res)  # plain Python types: servable as JSON


def test_batch_equals_one_by_one_and_order_is_kept(predictor):
    batched = predictor.predict_proba(TEXTS)
    alone = np.stack([predictor.predict_proba([t])[0] for t in TEXTS])
    np.testing.assert_allclose(batched, alone, atol=1e-5)
    # the same texts, reversed: each row follows its text
    np.testing.assert_allclose(predictor.predict_proba(TEXTS[::-1]), batched[::-1], atol=1e-5)
    # identical texts get identical rows
    np.testing.assert_allclose(batched[1], batched[5], atol=1e-6)
    # different texts do not all get the same row (a mixed-up order would go unseen otherwise)
    assert np.ptp(batched[:, 1]) > 1e-3  # 100x the tolerance above


def test_batch_size_does_not_change_results(predictor):
    np.testing.assert_allclose(predictor.predict_proba(TEXTS, batch_size=1),
                               predictor.predict_proba(TEXTS, batch_size=len(TEXTS)), atol=1e-5)


def cut_cost(lengths, chunks, pass_cost):
    return sum(pass_cost + (end - start) * lengths[end - 1] for start, end in chunks)


def all_cuts(n, max_batch):
    "Every way to cut n texts into contiguous passes of at most max_batch."
    if n == 0:
        yield []
        return
    for last in range(1, min(max_batch, n) + 1):
        for head in all_cuts(n - last, max_batch):
            yield [*head, (n - last, n)]


@pytest.mark.parametrize("max_batch,pass_cost", [(1, 35), (3, 0), (3, 35), (4, 7.5), (8, 35), (8, 200)])
def test_length_chunks_finds_the_cheapest_cut(max_batch, pass_cost):
    rng = np.random.default_rng(max_batch)
    for _ in range(40):
        lengths = sorted(rng.integers(3, 70, size=rng.integers(1, 9)).tolist())
        chunks = length_chunks(lengths, max_batch, pass_cost)
        # contiguous passes that cover every text once, none over max_batch
        assert chunks[0][0] == 0 and chunks[-1][1] == len(lengths)
        assert all(a[1] == b[0] for a, b in itertools.pairwise(chunks))
        assert all(0 < end - start <= max_batch for start, end in chunks)
        cheapest = min(cut_cost(lengths, c, pass_cost) for c in all_cuts(len(lengths), max_batch))
        assert cut_cost(lengths, chunks, pass_cost) == pytest.approx(cheapest), (lengths, chunks)


def test_length_chunks_without_a_pass_cost_cuts_every_max_batch():
    assert length_chunks([1, 2, 3, 4, 5], 2, None) == [(0, 2), (2, 4), (4, 5)]


@pytest.mark.parametrize("pass_cost", [0, 35, None])
def test_how_a_batch_is_cut_does_not_change_results(predictor, pass_cost):
    alone = np.stack([predictor.predict_proba([t])[0] for t in TEXTS])
    predictor.pass_cost = pass_cost
    try:
        np.testing.assert_allclose(predictor.predict_proba(TEXTS, batch_size=4), alone, atol=1e-5)
    finally:
        predictor.pass_cost = type(predictor).pass_cost


def test_a_cpu_predictor_stores_linear_weights_column_major_and_gives_the_same_logits(sharp_model_dir, predictor):
    import torch
    from transformers import AutoModelForSequenceClassification

    linears = [m for m in predictor.model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(m.weight.t().is_contiguous() and not m.weight.is_contiguous() for m in linears)
    plain = AutoModelForSequenceClassification.from_pretrained(sharp_model_dir).eval()
    assert next(m for m in plain.modules() if isinstance(m, torch.nn.Linear)).weight.is_contiguous()
    with torch.inference_mode():
        for text in TEXTS:  # one at a time: no padding, so the two must agree to rounding
            enc = predictor.tokenizer([text], return_tensors="pt")
            np.testing.assert_allclose(predictor.predict_logits([text])[0], plain(**enc).logits[0].numpy(),
                                       rtol=1e-4, atol=1e-4)


def test_long_text_is_truncated(tiny_model_dir):
    p = Predictor(tiny_model_dir, device="cpu", max_length=8)
    assert p.predict_proba(["word " * 500]).shape == (1, 2)


def test_predict_caches_one_predictor(tiny_model_dir):
    from sentiment_nb import predict as mod

    mod._PREDICTORS.clear()
    a = predict("a gorgeous film", model_dir=tiny_model_dir, device="cpu")
    b = predict(["a gorgeous film", "dull"], model_dir=str(tiny_model_dir), device="cpu")
    assert len(mod._PREDICTORS) == 1
    assert a[0]["probabilities"] == pytest.approx(b[0]["probabilities"], abs=1e-5)


def test_predict_loads_the_model_again_once_its_folder_is_rewritten(tiny_model_dir, tmp_path):
    from helpers import build_tiny_model

    d = shutil.copytree(tiny_model_dir, tmp_path / "model")
    before = [r["score"] for r in predict(TEXTS, model_dir=d, device="cpu")]
    build_tiny_model(d, seed=1)  # a new export into the same folder
    after = [r["score"] for r in predict(TEXTS, model_dir=d, device="cpu")]
    assert after == pytest.approx([r["score"] for r in Predictor(d, device="cpu").predict(TEXTS)], abs=1e-7)
    assert after != pytest.approx(before, abs=1e-6)


@pytest.mark.parametrize("texts, message", [
    ([], "No texts given"),
    (["fine", 3], "Text 1 is int"),
    (["fine", None], "Text 1 is NoneType"),
    (["fine", "good", "   "], "Text 2 is empty or only whitespace"),
    ("", "Text 0 is empty"),
    ({"text": "x"}, "got dict"),
    (42, "got int"),
])
def test_bad_texts(texts, message):
    with pytest.raises(InputError, match=message):
        check_texts(texts)


def test_check_texts_accepts_a_string_or_a_list():
    assert check_texts("one") == ["one"]
    assert check_texts(("a", "b")) == ["a", "b"]


def test_predictor_checks_texts(predictor):
    with pytest.raises(InputError, match="Text 1 is empty"):
        predictor.predict(["ok", ""])


def test_missing_model_dir(tmp_path):
    with pytest.raises(ModelDirError) as e:
        check_model_dir(tmp_path / "model")
    msg = str(e.value)
    assert str(tmp_path / "model") in msg and "does not exist" in msg
    assert "dvc repro" in msg and "dvc pull" in msg and "--model" in msg


@pytest.mark.parametrize("remove, message", [
    ("config.json", "no config.json"),
    ("model.safetensors", "no weights (model.safetensors)"),
    ("tokenizer.json", "no tokenizer files"),
])
def test_incomplete_model_dir(tiny_model_dir, tmp_path, remove, message):
    d = shutil.copytree(tiny_model_dir, tmp_path / "m")
    for f in [remove, "vocab.txt"] if remove == "tokenizer.json" else [remove]:
        (d / f).unlink(missing_ok=True)
    with pytest.raises(ModelDirError) as e:
        Predictor(d, device="cpu")
    assert message in str(e.value) and str(d) in str(e.value) and "dvc repro" in str(e.value)


def test_old_weights_format_is_named(tiny_model_dir, tmp_path):
    d = shutil.copytree(tiny_model_dir, tmp_path / "m")
    (d / "model.safetensors").rename(d / "pytorch_model.bin")
    with pytest.raises(ModelDirError, match="it has pytorch_model.bin"):
        check_model_dir(d)


def test_model_path_is_a_file(tmp_path):
    (tmp_path / "model").write_text("")
    with pytest.raises(ModelDirError, match="is a file"):
        check_model_dir(tmp_path / "model")


def test_import_does_not_load_torch():
    code = "import sys, sentiment_nb.predict; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
