"""HF Llama import/export against a tiny random ``transformers`` model (GQA, non-default RoPE theta)."""

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from orchestration import cli  # noqa: E402
from trainer import checkpoint
from trainer.convert import hf_llama as hf_convert
from trainer.inference import predictor as inference
from trainer.model import get_preset, init_params  # noqa: E402

ROPE_THETA = 50000.0


def _hf_model(tie: bool = False):
    config = transformers.LlamaConfig(
        vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
        max_position_embeddings=256, tie_word_embeddings=tie,
        rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA},
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # non-trivial norm scales, so a swapped norm would show
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


def _hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(tokens, dtype=torch.long)).logits.float().numpy()


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf")
    model = _hf_model()
    model.save_pretrained(path)
    return path, model


@pytest.fixture(scope="module")
def imported(hf_dir, tmp_path_factory):
    path, _ = hf_dir
    ckpt = tmp_path_factory.mktemp("ckpt") / "lwm"
    assert cli.main(["convert", "hf-import", "--hf-dir", str(path), "--out", str(ckpt)]) == 0
    return ckpt


def _tokens(batch=2, seq=24, seed=0):
    return np.random.default_rng(seed).integers(0, 320, (batch, seq)).astype(np.int32)


def test_imported_checkpoint_matches_transformers_logits(hf_dir, imported):
    _, model = hf_dir
    tokens = _tokens()
    ours = inference.logits(imported, tokens)
    np.testing.assert_allclose(ours, _hf_logits(model, tokens), atol=1e-4, rtol=0)


def test_import_reads_architecture_and_rope_theta_from_hf_config(imported):
    config = checkpoint.restore_model_config(imported)
    assert (config.d_model, config.num_heads, config.num_kv_heads, config.vocab_size) == (64, 4, 2, 320)
    assert config.rope_theta == ROPE_THETA
    assert config.vision_vocab_size == 8448  # vision part initialised as configured


def test_exported_directory_loads_in_transformers_with_the_same_logits(hf_dir, imported, tmp_path):
    _, model = hf_dir
    out = tmp_path / "export"
    assert cli.main(["convert", "hf-export", "--ckpt", str(imported), "--out", str(out)]) == 0
    assert not [f for f in os.listdir(out) if f.endswith((".bin", ".pt"))]
    reloaded = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    tokens = _tokens(seed=1)
    np.testing.assert_allclose(_hf_logits(reloaded, tokens), _hf_logits(model, tokens), atol=1e-5, rtol=0)


def test_sharded_safetensors_with_tied_embeddings_import(tmp_path):
    model = _hf_model(tie=True)
    model.save_pretrained(tmp_path / "hf", max_shard_size="100KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    hf_convert.import_hf(tmp_path / "hf", tmp_path / "ckpt", base=None)
    tokens = _tokens(batch=1, seq=16, seed=2)
    np.testing.assert_allclose(inference.logits(tmp_path / "ckpt", tokens), _hf_logits(model, tokens),
                               atol=1e-4, rtol=0)


def test_export_splits_large_models_into_indexed_shards(imported, tmp_path):
    hf_convert.export_hf(imported, tmp_path, max_shard_bytes=64 * 1024)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 1 and all((tmp_path / f).exists() for f in files)


def test_pickle_only_directory_is_refused(hf_dir, tmp_path):
    path, _ = hf_dir
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ValueError, match="pickle"):
        hf_convert.import_hf(tmp_path, tmp_path / "ckpt")


def test_preset_that_does_not_fit_the_weights_is_refused(hf_dir):
    path, _ = hf_dir
    with pytest.raises(ValueError, match="does not fit"):
        hf_convert.config_from_hf(hf_convert.read_hf_config(path), base=get_preset("tiny"))


def test_non_default_rope_scaling_is_refused(hf_dir):
    path, _ = hf_dir
    hf = hf_convert.read_hf_config(path)
    hf["rope_parameters"] = {"rope_type": "linear", "factor": 2.0, "rope_theta": ROPE_THETA}
    with pytest.raises(ValueError, match="RoPE"):
        hf_convert.config_from_hf(hf)


# --- tokenizer files and the merged vision vocabulary (an LWM vision model as one Llama) ----------------

# Texts without newlines or repeated spaces: the test tokenizer normalizes those (Llama-2's does not).
TEXTS = ["The book was long.", "What is the color of the cat? It is yellow!", "<vision>x</vision> ünï 你好"]


@pytest.fixture(scope="module")
def vision_ckpt(tokenizer_path, tmp_path_factory):
    """A small vision model with the test tokenizer's vocabulary, saved like an lwm-import output."""
    import dataclasses
    import shutil

    import jax

    config = dataclasses.replace(get_preset("tiny"), vision_vocab_size=40, init_std=0.2, remat_policy="none")
    path = tmp_path_factory.mktemp("vision")
    params = init_params(config, jax.random.key(3))
    checkpoint.save_params(str(path / "checkpoints"), params, config)
    shutil.copy(tokenizer_path, path / "tokenizer.model")
    return path, config


def _our_logits(ckpt, tokens, vision_mask):
    import jax.numpy as jnp

    from trainer.model import LWM

    params, config = checkpoint.restore_params(checkpoint.resolve_dir(str(ckpt)))
    s = tokens.shape[1]
    hidden = LWM(config).apply({"params": params}, jnp.asarray(tokens), jnp.asarray(vision_mask),
                               jnp.ones_like(tokens), jnp.broadcast_to(jnp.arange(s), tokens.shape))
    return np.asarray(hidden @ params["text_head"]), np.asarray(hidden @ params["vision_head"])


def test_hf_export_writes_a_tokenizer_that_autotokenizer_loads(vision_ckpt, tokenizer_path, tmp_path):
    from pipelines.tokens.text_tokenizer import TextTokenizer

    out = tmp_path / "export"
    assert cli.main(["convert", "hf-export", "--ckpt", str(vision_ckpt[0]), "--out", str(out),
                     "--tokenizer", tokenizer_path]) == 0
    assert {"tokenizer.model", "tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(out))
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    ours = TextTokenizer(tokenizer_path)
    for text in TEXTS:
        assert hf_tok(text, add_special_tokens=False).input_ids == ours.encode(text).tolist(), text
        assert hf_tok(text).input_ids[0] == ours.bos_id
        assert hf_tok.decode(ours.encode(text)) == text


def test_merged_vision_vocab_gives_lwms_text_and_vision_logits_in_transformers(vision_ckpt, tmp_path):
    path, config = vision_ckpt
    out = tmp_path / "merged"
    assert cli.main(["convert", "hf-export", "--ckpt", str(path), "--out", str(out), "--merge-vision-vocab"]) == 0
    hf = json.loads((out / "config.json").read_text())
    assert hf["vocab_size"] == 512 + 40 and hf["lwm_vision_token_offset"] == 512
    assert "512 + i" in (out / "README.md").read_text()
    assert transformers.AutoTokenizer.from_pretrained(out)("a").input_ids[0] == 1  # its own tokenizer, by default
    rng = np.random.default_rng(4)
    tokens = rng.integers(0, 40, (2, 24)).astype(np.int32)
    vision_mask = np.zeros((2, 24), bool)
    vision_mask[:, 6:15] = True
    tokens = np.where(vision_mask, tokens, rng.integers(0, 512, (2, 24))).astype(np.int32)
    model = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    merged = _hf_logits(model, np.where(vision_mask, tokens + 512, tokens))
    text, vision = _our_logits(path, tokens, vision_mask)
    np.testing.assert_allclose(merged[..., :512], text, atol=1e-4, rtol=0)
    np.testing.assert_allclose(merged[..., 512:], vision, atol=1e-4, rtol=0)


@pytest.mark.parametrize("flags,message", [
    (["--tokenizer", "TOKENIZER"], "512 pieces, more than the model's vocab_size 320"),
    (["--tokenizer", "/nonexistent/tokenizer.model"], "no such file"),
])
def test_bad_hf_export_inputs_are_one_line_errors(imported, tokenizer_path, tmp_path, capsys, flags, message):
    out = tmp_path / "out"
    flags = [tokenizer_path if f == "TOKENIZER" else f for f in flags]
    assert cli.main(["convert", "hf-export", "--ckpt", str(imported), "--out", str(out), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and not out.exists()


def test_merge_vision_vocab_of_a_text_model_is_a_one_line_error(hf_dir, tmp_path, capsys):
    from trainer.model import ModelConfig

    text_only = ModelConfig(vocab_size=320, vision_vocab_size=0, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2,
                            mlp_dim=96)
    hf_convert.import_hf(hf_dir[0], tmp_path / "ckpt", base=text_only)
    out = tmp_path / "out"
    assert cli.main(["convert", "hf-export", "--ckpt", str(tmp_path / "ckpt"), "--out", str(out),
                     "--merge-vision-vocab"]) == 2
    err = capsys.readouterr().err
    assert "text-only model" in err and err.count("\n") == 1 and not out.exists()
