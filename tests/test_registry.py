"""The model registry end to end: two smoke runs registered with GTO, the promotion gate, `serve --model name#prod`,
swaps, a rollback and a canary under load with no failed request, and a model that fails to load during a swap.

Everything happens in a clone of the smoke project (its own git tags, the DVC remote next to it) and on loopback."""
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import psutil
import pytest
import yaml
from conftest import dvc
from helpers import REPO, free_port, git, write_params

from sentiment_nb.config import load_params
from sentiment_nb.model_dir import model_version
from sentiment_nb.registry import METRICS_FILE, ModelRef, Registry, fetch, models_table

CLI, GTO = (Path(sys.executable).parent / name for name in ("sentiment-nb", "gto"))
ARTIFACT = "sentiment-classifier"
TEXTS = ["a gorgeous , witty , seductive movie .", "the plot is nothing but boilerplate clichés .", "fun", "a mess"]


def test_dvc_yaml_declares_the_exported_folder_as_the_registry_artifact():
    declared = yaml.safe_load((REPO / "dvc.yaml").read_text())["artifacts"]
    settings = load_params(REPO / "params.yaml")
    artifact = declared[settings.registry.artifact]
    assert artifact["type"] == "model" and artifact["desc"] and artifact["labels"]
    assert artifact["path"] == settings.params.paths.model
    assert artifact["meta"]["metrics"] == METRICS_FILE == f"{settings.params.paths.eval}/metrics.json"


IDENTITY = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}


def cli(*args, cwd, check=True, timeout=600, command=CLI):
    "`sentiment-nb ARGS` (or another command of the environment) in `cwd`, with a git identity for GTO's tags."
    out = subprocess.run([str(command), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                         env={**os.environ, **IDENTITY, "SENTIMENT_NB_PARAMS": str(Path(cwd) / "params.yaml")})
    if check:
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def registry_project(smoke_project, tmp_path_factory):
    """A clone of the smoke project with two registered versions, v1.0.0 and v1.1.0, from two smoke runs (the second
    with another learning rate), their files pushed to the DVC remote; and a v1.2.0 from a commit with no metrics."""
    first, _ = smoke_project
    git(first, "checkout", "--", ".")  # back to the committed run, whatever an earlier test applied
    dvc(first, "checkout", "--force")
    dvc(first, "push")
    clone = first.parent / f"registry-{first.name}"  # next to the project: the default remote's relative path holds
    git(first.parent, "clone", "-q", str(first), clone.name)
    dvc(clone, "pull")
    cli("register", ARTIFACT, "HEAD", "--version", "v1.0.0", cwd=clone, command=GTO)

    params = yaml.safe_load((clone / "params.yaml").read_text())
    params["train"]["learning_rate"] = params["train"]["learning_rate"] / 20  # a second, different model
    params["registry"]["tolerance"] = 0.0
    write_params(clone / "params.yaml", params)
    dvc(clone, "repro")
    git(clone, "add", "-A")
    git(clone, "commit", "-qm", "second smoke run")
    dvc(clone, "push")
    cli("register", ARTIFACT, "HEAD", "--version", "v1.1.0", cwd=clone, command=GTO)

    git(clone, "rm", "-q", METRICS_FILE)
    git(clone, "commit", "-qm", "a version with no recorded metrics")
    cli("register", ARTIFACT, "HEAD", "--version", "v1.2.0", cwd=clone, command=GTO)
    git(clone, "checkout", "-q", "HEAD~1", "--", METRICS_FILE)
    git(clone, "commit", "-qm", "metrics back")
    return clone


def test_models_lists_both_runs_with_their_figures(registry_project):
    table = {r["version"]: r for r in models_table(Registry(registry_project, ARTIFACT))}
    assert list(table) == ["v1.2.0", "v1.1.0", "v1.0.0"]
    for version in ("v1.0.0", "v1.1.0"):
        assert 0 <= table[version]["accuracy"] <= 1 and table[version]["ece"] is not None
        assert table[version]["backends"] == ["onnx", "onnx-int8", "torch"]
    assert table["v1.2.0"]["accuracy"] is None
    out = cli("models", "--params", "params.yaml", cwd=registry_project).stdout
    assert out.splitlines()[0].split() == ["version", "stages", "accuracy", "f1", "ece", "backends", "commit", "created"]
    assert "v1.1.0" in out and "v1.0.0" in out


def accuracies(root) -> dict:
    return {r["version"]: r["accuracy"] for r in models_table(Registry(root, ARTIFACT))}


def test_the_gate_refuses_a_worse_version_or_one_without_metrics_and_force_overrides(registry_project):
    root = registry_project
    acc = accuracies(root)
    better, worse = sorted(["v1.0.0", "v1.1.0"], key=lambda v: acc[v], reverse=True)
    cli("promote", better, "--stage", "staging", cwd=root)
    refused = cli("promote", worse, "--stage", "staging", cwd=root, check=False)
    if acc[worse] < acc[better]:  # registry.tolerance is 0 here
        assert refused.returncode == 2 and "Refused to promote" in refused.stderr, refused.stderr
        assert f"{acc[worse]:.2%}" in refused.stderr and f"{acc[better]:.2%}" in refused.stderr
        forced = cli("promote", worse, "--stage", "staging", "--force", cwd=root)
        assert "FORCED" in forced.stdout
        tags = git(root, "tag", "-l", "-n1", f"{ARTIFACT}#staging#*")
        assert "FORCED (--force)" in tags, tags
    else:  # equal accuracies: the gate lets it through, within a tolerance of 0
        assert refused.returncode == 0, refused.stderr
    no_metrics = cli("promote", "v1.2.0", "--stage", "staging", cwd=root, check=False)
    assert no_metrics.returncode == 2 and "no recorded test metrics" in no_metrics.stderr, no_metrics.stderr
    unknown = cli("promote", "v9.0.0", "--stage", "staging", cwd=root, check=False)
    assert unknown.returncode == 2 and "has no version v9.0.0; it has v1.2.0, v1.1.0, v1.0.0" in unknown.stderr
    for bad, words in [(f"{ARTIFACT}#nowhere", "No version of sentiment-classifier is in stage 'nowhere'"),
                       (f"{ARTIFACT}@v9.0.0", "has no version v9.0.0")]:
        out = cli("serve", "--model", bad, "--port", str(free_port()), cwd=root, check=False)
        assert out.returncode == 2 and words in out.stderr and out.stderr.count("\n") == 1, out.stderr


class Load:
    "Bounded loopback load: `clients` threads posting in a loop until stopped; every answer recorded."

    def __init__(self, url: str, clients: int = 4, timeout_s: float = 10.0):
        self.url, self.stop, self.answers = url, threading.Event(), []
        self.threads = [threading.Thread(target=self.client, args=(i, timeout_s), daemon=True) for i in range(clients)]

    def client(self, i: int, timeout_s: float):
        with httpx.Client(timeout=timeout_s) as http:
            n = i
            while not self.stop.is_set():
                t0 = time.monotonic()
                try:
                    r = http.post(self.url + "/predict", json={"text": TEXTS[n % len(TEXTS)]})
                    version = r.headers.get("x-model-version") if r.status_code == 200 else None
                    if version:
                        assert r.json()["model_version"] == version
                    self.answers.append((t0, time.monotonic(), r.status_code, version))
                except Exception as e:  # a time-out or a dropped connection counts as a failure
                    self.answers.append((t0, time.monotonic(), type(e).__name__, None))
                n += 1

    def __enter__(self):
        for t in self.threads:
            t.start()
        time.sleep(1.0)  # load before the change
        return self

    def __exit__(self, *exc):
        time.sleep(1.0)  # and after it
        self.stop.set()
        for t in self.threads:
            t.join(30)

    def failures(self) -> Counter:
        return Counter(status for _, _, status, _ in self.answers if status != 200)


def versions_in_order(answers) -> list[str]:
    "The versions answers came from, in the order they were sent, runs of one version collapsed."
    out = []
    for _, _, _, version in sorted(answers):
        if version and (not out or out[-1] != version):
            out.append(version)
    return out


@pytest.fixture(scope="module")
def served(registry_project, tmp_path_factory):
    "`sentiment-nb serve --model sentiment-classifier#prod` on the clone, prod being v1.0.0 at start."
    root = registry_project
    cli("promote", "v1.0.0", "--stage", "prod", "--force", cwd=root)
    port = free_port()
    logs = tmp_path_factory.mktemp("served")
    with open(logs / "out", "w") as out, open(logs / "err", "w") as err:
        proc = subprocess.Popen([str(CLI), "serve", "--model", f"{ARTIFACT}#prod", "--port", str(port), "--params",
                                 "params.yaml"], cwd=root, stdout=out, stderr=err, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while not (logs / "out").read_text() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        line = (logs / "out").read_text()
        assert line.startswith(f"Serving {ARTIFACT}@v1.0.0 (sha256:"), line + (logs / "err").read_text()[-3000:]
        yield root, port, url, proc, logs
    finally:
        started = []
        try:
            started = psutil.Process(proc.pid).children(recursive=True)
        except psutil.Error:
            pass
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        for p in started:
            try:
                if p.is_running():
                    p.kill()
            except psutil.Error:  # ended meanwhile
                pass


def fetched(root, version) -> Path:
    "`version` in the cache the server uses (the registry's default, under the tests' $XDG_CACHE_HOME)."
    return fetch(Registry(root, ARTIFACT), ModelRef(ARTIFACT, version=version))


def request_records(served) -> list[dict]:
    "The request records of the server's ingress replicas, from the log folder its first line names."
    from sentiment_nb.serve.api import request_records as read

    line = (served[4] / "out").read_text().splitlines()[0]
    return read(line.split(" logs ", 1)[1].split(")", 1)[0])


def test_promote_then_roll_back_a_serving_stage_under_load_with_no_failed_request(served):
    root, port, url, *_ = served
    v1 = model_version(fetched(root, "v1.0.0"))
    health = httpx.get(url + "/healthz", timeout=30).json()
    assert (health["model_ref"], health["model_version"]) == (f"{ARTIFACT}@v1.0.0", v1)

    with Load(url) as load:
        out = cli("promote", "v1.1.0", "--stage", "prod", "--force", "--swap", "--port", str(port), cwd=root)
    assert "Swapped" in out.stdout and f"-> {ARTIFACT}@v1.1.0" in out.stdout, out.stdout
    v2 = model_version(fetched(root, "v1.1.0"))
    assert v1 != v2
    assert not load.failures(), load.failures()
    assert versions_in_order(load.answers) == [v1, v2], versions_in_order(load.answers)
    assert max(end - start for start, end, _, _ in load.answers) < 10
    assert httpx.get(url + "/healthz", timeout=30).json()["model_version"] == v2

    with Load(url) as load:
        out = cli("rollback", "--stage", "prod", "--swap", "--port", str(port), cwd=root)
    assert f"{ARTIFACT}#prod now holds v1.0.0 (before: v1.1.0)" in out.stdout, out.stdout
    assert not load.failures(), load.failures()
    assert versions_in_order(load.answers) == [v2, v1], versions_in_order(load.answers)
    logged = Counter(r.get("model_version") for r in request_records(served))
    assert logged[v1] and logged[v2] and set(logged) == {v1, v2}, logged  # every record names its model


def test_a_canary_answers_its_share_and_can_be_dropped(served):
    root, port, url, *_ = served
    out = cli("swap", "--canary", f"{ARTIFACT}@v1.1.0", "--canary-share", "0.3", "--port", str(port), cwd=root)
    assert "with canary sentiment-classifier@v1.1.0" in out.stdout, out.stdout
    prod, canary = model_version(fetched(root, "v1.0.0")), model_version(fetched(root, "v1.1.0"))
    health = httpx.get(url + "/healthz", timeout=30).json()
    assert (health["model_version"], health["canary"]["model_version"], health["canary"]["share"]) == (prod, canary, 0.3)
    with httpx.Client(timeout=30) as http:
        seen = Counter(http.post(url + "/predict", json={"text": TEXTS[n % 4]}).headers["x-model-version"]
                       for n in range(400))
    assert set(seen) == {prod, canary}, seen
    share = seen[canary] / 400
    assert abs(share - 0.3) < 0.08, seen  # 3.5 standard deviations of a 400-draw share at 0.3
    metrics = httpx.get(metrics_url(served), timeout=30).text if metrics_url(served) else ""
    for version in (prod, canary):
        assert f'model_version="{version}"' in metrics, version

    with Load(url) as load:
        cli("swap", "--no-canary", "--port", str(port), cwd=root)
    assert not load.failures(), load.failures()
    assert "canary" not in httpx.get(url + "/healthz", timeout=30).json()


def metrics_url(served) -> str:
    "The server's Prometheus endpoint, from its first line."
    line = (served[4] / "out").read_text().splitlines()[0]
    return line.split(" metrics ", 1)[1].split(",", 1)[0]


def test_a_model_that_fails_to_load_during_a_swap_leaves_the_old_one_serving(served, tmp_path):
    root, port, url, *_ = served
    before = httpx.get(url + "/healthz", timeout=30).json()["model_version"]
    broken = Path(shutil.copytree(fetched(root, "v1.1.0"), tmp_path / "broken"))
    (broken / "registry.json").unlink()
    for name in ("model.safetensors", "tokenizer.json", "onnx/model.onnx", "onnx/model.int8.onnx"):  # any backend
        cut = broken / name
        cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])  # passes the folder check, fails to load
    with Load(url) as load:
        out = cli("swap", str(broken), "--port", str(port), cwd=root, check=False)
    assert out.returncode == 2, out.stdout + out.stderr[-3000:]
    line = out.stderr.strip().splitlines()[-1]
    assert line.startswith("sentiment-nb: error: The new model did not start (SentimentModel: ") and \
        "the previous one serves on." in line, out.stderr[-3000:]
    assert not load.failures(), load.failures()
    assert versions_in_order(load.answers) == [before]
    assert httpx.get(url + "/healthz", timeout=30).json()["model_version"] == before
    info = json.loads(next(Path(os.environ["TMPDIR"]).glob(f"sentiment-nb-*/server-{port}.json")).read_text())
    assert info["serve"]["model"] == f"{ARTIFACT}#prod"  # the failed swap changed nothing
