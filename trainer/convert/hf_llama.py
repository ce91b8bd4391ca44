"""Hugging Face Llama interop: safetensors checkpoints in, safetensors checkpoints out.

Import (``import_hf``) reads an HF Llama directory (``config.json`` plus
``model.safetensors``, or shards listed in ``model.safetensors.index.json``) into
an LWM checkpoint (``trainer.checkpoint``): the text model comes from HF, the vision
embedding and head (if the config has a vision vocabulary) are freshly initialised.
Export (``export_hf``) writes the text model back in HF layout (``config.json`` +
safetensors) that ``transformers.LlamaForCausalLM.from_pretrained`` loads, and the
tokenizer (``tokenizer.model``, ``tokenizer.json``, ``tokenizer_config.json``) that
``AutoTokenizer.from_pretrained`` loads. With ``merge_vision_vocab`` a vision model
becomes one standard Llama whose vocabulary is the text vocabulary followed by the
vision ids (vision id ``i`` is token ``V + i``; embedding and output rows
concatenated), so its logits are LWM's text logits followed by its vision logits; the
offset is in ``config.json`` (``lwm_vision_token_offset``) and the directory's README.
Pickle files (``*.bin``, ``*.pt``) are never loaded.

Both sides use the same RoPE convention (HF's half-split ``rotate_half``), so
projection matrices map by transpose and reshape only:

| HF tensor | LWM parameter |
|---|---|
| ``model.embed_tokens.weight`` [V, D] | ``text_embed`` [V, D] |
| ``model.layers.{i}.self_attn.q_proj.weight`` [H*E, D] | ``layers/attn/q`` [L, D, H, E] |
| ``...k_proj`` / ``...v_proj`` [K*E, D] | ``layers/attn/k`` / ``v`` [L, D, K, E] |
| ``...o_proj.weight`` [D, H*E] | ``layers/attn/o`` [L, H, E, D] |
| ``model.layers.{i}.mlp.gate_proj`` / ``up_proj`` [F, D] | ``layers/mlp/gate`` / ``up`` [L, D, F] |
| ``model.layers.{i}.mlp.down_proj`` [D, F] | ``layers/mlp/down`` [L, F, D] |
| ``model.layers.{i}.input_layernorm`` / ``post_attention_layernorm`` [D] | ``layers/attn_norm`` / ``mlp_norm`` ``scale`` [L, D] |
| ``model.norm.weight`` [D] | ``final_norm/scale`` [D] |
| ``lm_head.weight`` [V, D] (or tied to the embedding) | ``text_head`` [D, V] |
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import jax
import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from schemas.typed_config import from_mapping
from trainer import checkpoint
from trainer.model import ModelConfig, init_params

_CONFIG = "config.json"
_SINGLE = "model.safetensors"
_INDEX = "model.safetensors.index.json"
_SPM_FILE = "tokenizer.model"
_NUMPY_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
# HF config key -> ModelConfig field, for the fields that fix the weights' shapes.
_SHAPE_FIELDS = {
    "vocab_size": "vocab_size",
    "hidden_size": "d_model",
    "num_hidden_layers": "num_layers",
    "num_attention_heads": "num_heads",
    "num_key_value_heads": "num_kv_heads",
    "intermediate_size": "mlp_dim",
}


def _layer(i: int, name: str) -> str:
    return f"model.layers.{i}.{name}.weight"


def read_hf_config(hf_dir: str | os.PathLike) -> dict[str, Any]:
    path = os.path.join(hf_dir, _CONFIG)
    if not os.path.isfile(path):
        raise ValueError(f"{os.fspath(hf_dir)!r} has no {_CONFIG}")
    with open(path) as f:
        return json.load(f)


def _rope_theta(hf: dict[str, Any]) -> float:
    rope = hf.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default" or hf.get("rope_scaling"):
        raise ValueError(f"only default RoPE is supported, got rope_parameters={rope} "
                         f"rope_scaling={hf.get('rope_scaling')}")
    return float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))


def config_from_hf(hf: dict[str, Any], base: ModelConfig | None = None) -> ModelConfig:
    """The ``ModelConfig`` of an HF Llama config; other fields from ``base``.

    Shape fields must agree with ``base`` when it is given (a preset that does not
    fit the weights is an error); RoPE theta, norm epsilon and maximum positions
    always come from the HF config. Unsupported Llama variants raise ValueError.
    """
    if hf.get("model_type") != "llama":
        raise ValueError(f"expected an HF Llama config (model_type 'llama'), got {hf.get('model_type')!r}")
    if hf.get("hidden_act", "silu") != "silu" or hf.get("attention_bias") or hf.get("mlp_bias"):
        raise ValueError("only SiLU Llama models without attention/MLP biases are supported")
    missing = sorted(k for k in _SHAPE_FIELDS if k not in hf and k != "num_key_value_heads")
    if missing:
        raise ValueError(f"the HF config lacks {missing}")
    hf = {**hf, "num_key_value_heads": hf.get("num_key_value_heads") or hf["num_attention_heads"]}
    shapes = {field: int(hf[key]) for key, field in _SHAPE_FIELDS.items()}
    head_dim = hf.get("head_dim") or shapes["d_model"] // shapes["num_heads"]
    if head_dim * shapes["num_heads"] != shapes["d_model"]:
        raise ValueError(f"head_dim {head_dim} * heads {shapes['num_heads']} != hidden_size {shapes['d_model']}")
    if base is not None:
        wrong = {f: (getattr(base, f), v) for f, v in shapes.items() if getattr(base, f) != v}
        if wrong:
            raise ValueError(f"the base config does not fit the HF weights (base, hf): {wrong}")
    fields = {**shapes, "rope_theta": _rope_theta(hf), "rms_norm_eps": hf.get("rms_norm_eps", 1e-6),
              "max_position_embeddings": hf.get("max_position_embeddings", 4096)}
    return from_mapping(ModelConfig, fields, "HF config.json", base=base or ModelConfig())


def hf_config(config: ModelConfig, dtype: str, merge_vision_vocab: bool = False) -> dict[str, Any]:
    """An HF ``LlamaConfig`` dict for the text part of ``config`` (with the vision ids appended if merged)."""
    merged = {"lwm_vision_token_offset": config.vocab_size, "lwm_vision_vocab_size": config.vision_vocab_size}
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size + (config.vision_vocab_size if merge_vision_vocab else 0),
        **(merged if merge_vision_vocab else {}),
        "hidden_size": config.d_model,
        "intermediate_size": config.mlp_dim,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "initializer_range": config.init_std,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "dtype": dtype,
    }


def _bpe_merges(pieces: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """BPE merges of a SentencePiece BPE model: every split of a piece into two pieces, the best-scored
    (earliest-learnt) merged piece first, splits of one piece by their halves' ids."""
    ids = {piece: i for i, piece in enumerate(pieces)}
    merges = []
    for merged, score in zip(pieces, scores):
        splits = [(merged[:k], merged[k:]) for k in range(1, len(merged)) if merged[:k] in ids and merged[k:] in ids]
        merges += [(-score, ids[a], ids[b], a, b) for a, b in splits]
    return [(a, b) for *_, a, b in sorted(merges)]


def tokenizer_files(spm_path: str, config: ModelConfig) -> dict[str, bytes]:
    """``tokenizer.model``, ``tokenizer.json`` and ``tokenizer_config.json`` of a SentencePiece BPE model
    (Llama-2's, or one ``lwm tokenizer train`` wrote), for ``AutoTokenizer.from_pretrained``.

    ``tokenizer.json`` is built from the model's pieces and scores with the ``tokenizers``
    library, the way Llama-2's is: BPE with byte fallback, a ``▁`` prefix and spaces as ``▁``,
    BOS added in front. (SentencePiece's ``remove_extra_whitespaces``, off in Llama-2's
    model, is not reproduced.)
    """
    import sentencepiece as spm
    import tokenizers
    from tokenizers import decoders, normalizers, processors
    from transformers import PreTrainedTokenizerFast

    with open(spm_path, "rb") as f:
        data = f.read()
    sp = spm.SentencePieceProcessor(model_proto=data)
    if sp.get_piece_size() > config.vocab_size:
        raise ValueError(f"{spm_path}: {sp.get_piece_size()} pieces, more than the model's vocab_size "
                         f"{config.vocab_size}")
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    special = {"unk_token": pieces[sp.unk_id()], "bos_token": pieces[sp.bos_id()], "eos_token": pieces[sp.eos_id()]}
    model = tokenizers.models.BPE(vocab={p: i for i, p in enumerate(pieces)},
                                  merges=_bpe_merges(pieces, [sp.get_score(i) for i in range(len(pieces))]),
                                  unk_token=special["unk_token"], fuse_unk=True, byte_fallback=True)
    tok = tokenizers.Tokenizer(model)
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens([tokenizers.AddedToken(t, normalized=False, special=True) for t in special.values()])
    bos = special["bos_token"]
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                       special_tokens=[(bos, sp.bos_id())])
    with tempfile.TemporaryDirectory() as tmp:
        PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=config.max_position_embeddings,
                                clean_up_tokenization_spaces=False, **special).save_pretrained(tmp)
        with open(os.path.join(tmp, "tokenizer.json"), "rb") as f:
            tokenizer_json = f.read()
        with open(os.path.join(tmp, "tokenizer_config.json")) as f:
            tokenizer_config = json.load(f)
    # A class name every transformers release knows (newer ones write their own backend's name).
    tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    tokenizer_config.pop("backend", None)
    return {_SPM_FILE: data, "tokenizer.json": tokenizer_json,
            "tokenizer_config.json": json.dumps(tokenizer_config, indent=2).encode()}


def _safetensors_files(hf_dir: str | os.PathLike) -> list[str]:
    index = os.path.join(hf_dir, _INDEX)
    if os.path.isfile(index):
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(hf_dir, n) for n in names]
    single = os.path.join(hf_dir, _SINGLE)
    if os.path.isfile(single):
        return [single]
    raise ValueError(f"{os.fspath(hf_dir)!r} has neither {_SINGLE} nor {_INDEX} "
                     "(pickle checkpoints such as pytorch_model.bin are not loaded)")


def load_hf_tensors(hf_dir: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of an HF safetensors checkpoint as host numpy arrays (bf16 kept)."""
    tensors = {}
    with jax.default_device(jax.devices("cpu")[0]):
        for path in _safetensors_files(hf_dir):
            with safe_open(path, framework="flax") as f:
                for name in f.keys():
                    tensors[name] = np.asarray(f.get_tensor(name))
    return tensors


def params_from_hf(tensors: dict[str, np.ndarray], config: ModelConfig, rng: jax.Array) -> Any:
    """LWM parameters: text model from HF ``tensors``, vision parts freshly initialised."""
    c, dtype = config, _NUMPY_DTYPES[config.param_dtype]

    def get(name, shape):
        if name not in tensors:
            raise ValueError(f"HF checkpoint lacks tensor {name!r}")
        t = tensors[name]
        if t.shape != shape:
            raise ValueError(f"HF tensor {name!r} has shape {t.shape}, expected {shape}")
        return t.astype(dtype)

    def stack(name, shape, to_ours):
        return np.stack([to_ours(get(_layer(i, name), shape)) for i in range(c.num_layers)])

    d, e, h, k, f = c.d_model, c.head_dim, c.num_heads, c.num_kv_heads, c.mlp_dim
    embed = get("model.embed_tokens.weight", (c.vocab_size, d))
    head = get("lm_head.weight", (c.vocab_size, d)) if "lm_head.weight" in tensors else embed
    params = jax.tree.map(np.asarray, init_params(config, rng))
    params.update(
        text_embed=embed,
        text_head=np.ascontiguousarray(head.T),
        final_norm={"scale": get("model.norm.weight", (d,))},
        layers={
            "attn_norm": {"scale": stack("input_layernorm", (d,), lambda w: w)},
            "mlp_norm": {"scale": stack("post_attention_layernorm", (d,), lambda w: w)},
            "attn": {
                "q": stack("self_attn.q_proj", (h * e, d), lambda w: w.T.reshape(d, h, e)),
                "k": stack("self_attn.k_proj", (k * e, d), lambda w: w.T.reshape(d, k, e)),
                "v": stack("self_attn.v_proj", (k * e, d), lambda w: w.T.reshape(d, k, e)),
                "o": stack("self_attn.o_proj", (d, h * e), lambda w: w.T.reshape(h, e, d)),
            },
            "mlp": {
                "gate": stack("mlp.gate_proj", (f, d), lambda w: w.T),
                "up": stack("mlp.up_proj", (f, d), lambda w: w.T),
                "down": stack("mlp.down_proj", (d, f), lambda w: w.T),
            },
        },
    )
    return params


def params_to_hf(params: Any, config: ModelConfig, dtype: str, merge_vision_vocab: bool = False
                 ) -> dict[str, np.ndarray]:
    """HF Llama tensors from LWM parameters: the text model, plus the vision rows after the text ones if merged."""
    np_dtype = _NUMPY_DTYPES[dtype]
    p = jax.tree.map(lambda x: np.asarray(jax.device_get(x)).astype(np_dtype), params)
    c = config
    d = c.d_model
    embed, head = p["text_embed"], p["text_head"].T
    if merge_vision_vocab:
        embed = np.concatenate([embed, p["vision_embed"]])
        head = np.concatenate([head, p["vision_head"].T])
    out = {
        "model.embed_tokens.weight": embed,
        "lm_head.weight": head,
        "model.norm.weight": p["final_norm"]["scale"],
    }
    layers = p["layers"]
    for i in range(c.num_layers):
        out[_layer(i, "input_layernorm")] = layers["attn_norm"]["scale"][i]
        out[_layer(i, "post_attention_layernorm")] = layers["mlp_norm"]["scale"][i]
        for name in ("q", "k", "v"):
            out[_layer(i, f"self_attn.{name}_proj")] = layers["attn"][name][i].reshape(d, -1).T
        out[_layer(i, "self_attn.o_proj")] = layers["attn"]["o"][i].reshape(-1, d).T
        for name in ("gate", "up"):
            out[_layer(i, f"mlp.{name}_proj")] = layers["mlp"][name][i].T
        out[_layer(i, "mlp.down_proj")] = layers["mlp"]["down"][i].T
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def import_hf(hf_dir: str | os.PathLike, out_dir: str | os.PathLike, base: ModelConfig | None = None,
              seed: int = 0, step: int = 0) -> ModelConfig:
    """Converts an HF Llama safetensors directory into an LWM checkpoint; returns its config."""
    config = config_from_hf(read_hf_config(hf_dir), base)
    params = params_from_hf(load_hf_tensors(hf_dir), config, jax.random.key(seed))
    checkpoint.save_params(out_dir, params, config, step=step)
    return config


def export_hf(ckpt_dir: str | os.PathLike, out_dir: str | os.PathLike, step: int | None = None,
              dtype: str | None = None, max_shard_bytes: int = 5 * 2**30, tokenizer: str | None = None,
              merge_vision_vocab: bool = False) -> None:
    """Writes the text model of an LWM checkpoint (and its tokenizer) as an HF Llama directory.

    ``dtype`` defaults to the checkpoint's ``param_dtype``. Tensors are split into
    safetensors shards of at most ``max_shard_bytes`` (with an index) when larger.
    ``tokenizer``: a SentencePiece model; default the ``tokenizer.model`` beside the
    checkpoint (an ``lwm convert lwm-import`` directory's own), else none is written.
    ``merge_vision_vocab``: append the vision vocabulary (see the module docstring).
    """
    ckpt_dir = os.fspath(ckpt_dir)
    own = os.path.join(ckpt_dir, _SPM_FILE)
    tokenizer = tokenizer or (own if os.path.isfile(own) else None)
    if tokenizer is not None and not os.path.isfile(tokenizer):
        raise ValueError(f"--tokenizer {tokenizer!r}: no such file")
    params, config = checkpoint.restore_params(checkpoint.resolve_dir(ckpt_dir), step)
    dtype = dtype or config.param_dtype
    if dtype not in _NUMPY_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_NUMPY_DTYPES)}, got {dtype!r}")
    if merge_vision_vocab and not config.vision_vocab_size:
        raise ValueError(f"--merge-vision-vocab: {ckpt_dir!r} is a text-only model (vision_vocab_size 0)")
    files = tokenizer_files(tokenizer, config) if tokenizer else {}
    tensors = params_to_hf(params, config, dtype, merge_vision_vocab)
    os.makedirs(out_dir, exist_ok=True)
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, t in tensors.items():
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += t.nbytes
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], os.path.join(out_dir, _SINGLE), metadata=metadata)
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, os.path.join(out_dir, fname), metadata=metadata)
            weight_map.update({name: fname for name in shard})
        index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())}, "weight_map": weight_map}
        with open(os.path.join(out_dir, _INDEX), "w") as f:
            json.dump(index, f, indent=2)
    for name, data in files.items():
        with open(os.path.join(out_dir, name), "wb") as f:
            f.write(data)
    if merge_vision_vocab:
        with open(os.path.join(out_dir, "README.md"), "w") as f:
            f.write(_merged_readme(config))
    with open(os.path.join(out_dir, _CONFIG), "w") as f:
        json.dump(hf_config(config, dtype, merge_vision_vocab), f, indent=2)


def _merged_readme(config: ModelConfig) -> str:
    v, w = config.vocab_size, config.vision_vocab_size
    return f"""# LWM vision-language model as a standard Llama

Exported by `lwm convert hf-export --merge-vision-vocab`. The vocabulary is the
{v} text tokens followed by the {w} vision tokens: vision id `i` (a VQGAN code
0-8191, `<eof>` 8192, `<eov>` 8193) is token `{v} + i` (`lwm_vision_token_offset`
= {v} in `config.json`). The logits are LWM's text logits (`[:, :, :{v}]`) followed
by its vision logits (`[:, :, {v}:]`).

A vision span is the text `<vision>`, each frame's 256 codes followed by `<eof>`
(the last frame's by `<eov>`), then the text `</vision>`. The tokenizer holds the
text vocabulary only: add {v} to vision codes before feeding them, and read a
sampled token at or above {v} as vision id `token - {v}`.
"""
