"""Benchmark of `sentiment_nb.predict.column_major_linears`: the model's forward pass with its `nn.Linear` weights as
loaded (row-major) and column-major, on Rotten Tomatoes test sentences, on the CPU.

Both copies live in one process and take turns on the same batches (A then B, then B then A), so that a machine whose
speed drifts, as a small cloud VM's does, slows both alike. For each batch size it prints the median time of a forward
pass in each layout and the speed-up, and first the largest difference between the two copies' logits.

    python bench/weight_layout.py --model model --threads 1 --data ../shared/data/rotten_tomatoes

The sentences come from --data, else $SENTIMENT_NB_DATA (bench/common.py).

This is a benchmark, not a test: nothing here is asserted; the numbers mean something only for the fine-tuned model,
on an otherwise idle machine.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from common import REPO, DataError, add_data_arg, data_path, read_sentences


def compare(model_dir: str, sentences: list[str], batch_sizes: list[int], passes: int, threads: int) -> list[dict]:
    "Median forward-pass time of each layout at each batch size, `passes` batches each, in alternating order."
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from sentiment_nb.predict import column_major_linears

    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    models = {name: AutoModelForSequenceClassification.from_pretrained(model_dir, local_files_only=True).eval()
              for name in ("row_major", "column_major")}
    column_major_linears(models["column_major"])
    rows = []
    with torch.inference_mode():
        enc = tokenizer(sentences[:8], padding=True, truncation=True, return_tensors="pt")
        diff = (models["row_major"](**enc).logits - models["column_major"](**enc).logits).abs().max().item()
        print(f"largest difference between the two layouts' logits: {diff:.2e}", flush=True)
        for bs in batch_sizes:
            batches = [sorted(sentences[(i * bs + j) % len(sentences)] for j in range(bs)) for i in range(passes)]
            encs = [tokenizer(b, padding=True, truncation=True, return_tensors="pt") for b in batches]
            times = {name: [] for name in models}
            for name in models:  # warm-up
                models[name](**encs[0])
            for i, e in enumerate(encs):
                for name in (("row_major", "column_major") if i % 2 == 0 else ("column_major", "row_major")):
                    t0 = time.perf_counter()
                    models[name](**e)
                    times[name].append((time.perf_counter() - t0) * 1000)
            row = {"batch_size": bs, "threads": threads, "passes": passes,
                   **{f"{name}_ms": round(statistics.median(ts), 2) for name, ts in times.items()}}
            row["speedup"] = round(row["row_major_ms"] / row["column_major_ms"], 3)
            rows.append(row)
            print(f"batch {bs:3}, {threads} thread(s): row-major {row['row_major_ms']:8.2f} ms, "
                  f"column-major {row['column_major_ms']:8.2f} ms, speed-up {row['speedup']:.2f}x", flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(REPO / "model"), help="exported model folder (default: %(default)s)")
    add_data_arg(p)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--passes", type=int, default=200, help="forward passes per layout and batch size")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default: %(default)s)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)
    from sentiment_nb.predict import ModelDirError, check_model_dir

    try:
        model = check_model_dir(args.model)
        sentences = read_sentences(data_path(args.data))
    except (DataError, ModelDirError) as e:
        print(f"weight_layout: {e}", file=sys.stderr)
        return 2
    rows = compare(str(model), sentences, args.batch_sizes, args.passes, args.threads)
    if args.json:
        Path(args.json).write_text(json.dumps({"model": str(model), "results": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
