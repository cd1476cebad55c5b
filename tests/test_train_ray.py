"""Ray Train: `train.num_workers: 2` runs real DDP (gloo, on CPUs) on a local Ray or on an existing cluster,
and leaves the same files as a single-process run. The workers get no path of the project: their inputs and
outputs travel through the run's storage (`ray.storage_path`), as on a cluster of several machines."""
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from helpers import FIXTURE_DATA, free_port, smoke_params, write_params

import sentiment_nb.train as train_mod
from sentiment_nb.config import Params, Settings, load_params
from sentiment_nb.data import DataError, load_splits, load_tokenizer, tokenize_splits
from sentiment_nb.train import (
    STAGE,
    fetch_inputs,
    run_storage,
    stage_inputs,
    steps_per_epoch,
    storage_warning,
    train,
    worker_config,
)

N_TRAIN = 32  # sentences in the fixture's train split


def prepared_settings(folder: Path, tiny_model_dir: Path, storage_path: str | None = None, **train_params):
    "Smoke settings in `folder` with `train_params` (and Ray's `storage_path`), and the fixture data prepared there."
    params = smoke_params(FIXTURE_DATA, tiny_model_dir, train=train_params, ray={"storage_path": storage_path})
    s = load_params(write_params(folder / "params.yaml", params))
    tok = load_tokenizer(s.model.checkpoint)
    tokenize_splits(load_splits(s), tok, s.data.max_length).save_to_disk(str(s.path("prepared")))
    return s


def output_files(s) -> dict:
    "The relative paths of the files the `train` stage leaves in each of its outputs."
    return {name: sorted(str(p.relative_to(s.path(name))) for p in s.path(name).rglob("*") if p.is_file())
            for name in ("best_model", "train_live", "checkpoints")}


@pytest.fixture
def worker_configs(monkeypatch):
    "Every `train_loop_config` that `train_on_ray` hands to Ray, as built by `worker_config`."
    seen = []

    def spy(*args, **kwargs):
        seen.append(worker_config(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(train_mod, "worker_config", spy)
    return seen


def assert_no_project_path(config: dict, s) -> None:
    "The workers' config names no path of the project (nor the project's params), only paths in their own folder."
    text = json.dumps(config)
    assert str(s.root) not in text and str(s.root.resolve()) not in text, text
    assert str(s.model.checkpoint) not in text  # the local base model folder is staged, not named
    ws = Settings(Params.model_validate(config["params"]), root=Path("/w"))
    for name in ("prepared", "checkpoints", "best_model", "train_live"):
        assert ws.path(name).is_relative_to("/w"), name


@pytest.fixture(scope="module")
def single(tmp_path_factory, tiny_model_dir):
    "A single-process run: 1 worker, batch 8."
    s = prepared_settings(tmp_path_factory.mktemp("single"), tiny_model_dir, batch_size=8, num_workers=1)
    return s, train(s)


def test_staged_inputs_reach_a_worker_folder_through_local_storage(tmp_path, tiny_model_dir):
    "No Ray: stage into a local storage path, fetch into a worker folder, and read them there with the worker's settings."
    import pyarrow.fs

    from sentiment_nb.data import load_prepared

    s = prepared_settings(tmp_path / "project", tiny_model_dir, num_workers=2, storage_path="../storage")
    storage, temporary = run_storage(s)
    assert (storage, temporary) == (str(tmp_path / "storage"), False)  # relative to the params file, made absolute
    ckpts, live = s.path("checkpoints"), s.path("train_live")
    for f in (ckpts / "checkpoint-2" / "trainer_state.json", ckpts / "checkpoint-4" / "trainer_state.json",
              ckpts / "fingerprint.json", live / "metrics.json"):
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text("{}")
    fs, base = pyarrow.fs.FileSystem.from_uri(storage)
    resume = str(ckpts / "checkpoint-4")
    # not the local curves: after a failed Ray run they are the last finished run's
    assert stage_inputs(s, resume, fs, f"{base}/run/{STAGE}") == ["base_model", "checkpoints", "prepared"]

    work = tmp_path / "worker"
    fetch_inputs(fs, f"{base}/run/{STAGE}", work)
    config = worker_config(s, "cpu", ["base_model", "checkpoints", "prepared"], resume, "w")
    assert_no_project_path(config, s)
    ws = Settings(Params.model_validate(config["params"]), root=work)
    assert load_prepared(ws)["train"]._fingerprint == load_prepared(s)["train"]._fingerprint  # the same splits
    assert Path(ws.local_or_hub(ws.model.checkpoint)) == work / "inputs" / "base_model"
    assert load_tokenizer(ws.local_or_hub(ws.model.checkpoint)).get_vocab() == load_tokenizer(s.model.checkpoint).get_vocab()
    assert sorted(p.name for p in ws.path("checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-4"]  # no fingerprint
    assert (work / config["resume_from"] / "trainer_state.json").is_file()
    assert not ws.path("train_live").exists()

    # a fresh run stages only the data and the model; a Hub id is not staged (each worker downloads it)
    assert stage_inputs(s, None, fs, f"{base}/fresh/{STAGE}") == ["base_model", "prepared"]
    hub = load_params(s.source, ["model.checkpoint=distilbert-base-uncased"])
    assert stage_inputs(hub, None, fs, f"{base}/hub/{STAGE}") == ["prepared"]
    assert worker_config(hub, "cpu", ["prepared"])["params"]["model"]["checkpoint"] == "distilbert-base-uncased"
    with pytest.raises(DataError, match="does not exist"):
        stage_inputs(load_params(s.source, ["model.checkpoint=./no_such_model"]), None, fs, f"{base}/bad/{STAGE}")


BROADCAST_WORKER = """
import sys, torch, torch.distributed as dist
from sentiment_nb.train import _best_model_sync
rank = int(sys.argv[1])
dist.init_process_group("gloo", init_method=sys.argv[2], rank=rank, world_size=2)
torch.manual_seed(rank)  # each rank starts with different weights, as DDP ranks do after load_best_model_at_end
model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
before = sum(float(t.sum()) for t in model.state_dict().values())
_best_model_sync().on_train_end(None, None, None, model=model)
after = sum(float(t.sum()) for t in model.state_dict().values())
print(f"{before!r} {after!r}")
dist.destroy_process_group()
"""


@pytest.mark.slow  # a two-process gloo group
def test_best_model_sync_gives_every_rank_rank_zeros_weights(tmp_path):
    store = f"file://{tmp_path / 'store'}"  # a file rendezvous, and gloo on the loopback: no port open beyond it
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo"}
    procs = [subprocess.Popen([sys.executable, "-c", BROADCAST_WORKER, str(rank), store], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    (before0, after0), (before1, after1) = (map(float, out.split()) for out, _ in outs)
    assert before1 != before0  # the ranks really differed, so the check below can fail
    assert after0 == before0 and after1 == before0


def test_storage_warning_for_a_cluster_without_shared_storage():
    assert storage_warning(None, None) is None  # a local Ray is one machine
    assert storage_warning("10.0.0.5:6379", "s3://bucket/runs") is None
    assert storage_warning("10.0.0.5:6379", "gs://bucket/runs") is None
    for local in (None, "/mnt/nfs/ray", "file:///mnt/nfs/ray"):
        assert "needs storage that every node can reach" in storage_warning("10.0.0.5:6379", local), local


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


def storage_runs(storage: Path) -> list[str]:
    return sorted(p.name for p in storage.iterdir() if p.name.startswith("sentiment-nb-train-")) if storage.exists() else []


@pytest.mark.slow
def test_two_workers_on_a_local_ray(tmp_path, tiny_model_dir, single, monkeypatch, worker_configs):
    import ray

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    s = prepared_settings(tmp_path / "project", tiny_model_dir, batch_size=4, num_workers=2)
    temp_before = set(Path(tempfile.gettempdir()).glob("sentiment-nb-ray-storage-*"))
    summary = train(s)
    check_two_worker_run(s, summary, single)
    assert summary["ray"]["address"] == "local" and summary["ray"]["storage"] == "temporary"
    assert not ray.is_initialized()  # the local Ray it started is shut down
    assert len(worker_configs) == 1
    assert_no_project_path(worker_configs[0], s)
    assert set(Path(tempfile.gettempdir()).glob("sentiment-nb-ray-storage-*")) == temp_before  # temp storage removed


def descendants_named(prefix: str) -> list[int]:
    "The processes under this one (Ray's raylet and its workers) whose command line starts with `prefix`."
    parent, cmd = {}, {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                parent[int(proc.name)] = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
                cmd[int(proc.name)] = (proc / "cmdline").read_bytes().decode(errors="replace")
            except (OSError, IndexError, ValueError):
                pass
    mine, found = {os.getpid()}, True
    while found:
        found = {pid for pid, ppid in parent.items() if ppid in mine and pid not in mine}
        mine |= found
    return sorted(pid for pid in mine if cmd.get(pid, "").startswith(prefix))


@contextlib.contextmanager
def after_the_first_checkpoint(storage: Path, action):
    "Run `action()` in a thread once Ray has recorded the run's first checkpoint in `storage`; yield what it returned."
    import threading

    got, done = [], threading.Event()

    def watch():
        deadline = time.time() + 240
        # Ray's record of the run's checkpoints: what an ended run's checkpoints are restored from
        while not list(storage.glob("sentiment-nb-train-*/checkpoint_manager_snapshot.json")):
            if time.time() > deadline or done.is_set():
                return
            time.sleep(0.2)
        got.append(action())

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        yield got
    finally:
        done.set()
        watcher.join()


def kill_a_worker() -> list[int]:
    "SIGKILL one Ray Train worker under this process; its pid, if there was one."
    pids = descendants_named("ray::RayTrainWorker")[:1]
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    return pids


@pytest.mark.slow
def test_a_failed_two_worker_run_resumes_from_its_last_checkpoint(tmp_path, tiny_model_dir, monkeypatch):
    "A Ray Train worker dies mid-run: the run fails, its checkpoints come home, and the next run resumes from them."
    from ray.train import TrainingFailedError

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    storage = tmp_path / "storage"
    s = prepared_settings(tmp_path / "project", tiny_model_dir, batch_size=4, num_workers=2, epochs=24,
                          storage_path=str(storage))
    total_steps = steps_per_epoch(N_TRAIN, s.train) * 24  # a checkpoint every quarter, and time to kill a worker
    with after_the_first_checkpoint(storage, kill_a_worker) as killed, pytest.raises(TrainingFailedError):
        train(s)
    assert killed and killed[0], "no Ray Train worker was found to kill"
    restored = sorted(int(p.name.split("-")[1]) for p in s.path("checkpoints").glob("checkpoint-*"))
    assert restored and restored[-1] < total_steps, restored  # it failed midway, with a checkpoint kept
    assert not s.path("best_model").exists()

    summary = train(s)
    assert summary["resumed_from"] == f"checkpoint-{restored[-1]}"
    assert summary["global_step"] == total_steps
    assert (s.path("best_model") / "model.safetensors").is_file()
    assert not list(s.path("checkpoints").glob("checkpoint-*"))  # the finished run leaves nothing to resume
    assert not list(storage.glob("sentiment-nb-train-*"))  # both runs' folders were removed from the storage


@pytest.mark.slow
def test_an_interrupted_two_worker_run_brings_its_checkpoints_home(tmp_path, tiny_model_dir, monkeypatch):
    "Ctrl-C in the driver during a Ray run: the checkpoints made so far come back before the run folder goes."
    import _thread

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    storage = tmp_path / "storage"
    s = prepared_settings(tmp_path / "project", tiny_model_dir, batch_size=4, num_workers=2, epochs=24,
                          storage_path=str(storage))
    # What Ctrl-C does: KeyboardInterrupt in the main thread. Ray Train aborts the run on it, then exits 1.
    with after_the_first_checkpoint(storage, _thread.interrupt_main) as interrupted, \
            pytest.raises((KeyboardInterrupt, SystemExit)):
        train(s)
    assert interrupted, "the run ended before its first checkpoint"
    assert list(s.path("checkpoints").glob("checkpoint-*")), "the interrupted run's checkpoints were lost"
    assert not list(storage.glob("sentiment-nb-train-*"))  # its run folder was still cleaned up


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
def ray_head(tmp_path_factory):
    """A Ray cluster on loopback, as `ray start` builds one: a head and a second node, 1 CPU each, so that the 2
    training workers run on different nodes. The second node has its own address (127.0.0.2, also loopback) and its
    own temporary folder (`TMPDIR`), like another machine with its own disk. Stopped by its own PIDs (never `ray stop`)."""
    temp_dir = tempfile.mkdtemp(prefix="rayhead-", dir="/tmp")  # short: Ray's socket paths live in it
    port = free_port()
    ports = ["--ray-client-server-port", "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
             "--runtime-env-agent-port", "--metrics-export-port", "--node-manager-port", "--object-manager-port"]
    ray_bin = str(Path(sys.executable).parent / "ray")
    head = [ray_bin, "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=1",
            "--include-dashboard=false", f"--temp-dir={temp_dir}", "--object-store-memory=100000000",
            *[f"{opt}={free_port()}" for opt in ports]]
    node = [ray_bin, "start", f"--address=127.0.0.1:{port}", "--node-ip-address=127.0.0.2", "--num-cpus=1",
            f"--temp-dir={temp_dir}", "--object-store-memory=100000000",
            *[f"{opt}={free_port()}" for opt in ports if opt != "--ray-client-server-port"]]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    try:
        for cmd, tmp in ((head, os.environ["TMPDIR"]), (node, str(tmp_path_factory.mktemp("other-machine-tmp")))):
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**env, "TMPDIR": tmp})
            assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        yield f"127.0.0.1:{port}", temp_dir
    finally:
        stop_pids(temp_dir)
        left = pids_of(temp_dir)
        assert not left, [Path(f"/proc/{pid}/cmdline").read_bytes()[:200] for pid in left]
        subprocess.run(["rm", "-rf", temp_dir])


@pytest.mark.slow
def test_two_workers_on_an_existing_cluster(tmp_path, tiny_model_dir, single, ray_head, monkeypatch, worker_configs,
                                            caplog):
    import ray

    address, _ = ray_head
    monkeypatch.setenv("RAY_ADDRESS", address)
    storage = tmp_path / "storage"  # stands for the shared storage (NFS, s3://) that a multi-node cluster needs
    s = prepared_settings(tmp_path / "project", tiny_model_dir, batch_size=4, num_workers=2, storage_path=str(storage))
    with caplog.at_level(logging.WARNING, logger="sentiment_nb.train"):
        summary = train(s)
    check_two_worker_run(s, summary, single)
    assert summary["ray"]["address"] == address and summary["ray"]["storage"] == str(storage)
    assert not ray.is_initialized()  # disconnected; the cluster itself keeps running
    assert_no_project_path(worker_configs[0], s)
    assert storage_runs(storage) == []  # the run's folder is gone once its outputs are in the project
    assert any("needs storage that every node can reach" in r.getMessage() for r in caplog.records)  # a local folder

    # the run's job and its actors (the Train controller and the 2 workers) are in that cluster's records
    ray.init(address=address, log_to_driver=False)
    try:
        from ray._private.state import actors, jobs  # the GCS tables: no dashboard needed

        names = [a.get("ActorClassName") or "" for a in actors().values()]
        assert sum("RayTrainWorker" in n for n in names) == 2, names
        nodes = {a["Address"]["NodeID"] for a in actors().values() if "RayTrainWorker" in (a.get("ActorClassName") or "")}
        assert len(nodes) == 2  # one worker per node: each fetched its own inputs into its own temporary folder
        assert any("TrainController" in n for n in names), names
        assert len(jobs()) >= 2  # the training run's driver, and this one
    finally:
        ray.shutdown()


def test_a_local_ray_for_training_gets_a_short_temp_folder_under_a_long_tmpdir(tmp_path, monkeypatch):
    "Ray's sockets must fit AF_UNIX's 107 bytes: under a long $RAY_TMPDIR the local Ray of a run gets /tmp/ray-<uid>."
    import ray

    class Started(Exception):
        pass

    seen = {}

    def init(**kwargs):
        seen.update(kwargs)
        raise Started  # what ray.init was given is all this test needs

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_TMPDIR", "/tmp/" + "x" * 40)  # Ray's default, <this>/ray, would be too long
    s = load_params(write_params(tmp_path / "params.yaml", smoke_params(FIXTURE_DATA, tmp_path, train={"num_workers": 2})))
    with pytest.raises(Started):
        train_mod.train_on_ray(s)
    assert seen["address"] == "local" and seen["_temp_dir"] == f"/tmp/ray-{os.getuid()}"
