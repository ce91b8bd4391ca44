"""`lwm` sub-command groups; each module exposes ``register(subparsers)``.

Also what several groups share: the arguments naming a checkpoint, and a sampler
opened from them.
"""


def add_checkpoint_arguments(parser, *, tokenizer: bool = False) -> None:
    """``--ckpt`` and ``--step`` (and ``--tokenizer`` for commands that read or write text)."""
    parser.add_argument("--ckpt", required=True, help="checkpoint directory (or a run directory holding checkpoints/)")
    parser.add_argument("--step", type=int, help="checkpoint step (default: the newest)")
    if tokenizer:
        parser.add_argument("--tokenizer", required=True, help="the SentencePiece model the checkpoint was trained with")


def open_sampler(args):
    """``(tokenizer, Sampler)`` from ``--tokenizer``, ``--ckpt``, ``--step`` and ``--sp``, checked together."""
    from trainer.inference.sampler import open_checked

    return open_checked(args.ckpt, args.tokenizer, step=args.step, sp=args.sp)
