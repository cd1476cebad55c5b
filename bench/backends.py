"""Benchmark of the inference backends (torch, onnx, onnx-int8) on Rotten Tomatoes test sentences.

Part 1, one fresh subprocess per backend (so that each one's memory and start-up are its own, as in a replica):
- load time: importing the backend's libraries, and loading the model (`sentiment_nb.predict.load_predictor`);
- sentences/s at batch 1, 8 and 32 (each batch sorted by length, as the predictors and the server do);
- p50 and p95 latency of one sentence (batch 1);
- peak RSS of the process (ru_maxrss), and whether torch was imported at all.
All with --threads intra-op threads (default 1: one per CPU a Serve replica reserves by default).

Part 2 (unless --no-serve): bench/serve_load.py against the Ray Serve app with each backend, at concurrency 1, 8, 32.

    python bench/backends.py --model model --data ../shared/data/rotten_tomatoes --json bench/backends.json

The sentences come from --data, else $SENTIMENT_NB_DATA (bench/common.py).

It needs an exported model with its ONNX graphs (`dvc repro`); the numbers mean something only for the fine-tuned
model, and only on an otherwise idle machine. This is a benchmark, not a test: nothing here is asserted.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, DataError, add_data_arg, data_path, read_sentences

BACKENDS = ["torch", "onnx", "onnx-int8"]


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))]


# --- part 1: one backend, in its own process ------------------------------------------------------------------------

def measure(args) -> dict:
    "Run in a fresh process: load one backend, time it, and return the numbers (printed as JSON by `main`)."
    import resource

    t0 = time.perf_counter()
    if args.backend == "torch":
        import torch  # noqa: F401  (imports are part of a replica's start-up)
        import transformers  # noqa: F401
    else:
        import onnxruntime  # noqa: F401
        import tokenizers  # noqa: F401
    from sentiment_nb.predict import load_predictor

    t1 = time.perf_counter()
    predictor = load_predictor(args.model, args.backend, device="cpu", batch_size=32, threads=args.threads)
    t2 = time.perf_counter()
    sentences = read_sentences(args.data, args.limit)
    predictor.predict_proba(sentences[:64], batch_size=8)  # warm-up: first-call allocations, caches
    out = {"backend": args.backend, "threads": args.threads, "sentences": len(sentences),
           "import_s": round(t1 - t0, 2), "load_s": round(t2 - t1, 2)}
    for bs in args.batch_sizes:
        texts = sentences[:args.batch1_limit] if bs == 1 else sentences
        t = time.perf_counter()
        predictor.predict_proba(texts, batch_size=bs)  # sorts by length, then batches of `bs`
        out[f"sent_per_s_b{bs}"] = round(len(texts) / (time.perf_counter() - t), 1)
    lat = []
    for s in sentences[:args.batch1_limit]:
        t = time.perf_counter()
        predictor.predict_proba([s], batch_size=1)
        lat.append((time.perf_counter() - t) * 1000)
    out["p50_ms_b1"], out["p95_ms_b1"] = round(percentile(lat, 50), 2), round(percentile(lat, 95), 2)
    out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux
    out["torch_imported"] = "torch" in sys.modules
    return out


def run_backend(args, backend: str) -> dict:
    cmd = [sys.executable, __file__, "_measure", "--backend", backend, "--model", args.model, "--data", args.data,
           "--limit", str(args.limit), "--batch1-limit", str(args.batch1_limit), "--threads", str(args.threads),
           "--batch-sizes", *map(str, args.batch_sizes)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1"}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    if p.returncode != 0:
        return {"backend": backend, "error": (p.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def table(rows: list[dict], cols: list[str]) -> str:
    show = lambda v: (", ".join(f"{k}: {n}" for k, n in v.items()) or "0") if isinstance(v, dict) else str(v)  # noqa: E731
    cells = [[show(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(x[i]) for x in cells)) for i, c in enumerate(cols)]
    line = lambda xs: "  ".join(x.rjust(w) for x, w in zip(xs, widths, strict=True))  # noqa: E731
    return "\n".join([line(cols), line(["-" * w for w in widths]), *map(line, cells)])


# --- part 2: the server with each backend ---------------------------------------------------------------------------

def serve_load_command(args, backend: str, out: Path) -> list[str]:
    "The `serve_load.py` command line that loads the Serve app with `backend` and writes its results to `out`."
    cmd = [sys.executable, str(REPO / "bench" / "serve_load.py"), "--only", "serve", "--backend", backend,
           "--model", args.model, *(["--data", args.data] if args.data else []), "--requests", str(args.requests),
           "--duration", str(args.duration), "--cpus", str(args.cpus or args.threads), "--threads", str(args.threads),
           "--replicas", str(args.replicas), "--ingress-replicas", str(args.ingress_replicas), "--json", str(out),
           "--concurrency", *map(str, args.concurrency)]
    return cmd + (["--haproxy"] if args.haproxy else [])


def run_serve_load(args, backend: str) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "serve.json"
        p = subprocess.run(serve_load_command(args, backend, out), text=True, timeout=args.timeout * 4)
        if p.returncode != 0 or not out.is_file():
            return [{"server": f"serve:{backend}", "error": f"serve_load exited {p.returncode}"}]
        return json.loads(out.read_text())["results"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("_measure", nargs="?", help=argparse.SUPPRESS)
    p.add_argument("--backend", default=None, help=argparse.SUPPRESS)
    p.add_argument("--model", default=str(REPO / "model"), help="exported model folder (default: %(default)s)")
    add_data_arg(p)
    p.add_argument("--backends", nargs="+", choices=BACKENDS, default=BACKENDS)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--limit", type=int, default=1066, help="sentences for batches of 8 and 32 (default: the test split)")
    p.add_argument("--batch1-limit", type=int, default=300, help="sentences for batch 1 and the latency")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads = CPUs of the Serve replica (default: 1)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32], help="levels of the serving load test")
    p.add_argument("--requests", type=int, default=400, help="serving: at most this many requests per level")
    p.add_argument("--duration", type=float, default=30.0, help="serving: at most this many seconds per level")
    p.add_argument("--replicas", type=int, default=1, help="serving: model replicas (default: %(default)s)")
    p.add_argument("--cpus", type=float, default=None, help="serving: serve.num_cpus per replica (default: --threads)")
    p.add_argument("--ingress-replicas", type=int, default=0,
                   help="serving: HTTP ingress replicas (serve.ingress_replicas; default 0: as many as --replicas)")
    p.add_argument("--haproxy", action="store_true", help="serving: HAProxy in front (serve.haproxy: true)")
    p.add_argument("--no-serve", action="store_true", help="skip part 2 (the Ray Serve load test)")
    p.add_argument("--timeout", type=int, default=900, help="seconds allowed per backend (default: %(default)s)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args._measure == "_measure":
        print(json.dumps(measure(args)))
        return 0

    from sentiment_nb.predict import ModelDirError, check_model_dir, onnx_file

    try:
        args.model = str(check_model_dir(args.model))
        for b in args.backends:
            if b != "torch":
                onnx_file(args.model, b)
        args.data = str(data_path(args.data))
        read_sentences(args.data, 1)  # a file without sentences fails here, not in each backend's process
    except (DataError, ModelDirError) as e:
        print(f"backends: {e}", file=sys.stderr)
        return 2
    print(f"model {args.model}; data {args.data}; {args.threads} thread(s); {os.cpu_count()} CPUs", flush=True)
    rows = []
    for b in args.backends:
        rows.append(run_backend(args, b))
        print(f"  {b}: {rows[-1]}", flush=True)
    cols = ["backend", "import_s", "load_s", *[f"sent_per_s_b{bs}" for bs in args.batch_sizes], "p50_ms_b1",
            "p95_ms_b1", "peak_rss_mb", "torch_imported", "error"]
    print("\nBackends (one process each)\n" + table(rows, [c for c in cols if any(c in r for r in rows)]))

    serve_rows = []
    if not args.no_serve:
        for b in args.backends:
            serve_rows += run_serve_load(args, b)
        cols = ["server", "concurrency", "requests", "ok", "throughput_rps", "p50_ms", "p95_ms", "p99_ms", "errors", "error"]
        print(f"\nRay Serve, {args.replicas} replica(s) per backend\n" + table(serve_rows, [c for c in cols if any(c in r for r in serve_rows)]))

    if args.json:
        meta = {"model": args.model, "data": args.data, "threads": args.threads, "os_cpus": os.cpu_count()}
        Path(args.json).write_text(json.dumps({"meta": meta, "backends": rows, "serve": serve_rows}, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
