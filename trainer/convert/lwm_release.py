"""LWM's released Jax checkpoints ↔ this project's checkpoints (``lwm convert lwm-import`` / ``lwm-export``).

An LWM release is a streaming ``params`` file (:mod:`trainer.convert.lwm_streaming`),
for the vision models a pickled VQGAN (:mod:`trainer.convert.lwm_vqgan`) and the
Llama-2 ``tokenizer.model``. The file holds tensors only; :data:`PRESETS` supply
what it does not (head count, RoPE theta, maximum length, norm epsilon), from LWM's
``7b`` config and the theta / ``max_sequence_length`` its README gives per release.

Names (after the ``params``/``params/params`` prefix of train-state files), LWM →
ours, shapes per layer (L layers, stacked by ``nn.scan`` under ``scan_decoder`` with
L at ``param_scan_axis`` 0 or 1, or one subtree ``h/{i}`` per layer):

| LWM | ours |
|---|---|
| ``transformer/wte/embedding`` [V, D] | ``text_embed`` [V, D] |
| ``transformer/vte/embedding`` [W, D] | ``vision_embed`` [W, D] |
| ``h/…/attention/wq`` / ``wk`` ``/kernel`` [D, H*E] | ``layers/attn/q`` / ``k`` [L, D, H, E], RoPE-permuted |
| ``h/…/attention/wv/kernel`` [D, H*E] | ``layers/attn/v`` [L, D, H, E] |
| ``h/…/attention/wo/kernel`` [H*E, D] | ``layers/attn/o`` [L, H, E, D] |
| ``h/…/feed_forward/w1`` / ``w3`` / ``w2`` ``/kernel`` | ``layers/mlp/gate`` / ``up`` / ``down`` |
| ``h/…/attention_norm`` / ``ffn_norm`` ``/kernel`` [D] | ``layers/attn_norm`` / ``mlp_norm`` ``/scale`` |
| ``transformer/ln_f/kernel`` [D] | ``final_norm/scale`` [D] |
| ``lm_head/kernel`` [D, V], ``vision_head/kernel`` [D, W] | ``text_head`` [D, V], ``vision_head`` [D, W] |

RoPE: LWM rotates interleaved pairs of a head's dimensions (``2i``, ``2i+1``, as a
complex number), this model rotates halves (``i``, ``i + E/2``) with the same
frequencies. Reordering each head's output columns of ``wq`` and ``wk`` to
``0, 2, 4, …, 1, 3, 5, …`` makes the halves carry exactly the pairs, and q·k is
unchanged by a common permutation: the logits are LWM's. Export applies the inverse.

Import reads the file once as a stream into preallocated arrays of the model's
size (never more than the record being decoded beside them), checks every key and
shape, and only then writes: a checkpoint (``OUT/checkpoints``), the VQGAN
(``OUT/vqgan``), ``OUT/tokenizer.model`` and ``OUT/lwm_import.json`` naming the
sources' sha256. Import ∘ export is bitwise.

Shape legend: V text vocab, W vision vocab, D d_model, H heads, E head dim, F mlp dim, L layers.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Iterator

import jax
import ml_dtypes
import numpy as np

from schemas import storage, vocab
from trainer import checkpoint
from trainer.convert import lwm_streaming
from trainer.model import ModelConfig

_LWM_7B = ModelConfig(vocab_size=vocab.TEXT_VOCAB_SIZE, d_model=4096, num_layers=32, num_heads=32, num_kv_heads=32,
                      mlp_dim=11008, rms_norm_eps=1e-6)


def _release(theta: float, length: int, vision: bool) -> ModelConfig:
    return dataclasses.replace(_LWM_7B, rope_theta=theta, max_position_embeddings=length,
                               vision_vocab_size=vocab.VISION_VOCAB_SIZE if vision else 0)


# The releases (LWM README "Available models"; theta and max_sequence_length from its needle-eval
# table and run scripts; shapes and rms_norm_eps 1e-6 from lwm/llama.py's '7b' config). Chat and base
# text models of one length share their numbers.
PRESETS: dict[str, ModelConfig] = {
    "lwm-text-32k": _release(1e6, 2**15, False),
    **{f"lwm-text{chat}-{name}": _release(theta, length, False)
       for chat in ("", "-chat")
       for name, theta, length in (("128k", 1e7, 2**17), ("256k", 1e7, 2**18), ("512k", 2.5e7, 2**19),
                                   ("1m", 5e7, 2**20))},
    "lwm-chat-32k": _release(5e7, 2**15, True),
    "lwm-chat-128k": _release(5e7, 2**17, True),
    "lwm-chat-1m": _release(5e7, 2**20, True),
}

_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
_PREFIXES = (("params", "params"), ("params",))
_TRAIN_STATE_ONLY = ("step", "opt_state")  # other top-level keys of a train-state file, skipped
MANIFEST = "lwm_import.json"
CHECKPOINTS = "checkpoints"
VQGAN_DIR = "vqgan"
TOKENIZER = "tokenizer.model"

# LWM per-layer name → (our group, our name, is a RoPE projection).
_LAYER = {
    "attention/wq/kernel": ("attn", "q", True),
    "attention/wk/kernel": ("attn", "k", True),
    "attention/wv/kernel": ("attn", "v", False),
    "attention/wo/kernel": ("attn", "o", False),
    "feed_forward/w1/kernel": ("mlp", "gate", False),
    "feed_forward/w3/kernel": ("mlp", "up", False),
    "feed_forward/w2/kernel": ("mlp", "down", False),
    "attention_norm/kernel": ("attn_norm", "scale", False),
    "ffn_norm/kernel": ("mlp_norm", "scale", False),
}
_TOP = {
    "transformer/wte/embedding": "text_embed",
    "transformer/vte/embedding": "vision_embed",
    "transformer/ln_f/kernel": "final_norm/scale",
    "lm_head/kernel": "text_head",
    "vision_head/kernel": "vision_head",
}
_SCANNED = re.compile(r"^transformer/h/scan_decoder/(.+)$")
_UNSCANNED = re.compile(r"^transformer/h/(\d+)/(.+)$")


def get_preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown LWM release preset {name!r}; choose from {sorted(PRESETS)}")
    return PRESETS[name]


def rope_permutation(head_dim: int) -> np.ndarray:
    """Our column ``j`` of a head is LWM's column ``perm[j]``: even (real) parts first, then odd."""
    return np.concatenate([np.arange(0, head_dim, 2), np.arange(1, head_dim, 2)])


def _lwm_layer_shape(name: str, c: ModelConfig) -> tuple[int, ...]:
    d, h, f = c.d_model, c.num_heads * c.head_dim, c.mlp_dim
    return {"wq": (d, h), "wk": (d, h), "wv": (d, h), "wo": (h, d), "w1": (d, f), "w3": (d, f), "w2": (f, d),
            "attention_norm": (d,), "ffn_norm": (d,)}[name.split("/")[-2]]


def _lwm_top_shape(name: str, c: ModelConfig) -> tuple[int, ...]:
    return {"text_embed": (c.vocab_size, c.d_model), "vision_embed": (c.vision_vocab_size, c.d_model),
            "final_norm/scale": (c.d_model,), "text_head": (c.d_model, c.vocab_size),
            "vision_head": (c.d_model, c.vision_vocab_size)}[_TOP[name]]


def _layer_to_ours(lwm_name: str, w: np.ndarray, c: ModelConfig) -> np.ndarray:
    """One layer's LWM tensor (or a stack of them on axis 0) in our layout."""
    group, _, rope = _LAYER[lwm_name]
    lead = w.shape[:-2] if group in ("attn", "mlp") else w.shape[:-1]
    if group == "attn":
        if lwm_name.endswith("wo/kernel"):
            return w.reshape(*lead, c.num_heads, c.head_dim, c.d_model)
        w = w.reshape(*lead, c.d_model, c.num_heads, c.head_dim)
        return w[..., rope_permutation(c.head_dim)] if rope else w
    return w


def _layer_to_lwm(lwm_name: str, w: np.ndarray, c: ModelConfig) -> np.ndarray:
    group, _, rope = _LAYER[lwm_name]
    if group != "attn":
        return w
    lead = w.shape[:-3]
    if lwm_name.endswith("wo/kernel"):
        return w.reshape(*lead, c.num_heads * c.head_dim, c.d_model)
    if rope:
        w = w[..., np.argsort(rope_permutation(c.head_dim))]
    return w.reshape(*lead, c.d_model, c.num_heads * c.head_dim)


def _strip(key: tuple[str, ...]) -> str | None:
    """The parameter name of a record's key, or None for a train state's other entries."""
    for prefix in _PREFIXES:
        if key[:len(prefix)] == prefix:
            return "/".join(key[len(prefix):])
    if key[0] in _TRAIN_STATE_ONLY:
        return None
    return "/".join(key)


@dataclasses.dataclass
class _Target:
    """Our parameters being filled from the stream: flat name → array, and which layers each has."""

    config: ModelConfig
    dtype: Any = None
    arrays: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    filled: dict[str, set] = dataclasses.field(default_factory=dict)
    scan_axis: int | None = None
    layout: str | None = None  # "scanned" or "per-layer"

    def array(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name not in self.arrays:
            self.arrays[name] = np.empty(shape, self.dtype)
            self.filled[name] = set()
        return self.arrays[name]


def _check_dtype(key: str, w: np.ndarray, target: _Target, dtype: str | None) -> None:
    if w.dtype.name not in _DTYPES:
        raise ValueError(f"{key}: dtype {w.dtype} is not one of {sorted(_DTYPES)}")
    if target.dtype is None:
        target.dtype = _DTYPES[dtype or w.dtype.name]


def _set_layout(target: _Target, key: str, layout: str) -> None:
    if target.layout not in (None, layout):
        raise ValueError(f"{key}: a {layout} layer among {target.layout} ones")
    target.layout = layout


def _scan_axis(key: str, shape: tuple[int, ...], single: tuple[int, ...], c: ModelConfig, target: _Target) -> int:
    """The axis a scanned tensor stacks its layers on (0 or 1), checked against the others'."""
    fits = [a for a in (0, 1) if shape == (*single[:a], c.num_layers, *single[a:])]
    if target.scan_axis in fits:
        return target.scan_axis
    if not fits or target.scan_axis is not None:
        want = " or ".join(str((*single[:a], c.num_layers, *single[a:])) for a in (0, 1))
        raise ValueError(f"{key}: shape {shape}, expected {want} for the preset "
                         f"(param_scan_axis {target.scan_axis if target.scan_axis is not None else '0 or 1'})")
    target.scan_axis = fits[0]
    return fits[0]


def _store(key: str, w: np.ndarray, target: _Target, dtype: str | None) -> None:
    c = target.config
    _check_dtype(key, w, target, dtype)
    if key in _TOP:
        ours = _TOP[key]
        if ours.startswith("vision") and not c.vision_vocab_size:
            raise ValueError(f"unexpected key {key!r}: the preset is a text-only model (vision_vocab_size 0)")
        want = _lwm_top_shape(key, c)
        if w.shape != want:
            raise ValueError(f"{key}: shape {w.shape} contradicts the preset, which expects {want}")
        target.array(ours, want)[...] = w
        target.filled[ours].add("all")
        return
    scanned, per_layer = _SCANNED.match(key), _UNSCANNED.match(key)
    name = (scanned or per_layer).group(scanned and 1 or 2) if (scanned or per_layer) else None
    if name not in _LAYER:
        raise ValueError(f"unexpected key {key!r}: not a parameter of LWM's model")
    group, leaf, _ = _LAYER[name]
    single = _lwm_layer_shape(name, c)
    ours = f"layers/{group}/{leaf}"
    our_shape = (c.num_layers, *_layer_to_ours(name, np.empty(single, np.int8), c).shape)
    if scanned:
        _set_layout(target, key, "scanned")
        axis = _scan_axis(key, w.shape, single, c, target)
        target.array(ours, our_shape)[...] = _layer_to_ours(name, np.moveaxis(w, axis, 0), c)
        target.filled[ours].update(range(c.num_layers))
        return
    _set_layout(target, key, "per-layer")
    layer = int(per_layer.group(1))
    if layer >= c.num_layers:
        raise ValueError(f"unexpected key {key!r}: layer {layer}, but the preset has {c.num_layers} layers")
    if w.shape != single:
        raise ValueError(f"{key}: shape {w.shape} contradicts the preset, which expects {single}")
    target.array(ours, our_shape)[layer] = _layer_to_ours(name, w, c)
    target.filled[ours].add(layer)


def _lwm_names(config: ModelConfig, scanned: bool) -> Iterator[tuple[str, str]]:
    """(LWM key, our flat name) of every parameter, in the order export writes them."""
    tops = [k for k, v in _TOP.items() if config.vision_vocab_size or not v.startswith("vision")]
    yield from ((k, _TOP[k]) for k in tops if k.startswith("transformer/") and "ln_f" not in k)
    layers = ["scan_decoder"] if scanned else [str(i) for i in range(config.num_layers)]
    for layer in layers:
        for name, (group, leaf, _) in _LAYER.items():
            yield f"transformer/h/{layer}/{name}", f"layers/{group}/{leaf}"
    yield from ((k, _TOP[k]) for k in tops if "ln_f" in k or not k.startswith("transformer/"))


def _check_complete(target: _Target) -> None:
    c = target.config
    for key, ours in _lwm_names(c, scanned=target.layout == "scanned"):
        have = target.filled.get(ours, set())
        if ours.startswith("layers/") and target.layout != "scanned":
            have = have & {int(key.split("/")[2])}
        if not have:
            raise ValueError(f"missing key {key!r} in the params file")


def read_params(path: str, config: ModelConfig, dtype: str | None = None) -> tuple[dict, dict[str, Any]]:
    """Our parameters (nested numpy arrays) from an LWM streaming file, and what was read (sha256, layout).

    ``dtype``: the parameters' dtype (``float32``, ``bfloat16``, ``float16``); None keeps the file's.
    """
    if dtype is not None and dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    target = _Target(config)
    reader = lwm_streaming.StreamReader(path)
    for key, w in reader:
        name = _strip(key)
        if name is not None:
            _store(name, w, target, dtype)
            del w  # the record's buffer goes before the next one is read
    _check_complete(target)
    params: dict[str, Any] = {}
    for name, array in target.arrays.items():
        node = params
        *groups, leaf = name.split("/")
        for g in groups:
            node = node.setdefault(g, {})
        node[leaf] = array
    info = {"sha256": reader.sha256, "bytes": reader.size, "layout": target.layout,
            "param_scan_axis": target.scan_axis, "dtype": np.dtype(target.dtype).name}
    return params, info


def iter_lwm_records(params: Any, config: ModelConfig, scan_layers: bool = False, scan_axis: int = 0,
                     dtype: str | None = None) -> Iterator[tuple[tuple[str, ...], np.ndarray]]:
    """LWM's ``(key path, array)`` records of our ``params``, one tensor at a time (``params::`` file, no prefix)."""
    cast = _DTYPES[dtype] if dtype else None
    flat = {}

    def leaf(name: str):
        if name not in flat:
            node = params
            for part in name.split("/"):
                node = node[part]
            flat.clear()  # keep at most one host copy of a stacked tensor
            flat[name] = np.asarray(jax.device_get(node))
        return flat[name]

    for key, ours in _lwm_names(config, scanned=scan_layers):
        if ours.startswith("layers/"):
            lwm_name = key.split("/", 3)[3]
            stacked = leaf(ours)
            if scan_layers:
                w = np.moveaxis(_layer_to_lwm(lwm_name, stacked, config), 0, scan_axis)
            else:
                w = _layer_to_lwm(lwm_name, stacked[int(key.split("/")[2])], config)
        else:
            w = leaf(ours)
        w = np.ascontiguousarray(w if cast is None else w.astype(cast))
        yield tuple(key.split("/")), w


def _to_device(params: dict) -> dict:
    """The arrays as jax arrays, moved one at a time (each host copy freed as it goes), so the
    checkpoint writer holds the model once rather than making a device copy of it all."""
    for name, value in list(params.items()):
        if isinstance(value, dict):
            params[name] = _to_device(value)
        else:
            params[name] = jax.device_put(value)
            del value
    return params


def _sha256_of(path: str) -> str:
    import hashlib

    digest = hashlib.sha256()
    with storage.open(path, "rb") as f:
        while block := f.read(16 << 20):
            digest.update(block)
    return digest.hexdigest()


def _check_out(out: str) -> None:
    if storage.listdir(out):
        raise ValueError(f"output directory {out!r} is not empty")


def import_release(params_path: str, config: ModelConfig, out: str, *, vqgan: str | None = None,
                   tokenizer: str | None = None, dtype: str | None = None, preset: str = "") -> ModelConfig:
    """Converts an LWM release into ``out`` (checkpoint, VQGAN, tokenizer, manifest); returns the model config.

    Everything is read and checked before anything is written.
    """
    from pipelines.tokens.text_tokenizer import TextTokenizer
    from trainer.convert import lwm_vqgan

    out = os.fspath(out)
    for what, path in (("params", params_path), ("vqgan", vqgan), ("tokenizer", tokenizer)):
        if path is not None and not storage.isfile(path):
            raise ValueError(f"--{what} {path!r}: no such file")
    _check_out(out)
    tok = TextTokenizer(tokenizer) if tokenizer else None
    if tok is not None and tok.vocab_size > config.vocab_size:
        raise ValueError(f"--tokenizer has {tok.vocab_size} pieces, more than the model's vocab_size "
                         f"{config.vocab_size}")
    vq = lwm_vqgan.load_lwm_vqgan(vqgan) if vqgan else None
    params, info = read_params(params_path, config, dtype)
    config = dataclasses.replace(config, param_dtype=info["dtype"])
    sources = {"params": {"path": params_path, "sha256": info["sha256"], "bytes": info["bytes"]}}
    checkpoint.save_params(storage.join(out, CHECKPOINTS), _to_device(params), config)
    del params
    if vq is not None:
        vq.save(storage.join(out, VQGAN_DIR))
        sources["vqgan"] = {"path": vqgan, "sha256": _sha256_of(vqgan)}
    if tok is not None:
        storage.write_atomically(storage.join(out, TOKENIZER), tok._model_bytes)
        sources["tokenizer"] = {"path": tokenizer, "sha256": tok.sha256}
    manifest = {"format": "lwm-import", "version": 1, "preset": preset, "sources": sources,
                "layout": {"layers": info["layout"], "param_scan_axis": info["param_scan_axis"],
                           "file_dtype_kept" if dtype is None else "cast_to": info["dtype"]},
                "model_config": config.to_dict()}
    storage.write_atomically(storage.join(out, MANIFEST), json.dumps(manifest, indent=2, sort_keys=True).encode())
    return config


def export_release(ckpt: str, out: str, *, step: int | None = None, scan_layers: bool = False,
                   scan_axis: int = 0, dtype: str | None = None) -> str:
    """Writes a checkpoint as LWM's streaming ``params`` file ``out/params``; returns its path.

    When ``ckpt`` is an import's directory, its VQGAN (as LWM's pickle, ``out/vqgan``) and
    ``tokenizer.model`` are written beside it.
    """
    from pipelines.tokens.vqgan import VQGAN
    from trainer.convert import lwm_vqgan

    if scan_axis not in (0, 1):
        raise ValueError(f"param_scan_axis must be 0 or 1, got {scan_axis}")
    if dtype is not None and dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    ckpt, out = os.fspath(ckpt), os.fspath(out)
    _check_out(out)
    vq = None
    if storage.isfile(storage.join(ckpt, VQGAN_DIR, "config.json")):
        vq = VQGAN.load(storage.join(ckpt, VQGAN_DIR))
        if vq.input_range != lwm_vqgan.INPUT_RANGE:
            raise ValueError(f"{ckpt}/{VQGAN_DIR} takes frames in {vq.input_range}, LWM feeds "
                             f"{lwm_vqgan.INPUT_RANGE}: its weights would not fit LWM's code")
    params, config = checkpoint.restore_params(checkpoint.resolve_dir(ckpt), step)
    path = storage.join(out, "params")
    lwm_streaming.write_records(path, iter_lwm_records(params, config, scan_layers, scan_axis, dtype))
    if vq is not None:
        lwm_vqgan.save_lwm_vqgan(vq, storage.join(out, VQGAN_DIR))
    tokenizer = storage.join(ckpt, TOKENIZER)
    if storage.isfile(tokenizer):
        storage.write_atomically(storage.join(out, TOKENIZER), storage.read_bytes(tokenizer))
    return path
