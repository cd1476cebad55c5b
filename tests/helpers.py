"""Test fixtures that the tests build themselves: a tiny BERT classifier and smoke params."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
FIXTURE_DATA = REPO / "tests" / "fixtures" / "tiny_rt"


# lengths from 1 to ~20 tokens, deliberately not sorted, with repeats: for order and batching checks
MIXED_TEXTS = ["a gorgeous , witty , seductive movie that never lets up", "bad", "dull and far too long",
               "the acting is superb and the story moves along at a good pace for two hours", "fun", "bad",
               "a mess", "not bad at all , really"]


def fixture_texts() -> list[str]:
    return [json.loads(line)["text"] for f in sorted(FIXTURE_DATA.glob("*.jsonl")) for line in f.open()]


def build_tiny_model(out: Path, seed: int = 0) -> Path:
    """A 2-layer, 32-wide BERT classifier whose WordPiece tokenizer is trained on the fixture text.

    Saved with `save_pretrained`, so the tests load it through the real `from_pretrained(path)` path.
    """
    import torch
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    wp = BertWordPieceTokenizer(lowercase=True)
    wp.train_from_iterator(fixture_texts(), vocab_size=300, min_frequency=1,
                           special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    tokenizer = BertTokenizerFast(tokenizer_object=wp._tokenizer, unk_token="[UNK]", pad_token="[PAD]",
                                  cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]", model_max_length=128)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, num_labels=2,
                        id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1})
    torch.manual_seed(seed)
    BertForSequenceClassification(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


TEST_METRICS = {"n": 100, "accuracy": 0.85, "f1": 0.85, "ece": 0.03,
                "negative": {"precision": 0.85, "recall": 0.85}, "positive": {"precision": 0.85, "recall": 0.85}}


def backend_scores(torch=0.85, onnx=0.85, int8=0.845) -> dict:
    "Per-backend test scores as the evaluate stage records them."
    return {"torch": {"accuracy": torch, "f1": torch, "agreement": 1.0, "max_prob_diff": 0.0},
            "onnx": {"accuracy": onnx, "f1": onnx, "agreement": 1.0, "max_prob_diff": 1e-6},
            "onnx-int8": {"accuracy": int8, "f1": int8, "agreement": 0.98, "max_prob_diff": 0.05}}


def export_with_onnx(model_dir: Path, onnx_dir: Path, root: Path) -> Path:
    "The `export` stage's model/ in project folder `root`: `model_dir`'s weights, `onnx_dir`'s graphs, recorded scores."
    from sentiment_nb.config import load_params
    from sentiment_nb.export import write_export

    shutil.copytree(model_dir, root / "artifacts/train/best_model")
    shutil.copytree(onnx_dir, root / "artifacts/onnx")
    (root / "eval").mkdir()
    (root / "eval/metrics.json").write_text(json.dumps({**TEST_METRICS, "backends": backend_scores()}))
    (root / "params.yaml").write_text("{}\n")
    return write_export(load_params(root / "params.yaml"), onnx=True)


def committed_params_text() -> str:
    "params.yaml as committed: `dvc exp run -S` writes its overrides into the workspace copy."
    shown = subprocess.run(["git", "show", "HEAD:./params.yaml"], cwd=REPO, capture_output=True, text=True)
    return shown.stdout if shown.returncode == 0 else (REPO / "params.yaml").read_text()


def smoke_params(data_dir: Path, checkpoint: Path, **sections) -> dict:
    """A params file that runs the whole pipeline in seconds on the fixtures."""
    params = yaml.safe_load(committed_params_text())
    params["data"].update(source=str(data_dir), max_length=32, limit=None)
    params["model"]["checkpoint"] = str(checkpoint)
    params["train"].update(batch_size=8, eval_batch_size=16, epochs=4, learning_rate=1e-3, warmup_ratio=0.0,
                           eval_steps=0.25, logging_steps=0.0625)
    params["evaluate"].update(batch_size=16, worst_examples=3)
    for section, values in sections.items():
        params[section].update(values)
    return params


def write_params(path: Path, params: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def copy_repo(dest: Path) -> Path:
    """Copy the working tree (tracked and untracked, not ignored files) into `dest` as a fresh git repo."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           cwd=REPO, capture_output=True, text=True, check=True).stdout.split("\0")
    for f in filter(None, files):
        src = REPO / f
        if src.is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / f)
    git(dest, "init", "-q", "-b", "main")
    git(dest, "add", "-A")
    git(dest, "commit", "-qm", "copy")
    return dest


def free_port() -> int:
    "A TCP port on the loopback that nothing listens on now."
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def git(cwd: Path, *args: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    return subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True, check=True).stdout


def run(cmd: list[str], cwd: Path, timeout: int = 900, check: bool = True) -> subprocess.CompletedProcess:
    """Run `cmd`; on failure show its output, so that a failing pipeline explains itself."""
    p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {p.returncode}\n--- stdout\n{p.stdout[-6000:]}\n--- stderr\n{p.stderr[-6000:]}")
    return p
