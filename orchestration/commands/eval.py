"""`lwm eval loss|needle`: held-out loss (``trainer.evaluate``) and needle in a haystack (``trainer.needle``)."""

from __future__ import annotations

import json
import os


def _checkpoint_dir(path: str) -> str:
    """A checkpoint directory, or a run directory holding ``checkpoints/``."""
    nested = os.path.join(path, "checkpoints")
    return nested if os.path.isdir(nested) else path


def run_loss(args, extra) -> int:
    from trainer import evaluate

    metrics = evaluate.evaluate_checkpoint(_checkpoint_dir(args.ckpt), args.data, batches=args.batches,
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
    loss.add_argument("--ckpt", required=True, help="checkpoint directory (or a run directory holding checkpoints/)")
    loss.add_argument("--step", type=int, help="checkpoint step (default: the newest)")
    loss.add_argument("--data", required=True, action="append",
                      help="packed dataset directory holding manifest.json (repeatable)")
    loss.add_argument("--batches", type=int, default=8, help="batches per dataset")
    loss.add_argument("--batch-size", type=int, default=1, help="sequences per batch")
    loss.add_argument("--sp", type=int, default=1, help="devices of the ring each sequence is split over")
    loss.add_argument("--out", help="also write the metrics to this JSON file")
    loss.set_defaults(func=run_loss)
