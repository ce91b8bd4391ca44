"""``lwm demo``: the whole workflow on embedded sample data, on CPU, with no downloads.

Each step is a function of the demo's working directory that calls the same
library code (or CLI) a user would; later steps read what earlier ones wrote.
"""

from __future__ import annotations

import pathlib
import time
from typing import Callable

from orchestration import cli, sample_data

SEQ_LEN = 1024  # the demo's one bucket: short enough for a tiny model on CPU


def _banner(title: str) -> None:
    print(f"\n=== {title} ===", flush=True)


def _lwm(*argv: str) -> None:
    print("$ lwm " + " ".join(argv), flush=True)
    code = cli.main(list(argv))
    if code:
        raise SystemExit(f"demo step failed: lwm {' '.join(argv)} exited {code}")


def books(workdir: pathlib.Path) -> None:
    _banner("sample books → tokenizer → packed shards")
    corpus = sample_data.write_books(workdir / "raw" / "books.jsonl", 200)
    print(f"wrote {corpus} (200 synthetic books)")
    _lwm("tokenizer", "train", "--input", str(corpus), "--vocab-size", "512", "--output", str(workdir / "tokenizer.model"))
    _lwm(
        "data", "books", "--input", str(corpus), "--output", str(workdir / "data" / "books"),
        "--tokenizer", str(workdir / "tokenizer.model"), "--seq-len", str(SEQ_LEN), "--num-shards", "4", "--overwrite",
    )
    _lwm("data", "inspect", str(workdir / "data" / "books" / f"seq{SEQ_LEN}"))


STEPS: tuple[Callable[[pathlib.Path], None], ...] = (books,)


def run(workdir: str) -> None:
    root = pathlib.Path(workdir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    start = time.time()
    for step in STEPS:
        step(root)
    print(f"\ndemo finished in {time.time() - start:.0f}s; everything is under {root}")
