"""Load test: the Ray Serve app against a plain FastAPI + transformers baseline, on the same model folder.

Both servers run on the loopback. Concurrent clients (aiohttp, asyncio) send one sentence per request, taken in turn
from a JSONL file, at each concurrency level (default 1, 8 and 32); each level stops after --requests requests or
--duration seconds, whichever comes first. For each server and level the script reports the throughput (answered
requests per second), the p50/p95/p99 latency of the answered requests, and the errors by status.

- serve: `sentiment_nb.serve.server.start_server` (one model replica with --cpus CPUs, dynamic batching, length sorting).
- baseline: this file's `_baseline` mode under uvicorn in a subprocess: the model loaded once, one forward pass per
  request, no batching, a sync route run in FastAPI's thread pool, and torch's default thread count, as most projects
  ship it. `--baseline-threads N` limits torch to N threads per pass, a tuned variant to compare with too.

    python bench/serve_load.py --model model --data ../shared/data/rotten_tomatoes --json bench/results.json

The sentences come from --data, else $SENTIMENT_NB_DATA (bench/common.py).

`--rounds N` (default 3) starts each server N times, alternating which goes first, and adds the medians over the
rounds, Serve's ratios to the baseline round by round, and whether the speed targets are met: at concurrency 1 a
p50 at most 1.5 times the baseline's, at 32 at least twice its throughput with a p99 under 1 s (set for the torch
backend). On a shared machine one run of each cannot settle a ratio.

It needs an exported model (`dvc repro`); the numbers mean something only for the fine-tuned model, and only on an
otherwise idle machine.
"""

import argparse
import asyncio
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from common import REPO, DataError, add_data_arg, data_path, read_sentences

# --- the baseline server ----------------------------------------------------------------------------------------------

def baseline_app(model_dir: str):
    "FastAPI + transformers, the obvious way: the model loaded once, one forward pass per request."
    # (no `from __future__ import annotations` in this file: FastAPI must see `Body` itself, not a string)
    import torch
    from fastapi import FastAPI
    from pydantic import BaseModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, local_files_only=True).eval()
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    max_length = min(512, getattr(model.config, "max_position_embeddings", 512), tokenizer.model_max_length)
    app = FastAPI(title="baseline")

    class Body(BaseModel):
        text: str

    @app.post("/predict")
    def predict(body: Body):  # a sync route: FastAPI runs it in its thread pool
        with torch.inference_mode():
            enc = tokenizer(body.text, truncation=True, max_length=max_length, return_tensors="pt")
            p = model(**enc).logits.softmax(-1)[0].tolist()
        best = max(range(len(p)), key=p.__getitem__)
        return {"label": labels[best], "score": p[best], "probabilities": dict(zip(labels, p, strict=True))}

    @app.get("/healthz")
    def healthz():
        return {"status": "ok"}

    return app


def run_baseline(model_dir: str, port: int, threads: int) -> None:
    import torch
    import uvicorn

    if threads:
        torch.set_num_threads(threads)
    uvicorn.run(baseline_app(model_dir), host="127.0.0.1", port=port, log_level="warning")


# --- the load -------------------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    k = (len(xs) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


async def load(url: str, sentences: list[str], concurrency: int, max_requests: int, max_seconds: float) -> dict:
    "Send up to `max_requests` requests from `concurrency` clients, for at most `max_seconds`; the statistics."
    # aiohttp rather than httpx: on 2 cores the client shares the CPU with the server, and aiohttp needs less of it
    # (measured against the same Serve endpoint: 199-206 req/s at concurrency 32 against httpx's 176-185).
    import aiohttp

    latencies, statuses, sent = [], Counter(), 0
    deadline = time.perf_counter() + max_seconds
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(base_url=url, connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=60)) as client:
        async def worker():
            nonlocal sent
            while sent < max_requests and time.perf_counter() < deadline:
                text = sentences[sent % len(sentences)]
                sent += 1
                t0 = time.perf_counter()
                try:
                    async with client.post("/predict", json={"text": text}) as r:
                        await r.read()
                        status = r.status
                except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                    status = type(e).__name__
                dt = time.perf_counter() - t0
                statuses[status] += 1
                if status == 200:
                    latencies.append(dt * 1000)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    ok = statuses.get(200, 0)
    return {"concurrency": concurrency, "requests": sum(statuses.values()), "ok": ok,
            "errors": {str(k): v for k, v in statuses.items() if k != 200}, "seconds": round(wall, 2),
            "throughput_rps": round(ok / wall, 1) if wall else None,
            **{f"p{q}_ms": None if not latencies else round(percentile(latencies, q), 1) for q in (50, 95, 99)}}


def wait_up(url: str, timeout_s: float, proc: subprocess.Popen | None = None) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"The baseline server exited with status {proc.returncode}.")
        try:
            if httpx.get(url + "/healthz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"{url} did not come up within {timeout_s:.0f} s.")


def bench(name: str, url: str, sentences, levels, max_requests, max_seconds, warmup) -> list[dict]:
    asyncio.run(load(url, sentences, min(4, max(levels)), warmup, 60))  # load the model's code paths, fill caches
    rows = []
    for c in levels:
        row = {"server": name, **asyncio.run(load(url, sentences, c, max_requests, max_seconds))}
        print(f"  {name:8} concurrency {c:3}: {row['throughput_rps']} req/s, p50 {row['p50_ms']} ms, "
              f"p99 {row['p99_ms']} ms, errors {row['errors'] or 0}", flush=True)
        rows.append(row)
    return rows


RESULT_COLUMNS = ["server", "concurrency", "requests", "ok", "throughput_rps", "p50_ms", "p95_ms", "p99_ms", "errors"]


def table(rows: list[dict], cols: list[str] = RESULT_COLUMNS) -> str:
    cells = [[str(r.get(c, "")) if c != "errors" else (", ".join(f"{k}: {v}" for k, v in r[c].items()) or "0")
              for c in cols] for r in rows]
    widths = [max(len(c), *(len(x[i]) for x in cells)) for i, c in enumerate(cols)]
    line = lambda xs: "  ".join(x.rjust(w) for x, w in zip(xs, widths, strict=True))  # noqa: E731
    return "\n".join([line(cols), line(["-" * w for w in widths]), *map(line, cells)])


def run_serve(args, model: Path, sentences: list[str], log_features: bool = True) -> list[dict]:
    "Start the Ray Serve app on the loopback, load it at each level, stop it."
    from sentiment_nb.config import load_params
    from sentiment_nb.serve.server import start_server, stop_server

    over = {"serve.model": str(model), "serve.host": "127.0.0.1", "serve.port": free_port(),
            "serve.num_replicas": args.replicas, "serve.autoscaling": False, "serve.num_cpus": args.cpus,
            "serve.max_queued_requests": -1, "serve.log_features": log_features}
    if args.threads is not None:
        over["serve.intra_op_threads"] = args.threads
    if args.haproxy:
        over["serve.haproxy"] = True
    if args.ingress_replicas:
        over["serve.ingress_replicas"] = args.ingress_replicas
    if args.max_batch_size:
        over["serve.max_batch_size"] = args.max_batch_size
    if args.backend:
        over["serve.backend"] = args.backend
    settings = load_params(REPO / "params.yaml", over)
    mbs = settings.serve.max_batch_size
    if settings.serve.max_ongoing_requests <= max(args.concurrency):
        settings = load_params(REPO / "params.yaml", {**over, "serve.max_ongoing_requests": max(args.concurrency) + mbs})
    t0 = time.perf_counter()
    try:  # a start that fails half way must not leave Ray running into the next round
        url = start_server(settings, num_cpus=max(os.cpu_count() or 2, math.ceil(args.replicas * args.cpus + 1)))
        print(f"serve up at {url} in {time.perf_counter() - t0:.0f} s: {args.replicas} replica(s) of {args.cpus} CPU, "
              f"{args.ingress_replicas or args.replicas} ingress replica(s), "
              f"max_batch_size {mbs}, batch_wait_timeout_s {settings.serve.batch_wait_timeout_s}", flush=True)
        name = f"serve:{args.backend}" if args.backend else "serve"
        name += "+haproxy" if args.haproxy else ""
        name += "" if log_features else ":no-monitoring"
        return bench(name, url, sentences, args.concurrency, args.requests, args.duration, args.warmup)
    finally:
        stop_server()


def run_baseline_server(args, model: Path, sentences: list[str]) -> list[dict]:
    "Start the baseline in a subprocess, load it at each level, stop it."
    port = free_port()
    env = dict(os.environ)
    if args.baseline_threads:
        env.update(OMP_NUM_THREADS=str(args.baseline_threads), MKL_NUM_THREADS=str(args.baseline_threads))
    proc = subprocess.Popen([sys.executable, __file__, "_baseline", "--model", str(model), "--port", str(port),
                             "--baseline-threads", str(args.baseline_threads)], env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_up(url, 180, proc)
        print(f"baseline up at {url}", flush=True)
        name = f"baseline:{args.baseline_threads}t" if args.baseline_threads else "baseline"
        return bench(name, url, sentences, args.concurrency, args.requests, args.duration, args.warmup)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def summarize(rows: list[dict]) -> list[dict]:
    """Per server and level, the medians over rounds of p50, p99 and throughput; for Serve, its ratios to the baseline.

    `p50_ratio` is Serve's median p50 over the baseline's (the c1 target is at most 1.5), `throughput_ratio` Serve's
    median throughput over the baseline's (the c32 target is at least 2); `p50_ratios` and `throughput_ratios` are
    the same ratios round by round."""
    med = lambda xs: round(statistics.median(xs), 2) if xs else None  # noqa: E731
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["server"], r["concurrency"]), []).append(r)
    out = []
    for (server, c), rs in groups.items():
        out.append({"server": server, "concurrency": c, "rounds": len(rs),
                    "p50_ms": med([r["p50_ms"] for r in rs if r["p50_ms"] is not None]),
                    "p99_ms": med([r["p99_ms"] for r in rs if r.get("p99_ms") is not None]),
                    "throughput_rps": med([r["throughput_rps"] for r in rs]),
                    "errors": sum(sum(r.get("errors", {}).values()) for r in rs)})  # over all rounds
    for s in out:
        base = next((b for b in out if b["server"].startswith("baseline") and b["concurrency"] == s["concurrency"]),
                    None)
        if not s["server"].startswith("serve") or base is None or not base["p50_ms"] or not base["throughput_rps"]:
            continue
        pairs = [(a, b) for a in groups[(s["server"], s["concurrency"])]
                 for b in groups[(base["server"], s["concurrency"])] if a["round"] == b["round"]]
        s.update(baseline_errors=base["errors"], p50_ratio=round(s["p50_ms"] / base["p50_ms"], 2),
                 p50_ratios=[round(a["p50_ms"] / b["p50_ms"], 2) for a, b in pairs if a["p50_ms"] and b["p50_ms"]],
                 throughput_ratio=round(s["throughput_rps"] / base["throughput_rps"], 2),
                 throughput_ratios=[round(a["throughput_rps"] / b["throughput_rps"], 2) for a, b in pairs
                                    if b["throughput_rps"]])
    return out


def monitor_cost(summary: list[dict]) -> list[str]:
    "What monitoring costs, from the medians of the app with and without it: throughput at 32, p50 at 1."
    by = {(s["server"].endswith(":no-monitoring"), s["concurrency"]): s for s in summary}
    out = []
    for c in sorted({c for _, c in by}):
        on, off = by.get((False, c)), by.get((True, c))
        if on and off and off["throughput_rps"] and on["p50_ms"] is not None and off["p50_ms"] is not None:
            out.append(f"monitoring at concurrency {c}: throughput {on['throughput_rps']} vs {off['throughput_rps']} "
                       f"req/s ({on['throughput_rps'] / off['throughput_rps'] - 1:+.1%}), p50 {on['p50_ms']} vs "
                       f"{off['p50_ms']} ms ({on['p50_ms'] - off['p50_ms']:+.2f} ms)")
    return out


# The speed targets of issue #4, for the torch backend, on medians over rounds.
MAX_C1_P50_RATIO, MIN_C32_THROUGHPUT_RATIO, MAX_C32_P99_MS = 1.5, 2.0, 1000.0


def target_checks(summary: list[dict]) -> list[str]:
    """A line per speed target that `summary` can answer: the figure, the target, and whether it is met.

    A level where either server answered a request with an error misses: its figures count only the answers."""
    out = []
    for s in summary:
        if "p50_ratio" not in s:
            continue
        errors = s.get("errors", 0) + s.get("baseline_errors", 0)
        failed = f", {errors} error(s) at this level" if errors else ""
        if s["concurrency"] == 1:
            ok = s["p50_ratio"] <= MAX_C1_P50_RATIO and not errors
            out.append(f"{s['server']} c1: p50 {s['p50_ratio']}x the baseline's{failed} (target: at most "
                       f"{MAX_C1_P50_RATIO}x): {'met' if ok else 'MISSED'}")
        if s["concurrency"] == 32:
            ok = (s["throughput_ratio"] >= MIN_C32_THROUGHPUT_RATIO and s["p99_ms"] is not None
                  and s["p99_ms"] < MAX_C32_P99_MS and not errors)
            out.append(f"{s['server']} c32: {s['throughput_ratio']}x the baseline's throughput, p99 {s['p99_ms']} ms"
                       f"{failed} (target: at least {MIN_C32_THROUGHPUT_RATIO}x, p99 under {MAX_C32_P99_MS:.0f} ms): "
                       f"{'met' if ok else 'MISSED'}")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(REPO / "model"), help="exported model folder (default: %(default)s)")
    add_data_arg(p)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--requests", type=int, default=400, help="at most this many requests per level")
    p.add_argument("--duration", type=float, default=30.0, help="at most this many seconds per level")
    p.add_argument("--warmup", type=int, default=20, help="requests sent before measuring each server")
    p.add_argument("--cpus", type=float, default=1, help="serve.num_cpus of each Serve replica (default: %(default)s)")
    p.add_argument("--replicas", type=int, default=1, help="serve.num_replicas (default: %(default)s)")
    p.add_argument("--ingress-replicas", type=int, default=0,
                   help="serve.ingress_replicas (default 0: as many as the model's)")
    p.add_argument("--threads", type=int, default=None,
                   help="serve.intra_op_threads of each replica (default: params.yaml; 0: one per reserved CPU)")
    p.add_argument("--baseline-threads", type=int, default=0,
                   help="torch threads per forward pass of the baseline (default 0: torch's default, as shipped)")
    p.add_argument("--max-batch-size", type=int, default=None, help="serve.max_batch_size (default: params.yaml)")
    p.add_argument("--only", choices=["serve", "baseline"], default=None, help="run one server only")
    p.add_argument("--haproxy", action="store_true",
                   help="serve.haproxy: true (HAProxy in front, as `auto` does for a non-loopback host)")
    p.add_argument("--backend", choices=["torch", "onnx", "onnx-int8", "auto"], default=None,
                   help="serve.backend of the Serve replica (default: params.yaml)")
    p.add_argument("--rounds", type=int, default=3,
                   help="run both servers this many times, alternating which goes first, and report medians "
                        "(default: %(default)s); this machine's speed drifts by tens of percent over minutes")
    p.add_argument("--monitor-cost", action="store_true",
                   help="instead of the baseline, the same Serve app with serve.log_features off: what the per-text "
                        "features and the drift gauges cost (targets: at most 5%% of throughput at 32, 1 ms of p50 at 1)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("_baseline", nargs="?", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error(f"--rounds must be at least 1, got {args.rounds}")

    if args._baseline == "_baseline":  # the baseline server's own process
        run_baseline(args.model, args.port, args.baseline_threads)
        return 0

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from sentiment_nb.predict import ModelDirError, check_model_dir

    try:
        model = check_model_dir(args.model)
        args.data = str(data_path(args.data))
        sentences = read_sentences(args.data, 100_000)
    except (DataError, ModelDirError) as e:
        print(f"serve_load: {e}", file=sys.stderr)
        return 2
    print(f"{len(sentences)} sentences from {args.data}; model {model}; levels {args.concurrency}; "
          f"at most {args.requests} requests or {args.duration:.0f} s per level; {os.cpu_count()} CPUs on this machine",
          flush=True)
    rows = []
    servers = [name for name in ("serve", "baseline") if args.only in (None, name)]
    if args.monitor_cost:
        servers = ["serve", "serve:no-monitoring"]
    runs = {"serve": run_serve, "baseline": run_baseline_server,
            "serve:no-monitoring": lambda *a: run_serve(*a, log_features=False)}
    for r in range(args.rounds):
        # Alternate which server goes first, so a machine that drifts over minutes weighs on both alike.
        for name in servers if r % 2 == 0 else servers[::-1]:
            if args.rounds > 1:
                print(f"round {r + 1} of {args.rounds}: {name}", flush=True)
            rows += [{**row, "round": r + 1} for row in runs[name](args, model, sentences)]

    print()
    print(table(rows, (["round"] if args.rounds > 1 else []) + RESULT_COLUMNS))
    summary = summarize(rows)
    if args.rounds > 1:
        print(f"\nmedians over {args.rounds} rounds")
        print(table(summary, ["server", "concurrency", "rounds", "throughput_rps", "p50_ms", "p99_ms",
                              "throughput_ratio", "p50_ratio"]))
    for s in summary:
        if "p50_ratio" in s:
            print(f"{s['server']} / baseline at concurrency {s['concurrency']}: p50 {s['p50_ratio']}x "
                  f"(by round: {s['p50_ratios']}), throughput {s['throughput_ratio']}x "
                  f"(by round: {s['throughput_ratios']})", flush=True)
    if args.monitor_cost:
        print("\n" + "\n".join(monitor_cost(summary)))
    checks = target_checks(summary)
    if checks:
        print("\nspeed targets (set for the torch backend; medians over rounds):", *checks, sep="\n  ")
    if args.json:
        meta = {"model": str(model), "data": args.data, "cpus": args.cpus, "replicas": args.replicas,
                "ingress_replicas": args.ingress_replicas, "haproxy": args.haproxy,
                "threads": args.threads, "baseline_threads": args.baseline_threads, "os_cpus": os.cpu_count(),
                "backend": args.backend,
                "max_requests": args.requests, "max_seconds": args.duration, "rounds": args.rounds}
        Path(args.json).write_text(json.dumps({"meta": meta, "results": rows, "summary": summary, "targets": checks},
                                               indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
