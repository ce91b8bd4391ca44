"""`lwm convert`: checkpoint conversions (HF Llama import/export; VQGAN import)."""

from __future__ import annotations

import json
import os

from orchestration.commands import add_examples, add_json_flag, convert_vqgan, print_json


def _base_config(args):
    """The ModelConfig named by --preset and/or --config (a JSON or YAML file of fields), or None."""
    from trainer.model import ModelConfig

    if args.preset is None and args.config is None:
        return None
    fields = {}
    if args.config:
        import yaml

        with open(args.config) as f:
            try:
                fields = yaml.safe_load(f) or {}
            except yaml.YAMLError as error:
                raise ValueError(f"{args.config}: not valid YAML or JSON: {' '.join(str(error).split())}") from None
        if not isinstance(fields, dict):
            raise ValueError(f"{args.config}: expected a mapping of ModelConfig fields")
    if args.preset:
        fields = {"preset": args.preset, **fields}
    return ModelConfig.from_dict(fields, where=args.config or "model")


def hf_import(args, extra) -> int:
    from trainer.convert.hf_llama import import_hf

    config = import_hf(args.hf_dir, args.out, base=_base_config(args), seed=args.seed)
    if args.json:
        print_json({"output": args.out, "parameters": config.num_params(), "model": config.to_dict()})
        return 0
    print(f"wrote {args.out}: {config.num_params() / 1e6:.1f}M parameters")
    print(json.dumps(config.to_dict(), sort_keys=True))
    return 0


def hf_export(args, extra) -> int:
    from trainer.convert.hf_llama import export_hf

    export_hf(args.ckpt, args.out, step=args.step, dtype=args.dtype)
    if args.json:
        print_json({"output": args.out, "format": "hf-llama-safetensors", "files": sorted(os.listdir(args.out))})
        return 0
    print(f"wrote {args.out} (HF Llama, safetensors)")
    return 0


def register(subparsers) -> None:
    group = subparsers.add_parser("convert")
    actions = group.add_subparsers(dest="action", required=True)
    p = actions.add_parser(
        "hf-import",
        help="HF Llama safetensors directory -> LWM checkpoint",
        description="Reads config.json and model.safetensors (or sharded safetensors with an index) from "
                    "--hf-dir; never loads pickle files. The architecture comes from config.json; "
                    "--preset/--config supply the rest (vision vocabulary, dtypes, remat) and must agree "
                    "with the weights' shapes. Vision embedding and head are freshly initialised.",
    )
    p.add_argument("--hf-dir", required=True, help="HF Llama model directory")
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    p.add_argument("--preset", help="base model preset (llama2-7b, lwm-7b, tiny)")
    p.add_argument("--config", help="JSON/YAML file of ModelConfig fields (applied over --preset)")
    p.add_argument("--seed", type=int, default=0, help="seed for the vision embedding/head initialisation")
    add_json_flag(p, "output, parameters, model (the ModelConfig's fields)")
    p.set_defaults(func=hf_import)
    add_examples(p, "lwm convert hf-import --hf-dir Llama-2-7b-hf --preset llama2-7b --out ckpt/",
                 "lwm convert hf-import --hf-dir Llama-2-7b-hf --preset lwm-7b --config model.yaml --out ckpt/ --json")

    p = actions.add_parser(
        "hf-export",
        help="LWM checkpoint -> HF Llama directory (text model; config.json + safetensors)",
    )
    p.add_argument("--ckpt", required=True, help="checkpoint directory (hf-import or training output)")
    p.add_argument("--out", required=True, help="HF directory to write")
    p.add_argument("--step", type=int, help="checkpoint step (default: latest)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                   help="tensor dtype (default: the checkpoint's param_dtype)")
    add_json_flag(p, "output, format, files")
    p.set_defaults(func=hf_export)
    add_examples(p, "lwm convert hf-export --ckpt ckpt/ --out hf-out/",
                 "lwm convert hf-export --ckpt runs/tiny --step 200 --out hf-out/ --dtype bfloat16")

    convert_vqgan.register_convert(actions)
