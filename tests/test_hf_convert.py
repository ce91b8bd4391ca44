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
from trainer.model import get_preset  # noqa: E402

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
