"""`lwm convert vqgan-import`: a diffusers VQModel checkpoint (aMUSEd's ``vqvae/``) → our VQGAN weights.

The ``lwm convert`` group (``convert.py``) calls ``register_convert`` with its sub-parsers.
"""

from __future__ import annotations

import argparse

from orchestration.commands import add_examples, add_json_flag, print_json


def _input_range(text: str) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LOW,HIGH (e.g. 0,1), got {text!r}") from None
    return low, high


def register_convert(convert_subparsers) -> None:
    """Add ``vqgan-import`` to the ``lwm convert`` sub-parsers."""
    p = convert_subparsers.add_parser(
        "vqgan-import",
        help="convert a diffusers VQModel checkpoint (e.g. amused/amused-256 vqvae/) to pipelines.tokens.vqgan weights",
        description="Reads config.json + diffusion_pytorch_model.safetensors from DIR (or DIR/vqvae), checks the "
                    "architecture, writes OUT/config.json and OUT/params.safetensors.",
    )
    p.add_argument("--diffusers-dir", required=True, help="diffusers VQModel directory, or a pipeline root with vqvae/")
    p.add_argument("--out", required=True, help="output directory for the converted weights")
    p.add_argument("--input-range", type=_input_range, default=(0.0, 1.0),
                   help="pixel range the weights expect, LOW,HIGH (default 0,1: aMUSEd/diffusers weights)")
    add_json_flag(p, "output, block_out_channels, codebook, input_range")
    p.set_defaults(func=_run)
    add_examples(p, "lwm convert vqgan-import --diffusers-dir amused-256/vqvae --out vqgan/   # pixels in [0, 1]",
                 "lwm convert vqgan-import --diffusers-dir amused-256 --out vqgan/ --input-range=-1,1")


def _run(args, extra) -> int:
    from trainer.convert.vqgan_diffusers import convert_diffusers_dir

    vq = convert_diffusers_dir(args.diffusers_dir, args.out, input_range=args.input_range)
    if args.json:
        print_json({"output": args.out, "block_out_channels": list(vq.config.block_out_channels),
                    "codebook": vq.config.num_vq_embeddings, "input_range": list(vq.input_range)})
        return 0
    print(f"wrote {args.out}: block_out_channels={list(vq.config.block_out_channels)} "
          f"codebook={vq.config.num_vq_embeddings} input_range={list(vq.input_range)}")
    return 0
