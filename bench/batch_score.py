"""Benchmark of batch scoring (`sentiment-nb predict --input/--output`) on RT-like sentences.

Every variant runs in a fresh process, one after the other in one run, on the same generated input: the sentences of
--data repeated to --rows rows, as a .jsonl file with an `id` column.

- baseline: the loop a user would write, `transformers.pipeline("text-classification")` over the texts with a
  `batch_size`; first a sweep of --baseline-batch-sizes on --sweep-rows rows, then the best one on all the rows;
- job:<backend>: the single-process job (`sentiment_nb.batch.score_file`) with each of --backends;
- ray:<backend>: the Ray Data job (`sentiment_nb.batch_ray.score_with_ray`) with --actors actors of
  --cpus-per-actor CPUs on a local Ray (its start is counted in `wall_s`, not in `job_s`).

For each: sentences/s (rows over the job's own time, model load and Ray start excluded; `wall_s` includes them),
the time to the first output row from the process start (the first chunk on disk; Ray: its first file written;
the baseline: its first answer),
and the peak RSS of the process (ru_maxrss; for Ray, the driver's only: the actors are other processes).
`--rss-rows 10000 1000000` also runs the single-process job of the first backend on inputs of those sizes and prints
the peak RSS of each, to show that memory does not grow with the file (use a small model for a million rows).

    python bench/batch_score.py --model model --data ../shared/data/rotten_tomatoes --rows 100000 --json out.json

It needs an exported model with its ONNX graphs (`dvc repro`) for the onnx backends. Figures mean something only on an
otherwise idle machine. This is a benchmark, not a test: nothing here is asserted.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import REPO, DataError, add_data_arg, data_path, read_sentences

START = time.perf_counter()  # the process start, for the time to the first output row
BACKENDS = ["torch", "onnx", "onnx-int8"]


def peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux


def write_input(sentences: list[str], rows: int, path: Path) -> Path:
    "`rows` rows cycling through `sentences`, as JSONL with an `id`, in `path`."
    with open(path, "w", encoding="utf-8") as f:
        for i in range(rows):
            f.write(json.dumps({"id": i, "text": sentences[i % len(sentences)]}) + "\n")
    return path


# --- the variants, each in its own process --------------------------------------------------------------------------

def run_baseline(args) -> dict:
    from transformers import pipeline

    texts = [json.loads(line)["text"] for line in open(args.input, encoding="utf-8")]
    pipe = pipeline("text-classification", model=args.model, device="cpu", top_k=None)
    loaded = time.perf_counter()
    first, n = None, 0
    for _ in pipe((t for t in texts), batch_size=args.batch_size):  # a generator: answers come as they are ready
        n += 1
        if first is None:
            first = time.perf_counter() - START
    job = time.perf_counter() - loaded
    return {"rows": n, "batch_size": args.batch_size, "job_s": round(job, 2), "sent_per_s": round(n / job, 1),
            "first_row_s": round(first, 2), "wall_s": round(time.perf_counter() - START, 2),
            "peak_rss_mb": peak_rss_mb()}


def run_job(args) -> dict:
    from sentiment_nb.batch import score_file

    out = Path(args.workdir) / f"job-{args.backend}.parquet"
    s = score_file(args.input, out, args.model, backend=args.backend, device="cpu", chunk_rows=args.chunk_size,
                   batch_size=args.batch_size, overwrite=True, threads=args.threads, progress=False, log=lambda m: None)
    end = time.perf_counter()
    return {"rows": s["rows"], "backend": s["backend"], "job_s": s["seconds"],
            "sent_per_s": round(s["rows"] / s["seconds"], 1),
            "first_row_s": round(end - START - s["seconds"] + s["first_chunk_seconds"], 2),
            "wall_s": round(end - START, 2), "peak_rss_mb": peak_rss_mb(), "torch_imported": "torch" in sys.modules}


def run_ray(args) -> dict:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    from sentiment_nb.batch_ray import score_with_ray

    temp = f"/tmp/ray-b{os.getpid()}"
    ray.init(address="local", num_cpus=max(os.cpu_count() or 1, int(args.actors * args.cpus_per_actor) + 1),
             include_dashboard=False, _node_ip_address="127.0.0.1", _temp_dir=temp, log_to_driver=False)
    out = Path(args.workdir) / f"ray-{args.backend}.parquet"
    first, done = [], threading.Event()

    def watch():  # Ray writes into a hidden folder beside the output: its first file is the first output row
        while not done.is_set() and not first:
            if any(Path(args.workdir).glob(f".{out.name}.partial/*.parquet")):
                first.append(time.perf_counter() - START)
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        s = score_with_ray(args.input, out, args.model, backend=args.backend, chunk_rows=args.chunk_size,
                           batch_size=args.batch_size, overwrite=True, num_actors=args.actors,
                           cpus_per_actor=args.cpus_per_actor)
    finally:
        done.set()
        ray.shutdown()
    return {"rows": s["rows"], "backend": s["backend"], "actors": args.actors, "cpus_per_actor": args.cpus_per_actor,
            "job_s": s["seconds"], "sent_per_s": round(s["rows"] / s["seconds"], 1),
            "first_row_s": round(first[0], 2) if first else None,
            "wall_s": round(time.perf_counter() - START, 2), "peak_rss_mb_driver": peak_rss_mb()}


def child(args, mode: str, **extra) -> dict:
    "Run one variant in a fresh process; its figures (the child prints them as JSON on its last line)."
    cmd = [sys.executable, __file__, "_run", mode, "--model", args.model, "--input", str(args.input),
           "--workdir", str(args.workdir), "--chunk-size", str(args.chunk_size), "--threads", str(args.threads),
           "--actors", str(args.actors), "--cpus-per-actor", str(args.cpus_per_actor)]
    for k, v in extra.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        return {"error": p.stderr.strip().splitlines()[-1] if p.stderr.strip() else f"exit {p.returncode}"}
    return json.loads(p.stdout.strip().splitlines()[-1])


# --- the run --------------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("mode", nargs="*", help=argparse.SUPPRESS)  # `_run <variant>`: one variant in this process
    p.add_argument("--model", default=str(REPO / "model"), help="exported model folder (with onnx/ for the onnx backends)")
    add_data_arg(p)
    p.add_argument("--rows", type=int, default=100_000, help="rows scored by each variant (default: %(default)s)")
    p.add_argument("--backends", nargs="+", default=BACKENDS, choices=BACKENDS)
    p.add_argument("--ray-backends", nargs="+", default=None, choices=BACKENDS,
                   help="backends of the Ray Data job (default: --backends)")
    p.add_argument("--only", nargs="+", default=["baseline", "job", "ray"], choices=["baseline", "job", "ray", "rss"],
                   help="variants to run (default: all three; `rss` alone: only the --rss-rows runs)")
    p.add_argument("--baseline-batch-sizes", nargs="+", type=int, default=[8, 16, 32, 64])
    p.add_argument("--sweep-rows", type=int, default=1000, help="rows of the baseline's batch-size sweep")
    p.add_argument("--batch-size", type=int, default=32, help="texts per forward pass of the job (default: 32)")
    p.add_argument("--chunk-size", type=int, default=1024)
    p.add_argument("--threads", type=int, default=0, help="intra-op threads of the job (0: the runtime's default)")
    p.add_argument("--actors", type=int, default=2)
    p.add_argument("--cpus-per-actor", type=float, default=1.0)
    p.add_argument("--rss-rows", nargs="*", type=int, default=[], help="also: peak RSS of the job at these sizes")
    p.add_argument("--json", default=None, help="write the figures here too")
    p.add_argument("--input", default=None, help=argparse.SUPPRESS)
    p.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--backend", default="torch", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.mode[:1] == ["_run"]:
        run = {"baseline": run_baseline, "job": run_job, "ray": run_ray}[args.mode[1]]
        print(json.dumps(run(args)))
        return 0
    try:
        sentences = read_sentences(data_path(args.data))
    except DataError as e:
        print(f"batch_score.py: error: {e}", file=sys.stderr)
        return 2
    if not Path(args.model, "config.json").is_file():
        print(f"batch_score.py: error: no model folder at {args.model!r} (pass --model; `dvc repro` makes model/).",
              file=sys.stderr)
        return 2
    results = {"rows": args.rows, "cpus": os.cpu_count(), "chunk_size": args.chunk_size}
    with tempfile.TemporaryDirectory(prefix="batch-bench-") as tmp:
        args.workdir = Path(tmp)
        args.input = write_input(sentences, args.rows, Path(tmp) / "input.jsonl")
        if "baseline" in args.only:
            sweep_args = argparse.Namespace(**{**vars(args), "input": write_input(sentences, args.sweep_rows,
                                                                                  Path(tmp) / "sweep.jsonl")})
            sweep = {bs: child(sweep_args, "baseline", batch_size=bs) for bs in args.baseline_batch_sizes}
            for bs, r in sweep.items():
                print(f"baseline sweep, batch {bs}: {r.get('sent_per_s', r.get('error'))} sentences/s", flush=True)
            ok = {bs: r for bs, r in sweep.items() if "sent_per_s" in r}
            best = max(ok, key=lambda bs: ok[bs]["sent_per_s"]) if ok else args.baseline_batch_sizes[0]
            results["baseline_sweep"] = {str(bs): r.get("sent_per_s") for bs, r in sweep.items()}
            results["baseline"] = child(args, "baseline", batch_size=best)
            print(f"baseline (pipeline, batch {best}): {results['baseline']}", flush=True)
        for kind in ("job", "ray"):
            if kind not in args.only:
                continue
            for backend in (args.ray_backends or args.backends) if kind == "ray" else args.backends:
                r = child(args, kind, backend=backend, batch_size=args.batch_size)
                results[f"{kind}:{backend}"] = r
                print(f"{kind}:{backend}: {r}", flush=True)
        for n in args.rss_rows:
            rss_args = argparse.Namespace(**{**vars(args), "input": write_input(sentences, n, Path(tmp) / f"rss{n}.jsonl")})
            r = child(rss_args, "job", backend=args.backends[0], batch_size=args.batch_size)
            results[f"rss:{n}"] = r
            print(f"peak RSS at {n} rows ({args.backends[0]}): {r.get('peak_rss_mb')} MB, {r.get('sent_per_s')} rows/s",
                  flush=True)
    base = results.get("baseline", {}).get("sent_per_s")
    print("\nsummary (sentences/s; x: against the baseline):")
    for k, v in results.items():
        if isinstance(v, dict) and v.get("sent_per_s"):
            ratio = f"  {v['sent_per_s'] / base:.2f}x" if base else ""
            print(f"  {k:18s} {v['sent_per_s']:8.1f}{ratio}  first row {v.get('first_row_s')} s, "
                  f"peak RSS {v.get('peak_rss_mb', v.get('peak_rss_mb_driver'))} MB")
    for backend in args.backends:
        job, ray_ = results.get(f"job:{backend}", {}), results.get(f"ray:{backend}", {})
        if job.get("sent_per_s") and ray_.get("sent_per_s"):
            print(f"  Ray Data against the single process, {backend}: {ray_['sent_per_s'] / job['sent_per_s'] - 1:+.1%}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
