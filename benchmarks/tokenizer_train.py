"""`lwm tokenizer train` at 10× the demo's corpus: wall time and peak memory, by sampling and threads.

The demo trains its tokenizer on 200 synthetic books; this writes 10× that
(``--books 2000``, the demo's generator) and runs ``lwm tokenizer train`` as a fresh
process per setting: every sentence on one thread (what the command did before it
sampled and used the cores), every sentence on every core, and a uniform sample of
``--sample`` sentences on every core. Printed per setting: wall seconds, the
process's peak RSS (its own, from ``wait4``) and the model's sha256 prefix; the
interpreter with the command's imports alone is the memory floor.

    .venv/bin/python benchmarks/tokenizer_train.py [--books 2000] [--vocab-size 512] [--sample 20000]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from trainer.evaluation.synthetic_books import write_books  # noqa: E402
from pipelines.tokens.text_tokenizer import training_pieces  # noqa: E402


def run(argv: list[str]) -> tuple[float, float, str]:
    """(wall seconds, peak RSS in MiB, stdout) of one process."""
    start = time.perf_counter()
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=ROOT,
                               env={**os.environ, "PYTHONPATH": ROOT})
    out = process.stdout.read().decode()
    _, status, usage = os.wait4(process.pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, argv
    return time.perf_counter() - start, usage.ru_maxrss / 1024, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--books", type=int, default=2000)
    parser.add_argument("--vocab-size", type=int, default=512)
    parser.add_argument("--sample", type=int, default=20000, help="sentences of the sampled setting")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        corpus = write_books(pathlib.Path(scratch) / "books.jsonl", args.books)
        with open(corpus) as f:
            sentences = sum(1 for line in f for _ in training_pieces(json.loads(line)["text"]))
        print(f"corpus: {args.books} books, {corpus.stat().st_size / 2**20:.1f} MiB, {sentences} training sentences; "
              f"{os.cpu_count()} cores")
        base = [sys.executable, "-m", "orchestration.cli", "tokenizer", "train", "--input", str(corpus),
                "--vocab-size", str(args.vocab_size), "--output", f"{scratch}/tok.model", "--json"]
        floor = run([sys.executable, "-c", "import orchestration.commands.tokenizer"])
        print(f"{'setting':<44} {'wall s':>7} {'peak RSS MiB':>13}  sha256")
        print(f"{'imports alone (memory floor)':<44} {floor[0]:>7.2f} {floor[1]:>13.0f}")
        settings = {
            "every sentence, 1 thread (before)": ["--input-sentence-size", "0", "--threads", "1"],
            "every sentence, every core": ["--input-sentence-size", "0"],
            f"sample of {args.sample}, every core": ["--input-sentence-size", str(args.sample)],
        }
        for name, flags in settings.items():
            seconds, rss, out = run(base + flags)
            print(f"{name:<44} {seconds:>7.2f} {rss:>13.0f}  {json.loads(out)['sha256'][:12]}")


if __name__ == "__main__":
    main()
