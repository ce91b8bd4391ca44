"""`lwm eval loss|needle`: held-out loss (``trainer.evaluation.heldout_loss``) and needle in a haystack (``trainer.evaluation.needle``)."""

from __future__ import annotations

import json
import os

from orchestration.commands import add_checkpoint_arguments, open_sampler


def run_loss(args, extra) -> int:
    from trainer import checkpoint
    from trainer.evaluation import heldout_loss as evaluate

    metrics = evaluate.evaluate_checkpoint(checkpoint.resolve_dir(args.ckpt), args.data, batches=args.batches,
                                           batch_size=args.batch_size, sp=args.sp, step=args.step)
    print(evaluate.format_metrics(metrics))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(metrics, f, indent=2, sort_keys=True)
        print(f"wrote {args.out}")
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("eval", help="evaluate a checkpoint: held-out loss, needle in a haystack")
    commands = parser.add_subparsers(dest="eval_command", required=True, metavar="EVAL")

    loss = commands.add_parser(
        "loss", help="held-out loss of a checkpoint on packed datasets (text and vision separately)",
        description="Loss of a checkpoint on the first --batches batches of each packed dataset, in manifest "
        "order (the same batches every time; the same numbers as a training run's eval: section).",
    )
    add_checkpoint_arguments(loss)
    loss.add_argument("--data", required=True, action="append",
                      help="packed dataset directory holding manifest.json (repeatable)")
    loss.add_argument("--batches", type=int, default=8, help="batches per dataset")
    loss.add_argument("--batch-size", type=int, default=1, help="sequences per batch")
    loss.add_argument("--sp", type=int, default=1, help="devices of the ring each sequence is split over")
    loss.add_argument("--out", help="also write the metrics to this JSON file")
    loss.set_defaults(func=run_loss)
    register_needle(commands)


def _haystack_texts(paths: list[str] | None) -> list[str]:
    """Text of the haystack files (``.jsonl``, optionally ``.gz``: each line's ``text``, read as the data jobs
    read books, so a bad line is an error naming it), or the demo's synthetic books."""
    if not paths:
        import random

        from trainer.evaluation.synthetic_books import book

        return [book(random.Random(10_000 + i), 200) for i in range(20)]
    from schemas import raw

    texts = []
    for path in paths:
        if not path.endswith((".jsonl", ".jsonl.gz")):
            with open(path) as f:
                texts.append(f.read())
            continue
        with open(path, "rb") as f:
            for record in raw.iter_documents(f, path):
                if isinstance(record, raw.DeadLetter):
                    raise ValueError(f"haystack {record.source or path}: {record.reason} ({record.detail})")
                texts.append(record.text)
    return texts


def _numbers(text: str, kind, name: str) -> tuple:
    try:
        return tuple(kind(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"{name} must be a comma-separated list, got {text!r}") from None


def run_needle(args, extra) -> int:
    from trainer.evaluation import needle

    config = needle.NeedleConfig(
        lengths=_numbers(args.lengths, int, "--lengths"), depths=_numbers(args.depths, float, "--depths"),
        rounds=args.rounds, needles=args.needles, ask=args.ask, task=args.task, hops=args.hops, seed=args.seed,
        max_new_tokens=args.max_tokens)
    texts = _haystack_texts(args.haystack)  # bad input refused before the weights load
    tokenizer, sampler = open_sampler(args)
    needle.run(sampler, tokenizer, texts, config, args.out, batch_size=args.batch_size)
    with open(os.path.join(args.out, "table.txt")) as f:
        print(f"\n{args.task} accuracy (%), depth × context length:\n{f.read()}")
    print(f"results: {os.path.join(args.out, 'results.jsonl')}\nheatmap: {os.path.join(args.out, 'heatmap.png')}")
    return 0


def register_needle(commands) -> None:
    parser = commands.add_parser(
        "needle", help="needle in a haystack (or RULER variable tracking) over context lengths × depths",
        description="Insert 'The special magic {city} number is: {7 digits}.' at a sentence boundary at each "
        "depth of filler text, ask for it in LWM's chat template and score the greedy answer (correct iff the "
        "number appears). --lengths count whole prompts in tokens. Writes OUT/results.jsonl, OUT/table.txt "
        "and OUT/heatmap.png. Deterministic for a --seed.",
    )
    add_checkpoint_arguments(parser, tokenizer=True)
    parser.add_argument("--haystack", nargs="+", metavar="FILE",
                        help="filler text files (.jsonl: each line's 'text'); default: the demo's synthetic books")
    parser.add_argument("--lengths", default="1024,2048,4096", help="prompt lengths in tokens, comma-separated")
    parser.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="needle depths in [0, 1], comma-separated")
    parser.add_argument("--rounds", type=int, default=3, help="trials per (length, depth), each with new needles")
    parser.add_argument("--needles", type=int, default=1,
                        help="needles inserted (variable tracking: chains, the others distractors)")
    parser.add_argument("--ask", type=int, default=1, help="needles asked for (all must be in the answer)")
    parser.add_argument("--task", choices=("needle", "variable-tracking"), default="needle", help="what to insert and ask")
    parser.add_argument("--hops", type=int, default=4, help="variable tracking: assignments after the first")
    parser.add_argument("--seed", type=int, default=0, help="seed of haystack windows, cities, numbers, names")
    parser.add_argument("--max-tokens", type=int, default=48, help="most answer tokens (greedy, stops at EOS)")
    parser.add_argument("--batch-size", type=int, default=16, help="prompts sampled together")
    parser.add_argument("--sp", type=int, default=1, help="devices of the ring prompts and caches are split over")
    parser.add_argument("--out", required=True, help="output directory")
    parser.set_defaults(func=run_needle)
