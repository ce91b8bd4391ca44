"""`lwm convert`: checkpoint conversions (HF Llama import/export; LWM release import/export; VQGAN import)."""

from __future__ import annotations

import json
import os

from orchestration.commands import add_examples, add_json_flag, convert_vqgan, print_json


def _config_fields(path: str) -> dict:
    """The ModelConfig fields in a JSON or YAML file."""
    import yaml

    with open(path) as f:
        try:
            fields = yaml.safe_load(f) or {}
        except yaml.YAMLError as error:
            raise ValueError(f"{path}: not valid YAML or JSON: {' '.join(str(error).split())}") from None
    if not isinstance(fields, dict):
        raise ValueError(f"{path}: expected a mapping of ModelConfig fields")
    return fields


def _base_config(args):
    """The ModelConfig named by --preset and/or --config (a JSON or YAML file of fields), or None."""
    from trainer.model import ModelConfig

    if args.preset is None and args.config is None:
        return None
    fields = _config_fields(args.config) if args.config else {}
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

    export_hf(args.ckpt, args.out, step=args.step, dtype=args.dtype, tokenizer=args.tokenizer,
              merge_vision_vocab=args.merge_vision_vocab)
    if args.json:
        print_json({"output": args.out, "format": "hf-llama-safetensors", "merged_vision_vocab": args.merge_vision_vocab,
                    "files": sorted(os.listdir(args.out))})
        return 0
    merged = ", text + vision vocabulary" if args.merge_vision_vocab else ""
    print(f"wrote {args.out} (HF Llama, safetensors{merged})")
    return 0


def lwm_import(args, extra) -> int:
    from trainer.convert import lwm_release
    from trainer.model import ModelConfig

    config = lwm_release.get_preset(args.preset)
    if args.config:  # fields over the release preset (a fine-tuned or smaller model in LWM's format)
        config = ModelConfig.from_dict({**config.to_dict(), **_config_fields(args.config)}, where=args.config)
    config = lwm_release.import_release(args.params, config, args.out, vqgan=args.vqgan, tokenizer=args.tokenizer,
                                        dtype=args.dtype, preset=args.preset)
    if args.json:
        print_json({"output": args.out, "preset": args.preset, "parameters": config.num_params(),
                    "model": config.to_dict(), "files": sorted(os.listdir(args.out))})
        return 0
    print(f"wrote {args.out}: {config.num_params() / 1e6:.1f}M parameters ({config.param_dtype})")
    return 0


def lwm_export(args, extra) -> int:
    from trainer.convert import lwm_release

    path = lwm_release.export_release(args.ckpt, args.out, step=args.step, scan_layers=args.scan_layers,
                                      scan_axis=args.param_scan_axis, dtype=args.dtype)
    if args.json:
        print_json({"output": args.out, "params": path, "format": "lwm-streaming",
                    "files": sorted(os.listdir(args.out))})
        return 0
    print(f"wrote {path} (LWM streaming params; load it in LWM as params::{path})")
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
        help="LWM checkpoint -> HF Llama directory (config.json + safetensors + tokenizer files)",
    )
    p.add_argument("--ckpt", required=True, help="checkpoint directory (hf-import or training output)")
    p.add_argument("--out", required=True, help="HF directory to write")
    p.add_argument("--step", type=int, help="checkpoint step (default: latest)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                   help="tensor dtype (default: the checkpoint's param_dtype)")
    p.add_argument("--tokenizer", help="SentencePiece tokenizer.model to write as tokenizer.model/.json/_config.json "
                                       "(default: the checkpoint directory's own, e.g. an lwm-import output's)")
    p.add_argument("--merge-vision-vocab", action="store_true",
                   help="a vision model as one standard Llama: vocabulary = text then vision ids (offset by the "
                        "text size, written to config.json and README.md)")
    add_json_flag(p, "output, format, merged_vision_vocab, files")
    p.set_defaults(func=hf_export)
    add_examples(p, "lwm convert hf-export --ckpt ckpt/ --out hf-out/",
                 "lwm convert hf-export --ckpt runs/tiny --step 200 --out hf-out/ --dtype bfloat16 --tokenizer tok.model",
                 "lwm convert hf-export --ckpt lwm-chat-1m/ --out hf-chat/ --merge-vision-vocab")

    p = actions.add_parser(
        "lwm-import",
        help="LWM release (streaming params, VQGAN pickle, tokenizer.model) -> LWM checkpoint",
        description="Reads LWM's streaming params file as a stream (params:: files, or train states under "
                    "params/params), with per-layer or scanned layers (param_scan_axis 0 or 1), converts RoPE "
                    "from interleaved pairs to halves, and writes OUT/checkpoints, OUT/vqgan, "
                    "OUT/tokenizer.model and OUT/lwm_import.json (the sources' sha256). The VQGAN pickle is "
                    "read without running code. Nothing is written until every input has been checked.",
    )
    p.add_argument("--params", required=True, help="LWM streaming params file (local or gs://)")
    p.add_argument("--preset", required=True,
                   help="the release, e.g. lwm-chat-1m, lwm-text-chat-128k (an unknown name lists them)")
    p.add_argument("--vqgan", help="LWM's VQGAN weights (pickle; vision releases)")
    p.add_argument("--tokenizer", help="the release's tokenizer.model (SentencePiece)")
    p.add_argument("--out", required=True, help="directory to write (must be empty or absent)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                   help="parameter dtype (default: the file's)")
    p.add_argument("--config", help="JSON/YAML file of ModelConfig fields applied over --preset")
    add_json_flag(p, "output, preset, parameters, model (the ModelConfig's fields), files")
    p.set_defaults(func=lwm_import)
    add_examples(p, "lwm convert lwm-import --params LWM-Chat-1M-Jax/params --preset lwm-chat-1m "
                    "--vqgan LWM-Chat-1M-Jax/vqgan --tokenizer LWM-Chat-1M-Jax/tokenizer.model --out lwm-chat-1m/",
                 "lwm convert lwm-import --params gs://bucket/LWM-Text-256K/params --preset lwm-text-256k "
                 "--dtype bfloat16 --out lwm-text-256k/ --json")

    p = actions.add_parser(
        "lwm-export",
        help="LWM checkpoint -> LWM's streaming params file (runs in LWM's own code)",
        description="Writes OUT/params in LWM's streaming format and names (load it in LWM with "
                    "--load_checkpoint=params::OUT/params), plus OUT/vqgan and OUT/tokenizer.model when the "
                    "checkpoint directory holds them (an lwm-import output).",
    )
    p.add_argument("--ckpt", required=True, help="checkpoint directory (or a run / lwm-import directory)")
    p.add_argument("--out", required=True, help="directory to write (must be empty or absent)")
    p.add_argument("--step", type=int, help="checkpoint step (default: latest)")
    p.add_argument("--scan-layers", action="store_true",
                   help="write layers stacked under transformer/h/scan_decoder (LWM's scan_layers=True)")
    p.add_argument("--param-scan-axis", type=int, default=0, choices=(0, 1),
                   help="axis the stacked layers go on (LWM's param_scan_axis)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                   help="tensor dtype (default: the checkpoint's param_dtype)")
    add_json_flag(p, "output, params, format, files")
    p.set_defaults(func=lwm_export)
    add_examples(p, "lwm convert lwm-export --ckpt runs/stages/chat-1024 --out lwm-format/",
                 "lwm convert lwm-export --ckpt lwm-chat-1m/ --out rescan/ --scan-layers --param-scan-axis 1")

    convert_vqgan.register_convert(actions)
