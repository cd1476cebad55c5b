"""Quality and speed of the drift monitor (`sentiment_nb.monitor`) on the real data, with the exported model.

- False alarms: windows (of the logged features, without the text unless --with-text) drawn from the reference's own distribution (the validation split, profiled with the model)
  are compared with the model's reference (its test split), many times at each window size; the share that raise
  drift is the false-alarm rate (target: at most 5%).
- Power: windows from three shifted streams, at each size; the share that raise drift, and which signals did:
  * `domain`: another domain's sentences (product and service reviews, generated from templates: no other dataset
    can be downloaded here);
  * `labels`: the validation split resampled to 80% negative sentences (a flipped label share);
  * `length`: the validation split's longest quarter (a change in length).
- Speed: `run_monitor` over --records logged requests of one text each (a Serve log folder written here), with the
  report; the issue's target is seconds, not minutes, for 100,000.

    python bench/monitor_quality.py --model model --data ../shared/data/rotten_tomatoes --json bench/monitor.json

Without a reference in the model folder the script writes one from --data's test split. Nothing here is asserted.
"""

import argparse
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import REPO, DataError, add_data_arg, data_path

sys.path.insert(0, str(REPO))

PRODUCTS = ["phone", "router", "blender", "vacuum", "laptop charger", "smartwatch", "air fryer", "printer"]
PROBLEMS = ["stopped charging after two weeks", "arrived with a cracked screen", "overheats within minutes",
            "lost its bluetooth pairing overnight", "needs a firmware update that bricks it", "ships without cables"]
PRAISE = ["battery lasts three days", "setup took five minutes", "customer support replaced it at once",
          "the app syncs flawlessly", "shipping was fast and the box was intact"]


def domain_sentences(n: int, seed: int = 0) -> list[str]:
    "`n` product and service reviews from templates: another domain than movie reviews, in the same language."
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        product = PRODUCTS[rng.integers(len(PRODUCTS))]
        if rng.random() < 0.5:
            out.append(f"the {product} {PROBLEMS[rng.integers(len(PROBLEMS))]} ; refund requested , no reply yet")
        else:
            out.append(f"great {product} : {PRAISE[rng.integers(len(PRAISE))]} , five stars")
    return out


def read_split(folder: Path, split: str) -> list[dict]:
    return [json.loads(line) for line in (folder / f"{split}.jsonl").open()]


def windows(frame, size: int, n: int, seed: int, weights=None):
    "`n` windows of `size` rows drawn with replacement from `frame` (rows weighted by `weights`)."
    rng = np.random.default_rng(seed)
    p = None if weights is None else np.asarray(weights, float) / np.sum(weights)
    for _ in range(n):
        yield frame.iloc[rng.choice(len(frame), size, replace=True, p=p)].reset_index(drop=True)


def rate(reference, stream, compare) -> dict:
    "The share of `stream`'s windows that raise drift, and how often each signal was among the drifted."
    results = [compare(reference, w)[1] for w in stream]
    caught = {}
    for s in itertools.chain.from_iterable(r["drifted"] for r in results):
        caught[s] = caught.get(s, 0) + 1
    n = len(results)  # a window "raises drift" when any signal drifts, whatever the verdict on its size
    return {"windows": n, "drift_rate": round(sum(bool(r["drifted"]) for r in results) / n, 3),
            "signals": {k: round(v / n, 3) for k, v in sorted(caught.items(), key=lambda kv: -kv[1])}}


def speed(reference, pool, records: int, model) -> dict:
    "Seconds of `run_monitor` over `records` logged requests of one text each (log parsing, Evidently, report)."
    from sentiment_nb.model_dir import model_version
    from sentiment_nb.monitor import SIGNALS, run_monitor

    rows = pool.iloc[np.random.default_rng(0).integers(0, len(pool), records)]
    version = model_version(model)
    with tempfile.TemporaryDirectory() as tmp:
        logs = Path(tmp, "logs")
        logs.mkdir()
        with open(logs / "replica_sentiment_SentimentAPI_bench.log", "w") as f:
            for row in rows.itertuples(index=False):
                per = {s: [getattr(row, s)] for s in SIGNALS}
                per = {k: [v[0].item() if hasattr(v[0], "item") else v[0]] for k, v in per.items()}
                rec = {"event": "predict", "status": 200, "n_texts": 1, "model_version": version, "backend": "torch",
                       "per_text": per}
                f.write(f"INFO 2026-12-07 12:00:00,000 -- {json.dumps(rec)}\n")
        t0 = time.perf_counter()
        summary = run_monitor(model, Path(tmp, "report"), logs=logs)
        seconds = time.perf_counter() - t0
    return {"records": records, "seconds": round(seconds, 2), "verdict": summary["verdict"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(REPO / "model"), help="exported model folder (default: %(default)s)")
    add_data_arg(p)
    p.add_argument("--sizes", type=int, nargs="+", default=[100, 200, 500], help="window sizes, in texts")
    p.add_argument("--windows", type=int, default=40, help="windows per size and stream")
    p.add_argument("--streams", nargs="+", default=["same", "domain", "labels", "length"],
                   choices=["same", "domain", "labels", "length"])
    p.add_argument("--records", type=int, default=100_000, help="logged requests for the speed figure (0: none)")
    p.add_argument("--with-text", action="store_true",
                   help="compare the texts too (serve.log_text on, or a capture), not only the logged features")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    from sentiment_nb.monitor import MonitorError, compare, load_reference, profile, write_reference
    from sentiment_nb.predict import load_predictor

    try:
        folder = data_path(args.data)
        folder = folder if folder.is_dir() else folder.parent
        try:
            reference, meta = load_reference(args.model)
        except MonitorError:
            print("no reference in the model folder: writing one from the test split", flush=True)
            write_reference(args.model, [r["text"] for r in read_split(folder, "test")])
            reference, meta = load_reference(args.model)
    except (DataError, MonitorError) as e:
        print(f"monitor_quality.py: error: {e}", file=sys.stderr)
        return 2
    predictor = load_predictor(args.model, meta["backend"], device="cpu")
    validation = read_split(folder, "validation")
    t0 = time.perf_counter()
    same = profile(predictor, [r["text"] for r in validation])
    other = profile(predictor, domain_sentences(2000))
    print(f"profiled {len(same)} validation and {len(other)} other-domain sentences in "
          f"{time.perf_counter() - t0:.0f} s; reference: {len(reference)} test sentences, model {meta}", flush=True)
    if not args.with_text:  # what the server logs by default: no text
        same, other = same.drop(columns="text"), other.drop(columns="text")
    negative = np.array([r["label"] == 0 for r in validation])
    long = same["n_tokens"] >= same["n_tokens"].quantile(0.75)
    streams = {
        "same": lambda size, seed: windows(same, size, args.windows, seed),
        "domain": lambda size, seed: windows(other, size, args.windows, seed),
        "labels": lambda size, seed: windows(same, size, args.windows, seed,
                                             weights=np.where(negative, 0.8 / negative.sum(), 0.2 / (~negative).sum())),
        "length": lambda size, seed: windows(same[long], size, args.windows, seed),
    }
    results = {"reference": len(reference), "model": meta, "windows_per_cell": args.windows, "with_text": args.with_text,
               "rates": {}}
    for size in args.sizes:
        for name, stream in ((n, streams[n]) for n in args.streams):
            t0 = time.perf_counter()
            r = rate(reference, stream(size, seed=size), compare)
            results["rates"][f"{name}@{size}"] = r
            print(f"{name:7s} window {size:4d}: drift in {r['drift_rate']:.0%} of {r['windows']} windows, "
                  f"signals {r['signals']} ({time.perf_counter() - t0:.0f} s)", flush=True)
    if args.records <= 0:
        return _write(args, results)
    results["speed"] = speed(reference, same, args.records, args.model)
    print(f"run_monitor over {args.records} logged requests: {results['speed']['seconds']} s", flush=True)
    return _write(args, results)


def _write(args, results) -> int:
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
