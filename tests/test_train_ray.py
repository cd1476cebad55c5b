"""Ray Train: `train.num_workers: 2` runs real DDP (gloo, on CPUs) on a local Ray or on an existing cluster,
and leaves the same files as a single-process run."""
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from helpers import FIXTURE_DATA, smoke_params, write_params

from sentiment_nb.config import load_params
from sentiment_nb.data import load_splits, load_tokenizer, tokenize_splits
from sentiment_nb.train import steps_per_epoch, train

pytestmark = pytest.mark.slow

N_TRAIN = 32  # sentences in the fixture's train split


def prepared_settings(folder: Path, tiny_model_dir: Path, **train_params):
    "Smoke settings in `folder` with `train_params`, and the fixture data prepared there."
    s = load_params(write_params(folder / "params.yaml", smoke_params(FIXTURE_DATA, tiny_model_dir, train=train_params)))
    tok = load_tokenizer(s.model.checkpoint)
    tokenize_splits(load_splits(s), tok, s.data.max_length).save_to_disk(str(s.path("prepared")))
    return s


def output_files(s) -> dict:
    "The relative paths of the files the `train` stage leaves in each of its outputs."
    return {name: sorted(str(p.relative_to(s.path(name))) for p in s.path(name).rglob("*") if p.is_file())
            for name in ("best_model", "train_live", "checkpoints")}


@pytest.fixture(scope="module")
def single(tmp_path_factory, tiny_model_dir):
    "A single-process run: 1 worker, batch 8."
    s = prepared_settings(tmp_path_factory.mktemp("single"), tiny_model_dir, batch_size=8, num_workers=1)
    return s, train(s)


def check_two_worker_run(s, summary, single):
    s1, one = single
    assert summary["num_workers"] == 2 and summary["device"] == "cpu"
    assert output_files(s) == output_files(s1)  # downstream stages cannot tell the difference
    cfg = json.loads((s.path("best_model") / "config.json").read_text())
    assert cfg["id2label"] == {"0": "negative", "1": "positive"}
    live = json.loads((s.path("train_live") / "metrics.json").read_text())
    assert live["best_validation"] == summary["best_validation"]
    for key in ("accuracy", "f1"):
        assert 0 <= summary["best_validation"][key] <= 1, key
    assert summary["best_validation"]["loss"] > 0
    # 2 workers × batch 4 take the same steps as 1 worker × batch 8: the same sentences per epoch
    epochs = int(s.train.epochs)
    assert one["global_step"] == steps_per_epoch(N_TRAIN, s1.train) * epochs
    assert summary["global_step"] == steps_per_epoch(N_TRAIN, s.train) * epochs == one["global_step"]
    assert summary["global_step"] * summary["num_workers"] * s.train.batch_size == one["global_step"] * s1.train.batch_size
    assert summary["ray"]["best_checkpoint_eval_accuracy"] == pytest.approx(summary["best_validation"]["accuracy"])


def test_two_workers_on_a_local_ray(tmp_path, tiny_model_dir, single, monkeypatch):
    import ray

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    s = prepared_settings(tmp_path, tiny_model_dir, batch_size=4, num_workers=2)
    summary = train(s)
    check_two_worker_run(s, summary, single)
    assert summary["ray"]["address"] == "local"
    assert not ray.is_initialized()  # the local Ray it started is shut down


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def pids_of(marker: str) -> list[int]:
    "The processes whose command line mentions `marker` (the head's own temp dir): this Ray instance only."
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            try:
                if marker in (proc / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(proc.name))
            except OSError:
                pass
    return pids


def stop_pids(marker: str, grace: float = 5) -> None:
    for pid in pids_of(marker):
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.time() + grace
    while pids_of(marker) and time.time() < deadline:
        time.sleep(0.5)
    for pid in pids_of(marker):  # gcs_server can ignore SIGTERM
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.time() + 10
    while pids_of(marker) and time.time() < deadline:  # SIGKILL is delivered, not waited for
        time.sleep(0.2)


@pytest.fixture
def ray_head():
    "A Ray head on loopback, as `ray start --head` starts a cluster; stopped by its own PIDs (never `ray stop`)."
    temp_dir = tempfile.mkdtemp(prefix="rayhead-", dir="/tmp")  # short: Ray's socket paths live in it
    port = free_port()
    ports = ["--ray-client-server-port", "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
             "--runtime-env-agent-port", "--metrics-export-port", "--node-manager-port", "--object-manager-port"]
    cmd = [str(Path(sys.executable).parent / "ray"), "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1",
           "--num-cpus=2", "--include-dashboard=false", f"--temp-dir={temp_dir}",
           *[f"{opt}={free_port()}" for opt in ports]]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "RAY_AUTH_MODE": "disabled"})
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        yield f"127.0.0.1:{port}", temp_dir
    finally:
        stop_pids(temp_dir)
        left = pids_of(temp_dir)
        assert not left, [Path(f"/proc/{pid}/cmdline").read_bytes()[:200] for pid in left]
        subprocess.run(["rm", "-rf", temp_dir])


def test_two_workers_on_an_existing_cluster(tmp_path, tiny_model_dir, single, ray_head, monkeypatch):
    import ray

    address, _ = ray_head
    monkeypatch.setenv("RAY_ADDRESS", address)
    s = prepared_settings(tmp_path, tiny_model_dir, batch_size=4, num_workers=2)
    summary = train(s)
    check_two_worker_run(s, summary, single)
    assert summary["ray"]["address"] == address
    assert not ray.is_initialized()  # disconnected; the cluster itself keeps running

    # the run's job and its actors (the Train controller and the 2 workers) are in that cluster's records
    ray.init(address=address, log_to_driver=False)
    try:
        from ray._private.state import actors, jobs  # the GCS tables: no dashboard needed

        names = [a.get("ActorClassName") or "" for a in actors().values()]
        assert sum("RayTrainWorker" in n for n in names) == 2, names
        assert any("TrainController" in n for n in names), names
        assert len(jobs()) >= 2  # the training run's driver, and this one
    finally:
        ray.shutdown()
