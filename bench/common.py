"""What the bench/ scripts share: where their sentences come from, and how they are read.

The sentences are a JSONL file with a `text` field, such as a Rotten Tomatoes `test.jsonl`. A script takes its file
from `--data`, else from the environment variable `SENTIMENT_NB_DATA`; either may also name a folder that holds
`test.jsonl` (the layout `data.source` uses). With neither, the script stops with an error that names both.
"""

import argparse
import json
import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA_ENV = "SENTIMENT_NB_DATA"
DATA_HELP = (f"JSONL file with a `text` field, or a folder holding test.jsonl (default: ${DATA_ENV}; "
             "the figures in bench/README.md use the Rotten Tomatoes test split)")


class DataError(ValueError):
    "No usable sentence file: nothing given, or the path given is not a readable JSONL with sentences."


def add_data_arg(parser: argparse.ArgumentParser) -> None:
    "Add the shared `--data` option to a script's parser."
    parser.add_argument("--data", default=None, help=DATA_HELP)


def data_path(given: str | os.PathLike | None = None, environ=os.environ) -> Path:
    "The sentence file: `given` (the `--data` value), else `$SENTIMENT_NB_DATA`; a folder means its test.jsonl."
    raw = given if given not in (None, "") else environ.get(DATA_ENV)
    if not raw:
        raise DataError(f"No sentences to benchmark on: pass --data FILE (a JSONL file with a `text` field, or a "
                        f"folder holding test.jsonl) or set the environment variable {DATA_ENV}.")
    path = Path(raw).expanduser()
    source = "--data" if given not in (None, "") else f"${DATA_ENV}"
    if path.is_dir():
        path = path / "test.jsonl"
    if not path.is_file():
        raise DataError(f"{source} names {str(path)!r}, which is not a file.")
    return path


def read_sentences(path: str | os.PathLike, limit: int | None = None) -> list[str]:
    "The `text` of each line of the JSONL file `path`, at most `limit` of them; a `DataError` if there are none."
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if limit is not None and len(out) >= limit:
                break
            if not line.strip():
                continue
            try:
                out.append(json.loads(line)["text"])
            except (ValueError, KeyError, TypeError) as e:
                raise DataError(f"{path}, line {n}: not a JSON object with a `text` field ({e!r}).") from e
    if not out:
        raise DataError(f"No sentences in {path}.")
    return out
