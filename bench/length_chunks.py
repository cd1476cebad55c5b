"""Benchmark of `sentiment_nb.predict.length_chunks`: a predictor's time per text when each group of texts is cut into
forward passes of `--batch-size` in turn (`fixed`, the old way) and when `length_chunks` picks the cuts, at several
costs per pass (`cost:N`), on groups of random Rotten Tomatoes test sentences, on the CPU.

One predictor takes every variant in turn, on the same groups, in blocks whose order flips each time, so that a
machine whose speed drifts, as a small cloud VM's does, slows all alike. For each group size it prints the median
milliseconds per text of each variant, its ratio to `fixed`, and the padded tokens per real token of its cuts.

    python bench/length_chunks.py --model model --backend torch --threads 1 --data ../shared/data/rotten_tomatoes

The sentences come from --data, else $SENTIMENT_NB_DATA (bench/common.py).

This is a benchmark, not a test: nothing here is asserted; the numbers mean something only for the fine-tuned model,
on an otherwise idle machine.
"""

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

from common import REPO, DataError, add_data_arg, data_path, read_sentences


def padding_ratio(predictor, groups: list[list[str]], batch_size: int, pass_cost: float | None) -> float:
    "Padded tokens over real tokens when `groups` are cut as `length_chunks(..., pass_cost)` cuts them."
    from sentiment_nb.predict import length_chunks

    real = padded = 0
    for g in groups:
        if hasattr(predictor.tokenizer, "encode_batch"):  # the ONNX backends' `tokenizers.Tokenizer`
            lengths = sorted(len(e.ids) for e in predictor.tokenizer.encode_batch(g))
        else:
            lengths = sorted(len(ids) for ids in predictor.tokenizer(g, truncation=True,
                                                                     max_length=predictor.max_length)["input_ids"])
        real += sum(lengths)
        padded += sum((end - start) * lengths[end - 1] for start, end in length_chunks(lengths, batch_size, pass_cost))
    return padded / real


def compare(predictor, sentences: list[str], group_sizes: list[int], costs: list[float], groups_per_block: int,
            blocks: int, batch_size: int, seed: int = 0) -> list[dict]:
    "Median ms per text of each variant at each group size, over `blocks` alternating blocks of the same groups."
    variants = {"fixed": None, **{f"cost:{c:g}": c for c in costs}}
    rng = random.Random(seed)
    rows = []
    for size in group_sizes:
        groups = [rng.sample(sentences, min(size, len(sentences))) for _ in range(groups_per_block)]
        predictor.predict_logits(groups[0], batch_size)  # warm-up
        times = {name: [] for name in variants}
        for b in range(blocks):
            for name in (list(variants) if b % 2 == 0 else list(variants)[::-1]):
                predictor.pass_cost = variants[name]
                t0 = time.perf_counter()
                for g in groups:
                    predictor.predict_logits(g, batch_size)
                times[name].append((time.perf_counter() - t0) * 1000 / sum(map(len, groups)))
        fixed_ms = statistics.median(times["fixed"])
        for name, cost in variants.items():
            ms = statistics.median(times[name])
            rows.append({"group": size, "variant": name, "ms_per_text": round(ms, 3),
                         "vs_fixed": round(ms / fixed_ms, 3),
                         "padding": round(padding_ratio(predictor, groups, batch_size, cost), 3)})
            print(f"group {size:3}: {name:9} {ms:7.2f} ms/text  {ms / fixed_ms:5.2f}x fixed  "
                  f"padded/real tokens {rows[-1]['padding']:.2f}", flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(REPO / "model"), help="exported model folder (default: %(default)s)")
    add_data_arg(p)
    p.add_argument("--backend", default="torch", choices=["torch", "onnx", "onnx-int8"])
    p.add_argument("--groups", type=int, nargs="+", default=[8, 16, 32], help="texts per group (per call)")
    p.add_argument("--costs", type=float, nargs="+", default=[15, 35, 60], help="pass costs to try, in tokens")
    p.add_argument("--batch-size", type=int, default=8, help="at most this many texts per pass (default: %(default)s)")
    p.add_argument("--groups-per-block", type=int, default=40)
    p.add_argument("--blocks", type=int, default=6)
    p.add_argument("--threads", type=int, default=1, help="intra-op threads (default: %(default)s)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)
    from sentiment_nb.predict import ModelDirError, check_model_dir, load_predictor

    try:
        model = check_model_dir(args.model)
        sentences = read_sentences(data_path(args.data))
        predictor = load_predictor(model, args.backend, device="cpu", batch_size=args.batch_size, threads=args.threads)
    except (DataError, ModelDirError) as e:
        print(f"length_chunks: {e}", file=sys.stderr)
        return 2
    rows = compare(predictor, sentences, args.groups, args.costs, args.groups_per_block,
                   args.blocks, args.batch_size)
    if args.json:
        meta = {"model": str(model), "backend": args.backend, "threads": args.threads, "batch_size": args.batch_size}
        Path(args.json).write_text(json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
