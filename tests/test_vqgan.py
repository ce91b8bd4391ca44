"""The Flax VQ model against diffusers' VQModel (the reference aMUSEd implementation)."""

import argparse
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestration.commands.convert_vqgan import register_convert
from pipelines.tokens.vqgan import AMUSED, SMALL, VQGAN, VQGANConfig
from trainer.convert.vqgan_diffusers import config_from_diffusers, params_from_diffusers

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

# aMUSEd's vqvae/config.json (amused/amused-256), as diffusers stores it.
AMUSED_DIFFUSERS_CONFIG = {
    "_class_name": "VQModel",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 256, 512, 768],
    "down_block_types": ["DownEncoderBlock2D"] * 5,
    "force_upcast": False,
    "in_channels": 3,
    "latent_channels": 64,
    "layers_per_block": 2,
    "lookup_from_codebook": True,
    "mid_block_add_attention": False,
    "norm_num_groups": 32,
    "norm_type": "group",
    "num_vq_embeddings": 8192,
    "out_channels": 3,
    "sample_size": 32,
    "scaling_factor": 0.18215,
    "up_block_types": ["UpDecoderBlock2D"] * 5,
    "vq_embed_dim": None,
}


def diffusers_config(cfg: VQGANConfig) -> dict:
    levels = len(cfg.block_out_channels)
    return {**AMUSED_DIFFUSERS_CONFIG, "block_out_channels": list(cfg.block_out_channels),
            "down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels,
            "latent_channels": cfg.latent_channels, "layers_per_block": cfg.layers_per_block,
            "norm_num_groups": cfg.norm_num_groups, "num_vq_embeddings": cfg.num_vq_embeddings,
            "vq_embed_dim": cfg.vq_embed_dim}


def random_reference(cfg: VQGANConfig, frames: np.ndarray, seed: int = 0):
    """A diffusers VQModel with random weights; the codebook is rescaled to the latents'
    spread so many codes are in use (diffusers' tiny uniform init would pick a handful)."""
    torch.manual_seed(seed)
    kwargs = {k: v for k, v in diffusers_config(cfg).items() if not k.startswith("_")}
    model = diffusers.VQModel(**kwargs).eval()
    with torch.no_grad():
        latents = model.encode(torch.from_numpy(frames).permute(0, 3, 1, 2)).latents
        model.quantize.embedding.weight.normal_(generator=torch.Generator().manual_seed(seed))
        model.quantize.embedding.weight.mul_(latents.std()).add_(latents.mean())
    return model


def reference_codes_and_frames(model, cfg: VQGANConfig, frames: np.ndarray):
    n, size = len(frames), frames.shape[1] // cfg.downsample_factor
    with torch.no_grad():
        latents = model.encode(torch.from_numpy(frames).permute(0, 3, 1, 2)).latents
        indices = model.quantize(latents)[2][2]
        decoded = model.decode(indices, force_not_quantize=True, shape=(n, size, size, cfg.vq_embed_dim)).sample
    return indices.reshape(n, size, size).numpy(), decoded.permute(0, 2, 3, 1).numpy()


def assert_parity(cfg: VQGANConfig, size: int, n: int):
    frames = np.random.default_rng(1).random((n, size, size, 3), dtype=np.float32)
    model = random_reference(cfg, frames)
    ref_codes, ref_frames = reference_codes_and_frames(model, cfg, frames)
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    vq = VQGAN(cfg, params_from_diffusers(state, cfg), input_range=(0.0, 1.0))

    codes = vq.encode(frames)
    assert codes.dtype == np.int32 and codes.shape == ref_codes.shape
    assert len(np.unique(ref_codes)) > ref_codes.size // 4, "reference uses too few codes to be a real check"
    assert np.mean(codes == ref_codes) >= 0.995
    np.testing.assert_allclose(vq.decode(ref_codes, clip=False), ref_frames, rtol=0, atol=1e-3)


def test_small_config_matches_diffusers_codes_and_decoded_frames():
    assert_parity(SMALL, size=128, n=2)


@pytest.mark.slow
def test_amused_config_matches_diffusers_on_small_frames():
    # Every aMUSEd weight takes part; 64×64 frames (4×4 codes) keep it fast.
    assert_parity(AMUSED, size=64, n=2)


@pytest.mark.slow
def test_amused_config_matches_diffusers_on_256px_frames():
    assert_parity(AMUSED, size=256, n=2)


def test_config_from_diffusers_reads_the_amused_config():
    assert config_from_diffusers(AMUSED_DIFFUSERS_CONFIG) == AMUSED


@pytest.mark.parametrize("change", [
    {"mid_block_add_attention": True},
    {"norm_type": "spatial"},
    {"act_fn": "gelu"},
    {"down_block_types": ["AttnDownEncoderBlock2D"] * 5},
    {"_class_name": "AutoencoderKL"},
])
def test_config_from_diffusers_refuses_architectures_it_does_not_implement(change):
    with pytest.raises(ValueError, match="unsupported|expected a VQModel"):
        config_from_diffusers({**AMUSED_DIFFUSERS_CONFIG, **change})


def test_params_from_diffusers_reports_missing_and_misshapen_tensors():
    frames = np.zeros((1, 32, 32, 3), np.float32)
    state = {k: v.numpy() for k, v in random_reference(SMALL, frames).state_dict().items()}
    with pytest.raises(ValueError, match="missing.*encoder.conv_in.weight"):
        params_from_diffusers({k: v for k, v in state.items() if k != "encoder.conv_in.weight"}, SMALL)
    with pytest.raises(ValueError, match="shape"):
        params_from_diffusers({**state, "decoder.conv_out.bias": np.zeros(4, np.float32)}, SMALL)


@pytest.fixture(scope="module")
def small_vq():
    return VQGAN.init_random(SMALL, seed=0, input_range=(-1.0, 1.0), batch_size=3)


def test_save_then_load_gives_the_same_codes_and_input_range(small_vq, tmp_path):
    small_vq.save(str(tmp_path / "vq"))
    meta = json.loads((tmp_path / "vq" / "config.json").read_text())
    assert meta["input_range"] == [-1.0, 1.0] and meta["config"] == SMALL.to_dict()
    loaded = VQGAN.load(str(tmp_path / "vq"))
    frames = small_vq.preprocess(np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), np.uint8))
    assert loaded.input_range == (-1.0, 1.0) and loaded.config == SMALL
    np.testing.assert_array_equal(loaded.encode(frames), small_vq.encode(frames))


def test_load_refuses_weights_for_another_config(small_vq, tmp_path):
    small_vq.save(str(tmp_path / "vq"))
    meta = json.loads((tmp_path / "vq" / "config.json").read_text())
    meta["config"]["latent_channels"] = 32
    (tmp_path / "vq" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="do not match the config"):
        VQGAN.load(str(tmp_path / "vq"))


def test_preprocess_maps_uint8_onto_the_input_range(small_vq):
    out = small_vq.preprocess(np.array([[[[0, 255, 51]]]], np.uint8))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out[0, 0, 0], [-1.0, 1.0, -0.6], atol=1e-6)
    with pytest.raises(ValueError, match="uint8"):
        small_vq.preprocess(np.zeros((1, 16, 16, 3), np.float32))


def test_encode_and_decode_reject_malformed_input(small_vq):
    with pytest.raises(ValueError, match="multiples of 16"):
        small_vq.encode(np.zeros((1, 24, 32, 3), np.float32))
    with pytest.raises(ValueError, match="float"):
        small_vq.encode(np.zeros((1, 32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match=r"\[0, 8192\)"):
        small_vq.decode(np.full((1, 2, 2), 8192, np.int32))
    with pytest.raises(ValueError, match="integer codes"):
        small_vq.decode(np.zeros((1, 2, 2), np.float32))


def test_decode_returns_frames_clipped_to_the_input_range(small_vq):
    codes = np.arange(2 * 2 * 2, dtype=np.int32).reshape(2, 2, 2) * 1000
    frames = small_vq.decode(codes)
    assert frames.shape == (2, 32, 32, 3) and frames.dtype == np.float32
    assert frames.min() >= -1.0 and frames.max() <= 1.0
    raw = small_vq.decode(codes, clip=False)
    np.testing.assert_array_equal(np.clip(raw, -1.0, 1.0), frames)


@settings(max_examples=8, deadline=None)
@given(n=st.integers(0, 6), seed=st.integers(0, 2**16))
def test_codes_do_not_depend_on_how_frames_are_batched(small_vq, n, seed):
    frames = np.random.default_rng(seed).uniform(-1, 1, (n, 32, 32, 3)).astype(np.float32)
    codes = small_vq.encode(frames)
    assert codes.shape == (n, 2, 2)
    for i in range(n):
        np.testing.assert_array_equal(codes[i:i + 1], small_vq.encode(frames[i:i + 1]))


def test_vqgan_import_command_converts_a_diffusers_checkpoint(tmp_path):
    frames = np.random.default_rng(2).random((2, 64, 64, 3), dtype=np.float32)
    model = random_reference(SMALL, frames)
    model.save_pretrained(tmp_path / "amused" / "vqvae", safe_serialization=True)
    parser = argparse.ArgumentParser()
    register_convert(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["vqgan-import", "--diffusers-dir", str(tmp_path / "amused"),
                              "--out", str(tmp_path / "ours")])
    assert args.func(args, []) == 0

    vq = VQGAN.load(str(tmp_path / "ours"))
    assert vq.input_range == (0.0, 1.0) and vq.config == SMALL
    ref_codes, _ = reference_codes_and_frames(model, SMALL, frames)
    assert np.mean(vq.encode(frames) == ref_codes) >= 0.995
