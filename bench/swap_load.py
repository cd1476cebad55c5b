"""A model swap under load: `sentiment-nb promote --swap` and `rollback --swap` while clients keep posting.

It builds a throwaway registry (a git + DVC repository in a temporary folder, its remote beside it) with two
versions of `--model`: the model as it is (v1.0.0) and the same model with its classifier bias nudged (v1.1.0: the
same size and speed, other weights, so another `model_version`). It times how long `--model sentiment-classifier#prod`
takes to resolve and fetch, cold and cached; serves `#prod` with the committed params and no serve settings; then,
under `--concurrency` clients, promotes v1.1.0 with `--swap` and rolls back with `--swap`, and prints for each: the
requests sent, the non-2xx answers and failures, the p99 before and during the swap, and the time from the command
to the last answer of the old version.

    python bench/swap_load.py --model model --concurrency 32
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import free_port, percentile, wait_up  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ARTIFACT = "sentiment-classifier"
IDENTITY = {"GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@localhost", "GIT_COMMITTER_NAME": "bench",
            "GIT_COMMITTER_EMAIL": "bench@localhost"}
TEXTS = ["a gorgeous , witty , seductive movie .", "the plot is nothing but boilerplate clichés .",
         "an uneven but often funny comedy", "a tedious mess"]


def sh(*args, cwd, env=None) -> str:
    out = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True,
                         env={**os.environ, **IDENTITY, **(env or {})})
    if out.returncode:
        raise SystemExit(f"{' '.join(map(str, args))} failed:\n{out.stdout[-2000:]}{out.stderr[-3000:]}")
    return out.stdout


def nudged_copy(model: Path, out: Path) -> Path:
    "`model` with its classifier's bias moved a little: other weights, the same size and speed."
    from safetensors.torch import load_file, save_file

    shutil.copytree(model, out)
    weights = load_file(out / "model.safetensors")
    bias = next(k for k in weights if k.endswith("classifier.bias"))
    weights[bias] = weights[bias] + 0.01
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    return out


def build_registry(root: Path, model: Path) -> Path:
    "A git + DVC repository with the project's params and dvc.yaml, and versions v1.0.0 and v1.1.0 of `model`."
    repo = root / "repo"
    repo.mkdir()
    import yaml

    shutil.copy(REPO / "params.yaml", repo / "params.yaml")
    artifacts = yaml.safe_load((REPO / "dvc.yaml").read_text())["artifacts"]  # no stages: `model/` is `dvc add`ed
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"artifacts": artifacts}, sort_keys=False))
    sh("git", "init", "-q", "-b", "main", cwd=repo)
    sh(BIN / "dvc", "init", "-q", cwd=repo)
    sh(BIN / "dvc", "remote", "add", "-d", "local", root / "remote", cwd=repo)
    for version, folder in (("v1.0.0", model), ("v1.1.0", nudged_copy(model, root / "nudged"))):
        shutil.rmtree(repo / "model", ignore_errors=True)
        shutil.copytree(folder, repo / "model")
        (repo / "eval").mkdir(exist_ok=True)
        shutil.copy(folder / "metrics.json", repo / "eval" / "metrics.json")
        sh(BIN / "dvc", "add", "-q", "model", cwd=repo)
        sh(BIN / "dvc", "push", "-q", cwd=repo)
        sh("git", "add", "-A", cwd=repo)
        sh("git", "commit", "-qm", version, cwd=repo)
        sh(BIN / "gto", "register", ARTIFACT, "HEAD", "--version", version, cwd=repo)
    sh(BIN / "sentiment-nb", "promote", "v1.0.0", "--stage", "prod", cwd=repo, env={"SENTIMENT_NB_PARAMS": "params.yaml"})
    return repo


def fetch_times(repo: Path, cache: Path) -> tuple[float, float]:
    "Seconds to resolve and fetch `#prod` with an empty cache, then with it cached."
    from sentiment_nb.config import load_params
    from sentiment_nb.registry import resolve_model

    settings = load_params(repo / "params.yaml", {"registry.cache": str(cache)})
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        resolve_model(settings, f"{ARTIFACT}#prod")
        times.append(time.perf_counter() - t0)
    return times[0], times[1]


class Load:
    "`concurrency` aiohttp clients posting on a thread of their own until stopped; each answer with its times."

    def __init__(self, url: str, concurrency: int):
        self.url, self.concurrency, self.stop, self.answers = url, concurrency, threading.Event(), []
        self.thread = threading.Thread(target=lambda: asyncio.run(self.run()), daemon=True)

    async def run(self):
        import aiohttp

        async with aiohttp.ClientSession(base_url=self.url, connector=aiohttp.TCPConnector(limit=self.concurrency),
                                         timeout=aiohttp.ClientTimeout(total=30)) as client:
            async def worker(i):
                n = i
                while not self.stop.is_set():
                    t0 = time.monotonic()
                    try:
                        async with client.post("/predict", json={"text": TEXTS[n % len(TEXTS)]}) as r:
                            await r.read()
                            status, version = r.status, r.headers.get("x-model-version")
                    except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                        status, version = type(e).__name__, None
                    self.answers.append((t0, time.monotonic(), status, version))
                    n += 1

            await asyncio.gather(*(worker(i) for i in range(self.concurrency)))


def swap_figures(answers, t_cmd: float, t_done: float, old: str) -> dict:
    "What the clients saw around a swap that the command started at `t_cmd` and finished at `t_done`."
    before = [e - s for s, e, st, _ in answers if e < t_cmd and st == 200]
    during = [e - s for s, e, st, _ in answers if s >= t_cmd and s <= t_done and st == 200]
    old_answers = [e for s, e, st, v in answers if v == old]
    return {"requests": len(answers), "non_2xx_or_failed": dict(Counter(str(st) for *_, st, _ in answers if st != 200)),
            "p99_before_ms": round(1000 * percentile(before, 99), 1) if before else None,
            "p99_during_ms": round(1000 * percentile(during, 99), 1) if during else None,
            "command_s": round(t_done - t_cmd, 1),
            "cmd_to_last_old_answer_s": round(max(old_answers) - t_cmd, 1) if old_answers else None}


def swap_under_load(url: str, concurrency: int, command: list, cwd: Path, old: str, settle_s: float) -> dict:
    load = Load(url, concurrency)
    load.thread.start()
    time.sleep(settle_s)
    t_cmd = time.monotonic()
    out = subprocess.run([str(c) for c in command], cwd=cwd, capture_output=True, text=True,
                         env={**os.environ, **IDENTITY, "SENTIMENT_NB_PARAMS": str(cwd / "params.yaml")})
    t_done = time.monotonic()
    time.sleep(settle_s)
    load.stop.set()
    load.thread.join(60)
    if out.returncode:
        raise SystemExit(f"{' '.join(map(str, command))} failed:\n{out.stderr[-3000:]}")
    print(out.stdout.strip().splitlines()[-1])
    return swap_figures(load.answers, t_cmd, t_done, old)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="an exported model folder (with metrics.json, as the export stage writes)")
    p.add_argument("--concurrency", type=int, default=32, help="clients during the swaps (default: %(default)s)")
    p.add_argument("--settle", type=float, default=10.0, help="seconds of load before and after each command")
    args = p.parse_args(argv)
    model = Path(args.model).resolve()
    if not (model / "metrics.json").is_file():
        raise SystemExit(f"{model} has no metrics.json: give a folder the export stage wrote.")
    work = Path(tempfile.mkdtemp(prefix="swap-bench-"))
    cache = work / "cache"
    os.environ["XDG_CACHE_HOME"] = str(cache)  # the server fetches into the same, throwaway cache
    proc = None
    try:
        t0 = time.perf_counter()
        repo = build_registry(work, model)
        print(f"registry with v1.0.0 and v1.1.0 built in {time.perf_counter() - t0:.1f} s")
        cold, cached = fetch_times(repo, cache / "sentiment-nb" / "models")
        print(f"resolve + fetch {ARTIFACT}#prod: cold {cold:.2f} s, cached {cached:.2f} s")
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc = subprocess.Popen([BIN / "sentiment-nb", "serve", "--model", f"{ARTIFACT}#prod", "--port", str(port),
                                 "--params", "params.yaml"], cwd=repo, stdout=subprocess.PIPE, text=True)
        print(proc.stdout.readline().strip())
        wait_up(url, 300, proc)
        import httpx

        old = httpx.get(url + "/healthz", timeout=30).json()["model_version"]
        rows = {"promote v1.1.0 --swap": swap_under_load(
            url, args.concurrency, [BIN / "sentiment-nb", "promote", "v1.1.0", "--stage", "prod", "--swap", "--port", port], repo, old,
            args.settle)}
        new = httpx.get(url + "/healthz", timeout=30).json()["model_version"]
        rows["rollback --swap"] = swap_under_load(
            url, args.concurrency, [BIN / "sentiment-nb", "rollback", "--stage", "prod", "--swap", "--port", port], repo, new, args.settle)
        print(json.dumps({"concurrency": args.concurrency, "model": str(model), "swaps": rows}, indent=2))
    finally:
        if proc:
            proc.terminate()
            proc.wait(120)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
