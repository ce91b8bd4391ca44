"""LWM release import/export: tiny weights of LWM's shapes, written here in LWM's streaming format.

The reference is LWM's forward pass written out in numpy (``lwm/llama.py``,
``lwm/vision_llama.py``): interleaved-pair RoPE, ``wte``/``vte`` chosen by the vision
mask, ``lm_head`` and ``vision_head``.
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import ml_dtypes
import msgpack
import numpy as np
import pytest

from orchestration import cli
from trainer import checkpoint
from trainer.convert import lwm_release, lwm_streaming
from trainer.model import LWM, ModelConfig

TINY = ModelConfig(vocab_size=64, vision_vocab_size=40, d_model=32, num_layers=2, num_heads=4, num_kv_heads=4,
                   mlp_dim=48, rope_theta=5e4, rms_norm_eps=1e-6, max_position_embeddings=128,
                   remat_policy="none", mlp_chunk_size=64)
LAYER_SHAPES = {"attention/wq/kernel": (32, 32), "attention/wk/kernel": (32, 32), "attention/wv/kernel": (32, 32),
                "attention/wo/kernel": (32, 32), "feed_forward/w1/kernel": (32, 48),
                "feed_forward/w3/kernel": (32, 48), "feed_forward/w2/kernel": (48, 32),
                "attention_norm/kernel": (32,), "ffn_norm/kernel": (32,)}


def lwm_weights(config=TINY, seed=0, vision=True):
    """LWM's parameter tree, flat: {"transformer/wte/embedding": array, "transformer/h/0/...": ...}."""
    rng = np.random.default_rng(seed)

    def normal(*shape):
        return (rng.standard_normal(shape) * 0.2).astype(np.float32)

    c = config
    flat = {"transformer/wte/embedding": normal(c.vocab_size, c.d_model),
            "transformer/ln_f/kernel": rng.uniform(0.5, 1.5, c.d_model).astype(np.float32),
            "lm_head/kernel": normal(c.d_model, c.vocab_size)}
    if vision:
        flat["transformer/vte/embedding"] = normal(c.vision_vocab_size, c.d_model)
        flat["vision_head/kernel"] = normal(c.d_model, c.vision_vocab_size)
    for i in range(c.num_layers):
        for name, shape in LAYER_SHAPES.items():
            flat[f"transformer/h/{i}/{name}"] = (rng.uniform(0.5, 1.5, shape).astype(np.float32)
                                                 if name.endswith("norm/kernel") else normal(*shape))
    return flat


def file_records(flat, scan_axis=None, dtype=np.float32, prefix=(), layers=2):
    """Records as LWM's checkpointer writes them: per layer, or stacked on ``scan_axis``."""
    out = {}
    for key, w in flat.items():
        if scan_axis is not None and key.startswith("transformer/h/"):
            _, _, layer, name = key.split("/", 3)
            if layer != "0":
                continue
            stacked = np.stack([flat[f"transformer/h/{i}/{name}"] for i in range(layers)], axis=scan_axis)
            out[f"transformer/h/scan_decoder/{name}"] = stacked
        else:
            out[key] = w
    return [(prefix + tuple(k.split("/")), w.astype(dtype)) for k, w in out.items()]


def write_lwm(path, records):
    lwm_streaming.write_records(str(path), records)
    return str(path)


# --- the reference: LWM's forward pass -------------------------------------------------------------------


def _rms(x, w, eps):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * w


def _rope_interleaved(x_SxHxE, theta):
    e = x_SxHxE.shape[-1]
    freqs = 1.0 / theta ** (np.arange(0, e, 2)[: e // 2].astype(np.float32) / e)
    angles = np.outer(np.arange(x_SxHxE.shape[0]), freqs).astype(np.float32)
    z = x_SxHxE[..., 0::2] + 1j * x_SxHxE[..., 1::2]
    z = z * np.exp(1j * angles)[:, None, :]
    return np.stack([z.real, z.imag], -1).reshape(x_SxHxE.shape)


def lwm_reference_logits(flat, tokens, vision_mask, config=TINY):
    """(text logits, vision logits) of one sequence, as LWM's FlaxVideoLLaMAForCausalLM computes them."""
    c = config
    f = {k: v.astype(np.float64) for k, v in flat.items()}
    x = np.where(vision_mask[:, None], f["transformer/vte/embedding"][np.where(vision_mask, tokens, 0)],
                 f["transformer/wte/embedding"][np.where(vision_mask, 0, tokens)])
    s, e = len(tokens), c.head_dim
    causal = np.tril(np.ones((s, s), bool))
    for i in range(c.num_layers):
        p = lambda name: f[f"transformer/h/{i}/{name}"]  # noqa: E731
        h = _rms(x, p("attention_norm/kernel"), c.rms_norm_eps)
        q = _rope_interleaved((h @ p("attention/wq/kernel")).reshape(s, c.num_heads, e), c.rope_theta)
        k = _rope_interleaved((h @ p("attention/wk/kernel")).reshape(s, c.num_heads, e), c.rope_theta)
        v = (h @ p("attention/wv/kernel")).reshape(s, c.num_heads, e)
        scores = np.einsum("qhe,khe->hqk", q, k) / np.sqrt(e)
        scores = np.where(causal, scores, -np.inf)
        weights = np.exp(scores - scores.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        x = x + np.einsum("hqk,khe->qhe", weights, v).reshape(s, -1) @ p("attention/wo/kernel")
        h = _rms(x, p("ffn_norm/kernel"), c.rms_norm_eps)
        gate = h @ p("feed_forward/w1/kernel")
        x = x + (gate / (1 + np.exp(-gate)) * (h @ p("feed_forward/w3/kernel"))) @ p("feed_forward/w2/kernel")
    x = _rms(x, f["transformer/ln_f/kernel"], c.rms_norm_eps)
    return x @ f["lm_head/kernel"], x @ f["vision_head/kernel"]


def our_logits(ckpt, tokens, vision_mask):
    params, config = checkpoint.restore_params(checkpoint.resolve_dir(str(ckpt)))
    model = LWM(dataclasses.replace(config, dtype="float32"))
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
    s = len(tokens)
    hidden = model.apply({"params": params}, tokens[None], vision_mask[None], np.ones((1, s), np.int32),
                         np.arange(s, dtype=np.int32)[None])
    return np.asarray(hidden @ params["text_head"])[0], np.asarray(hidden @ params["vision_head"])[0]


def _inputs(seed=1, s=20):
    rng = np.random.default_rng(seed)
    vision_mask = np.zeros(s, bool)
    vision_mask[5:14] = True
    tokens = np.where(vision_mask, rng.integers(0, TINY.vision_vocab_size, s), rng.integers(0, TINY.vocab_size, s))
    return tokens.astype(np.int32), vision_mask


# --- import parity --------------------------------------------------------------------------------------


@pytest.mark.parametrize("scan_axis,dtype", [(None, np.float32), (0, np.float32), (1, ml_dtypes.bfloat16),
                                             (None, ml_dtypes.bfloat16)])
def test_imported_logits_equal_lwm_forward_pass(tmp_path, scan_axis, dtype):
    flat = lwm_weights()
    path = write_lwm(tmp_path / "params", file_records(flat, scan_axis, dtype))
    lwm_release.import_release(path, TINY, str(tmp_path / "out"), dtype="float32")
    exact = {k: v.astype(dtype).astype(np.float32) for k, v in flat.items()}  # what the file holds
    tokens, vision_mask = _inputs()
    text, vision = our_logits(tmp_path / "out", tokens, vision_mask)
    ref_text, ref_vision = lwm_reference_logits(exact, tokens, vision_mask)
    np.testing.assert_allclose(text, ref_text, atol=1e-4, rtol=0)
    np.testing.assert_allclose(vision, ref_vision, atol=1e-4, rtol=0)
    manifest = json.loads((tmp_path / "out" / "lwm_import.json").read_text())
    assert manifest["sources"]["params"]["sha256"] == lwm_streaming.write_records(str(tmp_path / "again"),
                                                                                  file_records(flat, scan_axis, dtype))
    assert manifest["layout"]["param_scan_axis"] == scan_axis


def test_train_state_file_reads_params_under_params_params_and_skips_the_rest(tmp_path):
    flat = lwm_weights()
    records = [(("step",), np.array(7, np.int32))]
    records += file_records(flat, 0, prefix=("params", "params"))
    records += [(("opt_state", "1", "0", "mu", "params", "lm_head", "kernel"), np.zeros((2, 2), np.float32))]
    path = write_lwm(tmp_path / "state", records)
    params, info = lwm_release.read_params(path, TINY)
    assert info["layout"] == "scanned" and info["dtype"] == "float32"
    np.testing.assert_array_equal(params["text_embed"], flat["transformer/wte/embedding"])


def test_text_only_release_has_no_vision_parts(tmp_path):
    config = dataclasses.replace(TINY, vision_vocab_size=0)
    path = write_lwm(tmp_path / "params", file_records(lwm_weights(vision=False)))
    params, _ = lwm_release.read_params(path, config)
    assert "vision_embed" not in params and params["layers"]["attn"]["q"].shape == (2, 32, 4, 8)


# --- export round trips ---------------------------------------------------------------------------------


@pytest.mark.parametrize("scan_axis,dtype", [(None, ml_dtypes.bfloat16), (1, np.float32)])
def test_export_of_an_import_writes_the_same_records_and_import_of_export_is_bitwise(tmp_path, scan_axis, dtype):
    records = file_records(lwm_weights(), scan_axis, dtype)
    path = write_lwm(tmp_path / "params", records)
    lwm_release.import_release(path, TINY, str(tmp_path / "ckpt"))
    args = ["convert", "lwm-export", "--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "export"),
            "--param-scan-axis", str(scan_axis or 0)] + (["--scan-layers"] if scan_axis is not None else [])
    assert cli.main(args) == 0
    exported = {k: (v.dtype, v.tobytes()) for k, v in lwm_streaming.read_records(str(tmp_path / "export" / "params"))}
    assert exported == {k: (v.dtype, v.tobytes()) for k, v in records}
    lwm_release.import_release(str(tmp_path / "export" / "params"), TINY, str(tmp_path / "again"))
    first, _ = checkpoint.restore_params(str(tmp_path / "ckpt" / "checkpoints"))
    second, _ = checkpoint.restore_params(str(tmp_path / "again" / "checkpoints"))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8)),
                 first, second)


# --- bad inputs: one line, nothing written --------------------------------------------------------------


def _bad_file(tmp_path, kind):
    records = file_records(lwm_weights())
    path = tmp_path / "params"
    if kind == "truncated":
        write_lwm(path, records)
        path.write_bytes(path.read_bytes()[:-100])
    elif kind == "missing":
        write_lwm(path, [r for r in records if r[0] != ("transformer", "h", "1", "ffn_norm", "kernel")])
    elif kind == "unexpected":
        write_lwm(path, records + [(("transformer", "h", "0", "attention", "wz", "kernel"), np.zeros(2, np.float32))])
    elif kind == "shape":
        write_lwm(path, [(k, np.zeros((64, 16), np.float32)) if k == ("transformer", "wte", "embedding") else (k, w)
                         for k, w in records])
    elif kind == "not_a_pair":
        path.write_bytes(msgpack.packb([["lm_head", "kernel"], b"x", 3]))
    elif kind == "layer_out_of_range":
        write_lwm(path, records + [(("transformer", "h", "5", "ffn_norm", "kernel"), np.ones(32, np.float32))])
    return path


@pytest.mark.parametrize("kind,message", [
    ("truncated", "truncated"),
    ("missing", "missing key 'transformer/h/1/ffn_norm/kernel'"),
    ("unexpected", "unexpected key 'transformer/h/0/attention/wz/kernel'"),
    ("shape", "transformer/wte/embedding: shape (64, 16) contradicts the preset"),
    ("not_a_pair", "record 0 is a 3-item list, not a (key path, tensor bytes) pair"),
    ("layer_out_of_range", "layer 5, but the preset has 2 layers"),
])
def test_bad_params_file_is_one_line_error_before_anything_is_written(tmp_path, capsys, kind, message):
    path = _bad_file(tmp_path, kind)
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY.to_dict()))
    out = tmp_path / "out"
    code = cli.main(["convert", "lwm-import", "--params", str(path), "--preset", "lwm-chat-32k",
                     "--config", str(config), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert not out.exists()


def test_unknown_preset_and_missing_file_are_one_line_errors(tmp_path, capsys):
    assert cli.main(["convert", "lwm-import", "--params", str(tmp_path / "nope"), "--preset", "lwm-7b-xl",
                     "--out", str(tmp_path / "out")]) == 2
    assert "unknown LWM release preset 'lwm-7b-xl'" in capsys.readouterr().err
    assert cli.main(["convert", "lwm-import", "--params", str(tmp_path / "nope"), "--preset", "lwm-chat-1m",
                     "--out", str(tmp_path / "out")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_presets_carry_each_releases_theta_and_length():
    p = lwm_release.PRESETS
    assert (p["lwm-text-32k"].rope_theta, p["lwm-text-128k"].rope_theta, p["lwm-text-chat-256k"].rope_theta,
            p["lwm-text-512k"].rope_theta, p["lwm-text-1m"].rope_theta) == (1e6, 1e7, 1e7, 2.5e7, 5e7)
    assert [p[f"lwm-chat-{n}"].max_position_embeddings for n in ("32k", "128k", "1m")] == [2**15, 2**17, 2**20]
    assert all(p[f"lwm-chat-{n}"].vision_vocab_size == 8448 and p[f"lwm-chat-{n}"].rope_theta == 5e7
               for n in ("32k", "128k", "1m"))
    assert p["lwm-text-1m"].vision_vocab_size == 0 and p["lwm-text-1m"].num_kv_heads == 32
