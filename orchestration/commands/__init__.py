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
    """``(tokenizer, Sampler)`` from ``--tokenizer``, ``--ckpt``, ``--step`` and ``--sp``; the tokenizer is
    checked against the checkpoint's vocabulary before its weights are loaded."""
    from pipelines.tokens.text_tokenizer import TextTokenizer
    from trainer import checkpoint
    from trainer.inference.sampler import Sampler, check_tokenizer

    tokenizer = TextTokenizer(args.tokenizer)
    ckpt = checkpoint.resolve_dir(args.ckpt)
    check_tokenizer(tokenizer, checkpoint.restore_model_config(ckpt, args.step))
    return tokenizer, Sampler(ckpt, sp=args.sp, step=args.step)
