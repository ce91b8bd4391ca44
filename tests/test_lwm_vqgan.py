"""LWM's pickled VQGAN → ours: same codes and pixels as LWM's module tree (re-typed here, narrow widths).

``LwmVQ`` below is LWM's ``lwm/vqgan.py`` computation with its Flax auto-names
(``Conv_0``, ``DownsamplingBlock_0``, ``ResnetBlock_1``, ...), written from its
documented structure so the test needs nothing of LWM's code.
"""

import os
import pickle

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trainer.convert import lwm_vqgan, restricted_pickle

HIDDEN, MULT, BLOCKS, Z, CODES, EMBED = 32, (1, 2, 2), 1, 8, 64, 8  # 3 levels: quick to compile


class Resnet(nn.Module):
    out: int | None = None

    @nn.compact
    def __call__(self, x):
        out = self.out or x.shape[-1]
        h = nn.Conv(out, (3, 3))(nn.silu(nn.GroupNorm()(x)))
        h = nn.Conv(out, (3, 3))(nn.silu(nn.GroupNorm()(h)))
        if out != x.shape[-1]:
            x = nn.Conv(out, (1, 1))(x)
        return h + x


class ResnetBlock(Resnet):
    pass


class Downsample(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return nn.Conv(x.shape[-1], (3, 3), strides=(2, 2), padding="VALID")(x)


class Upsample(nn.Module):
    @nn.compact
    def __call__(self, x):
        b, h, w, c = x.shape
        return nn.Conv(c, (3, 3))(jax.image.resize(x, (b, 2 * h, 2 * w, c), "nearest"))


class DownsamplingBlock(nn.Module):
    idx: int

    @nn.compact
    def __call__(self, x):
        for _ in range(BLOCKS):
            x = ResnetBlock(HIDDEN * MULT[self.idx])(x)
        return Downsample()(x) if self.idx != len(MULT) - 1 else x


class UpsamplingBlock(nn.Module):
    idx: int

    @nn.compact
    def __call__(self, x):
        for _ in range(BLOCKS + 1):
            x = ResnetBlock(HIDDEN * MULT[self.idx])(x)
        return Upsample()(x) if self.idx != 0 else x


class MidBlock(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = ResnetBlock()(x)
        return ResnetBlock()(x)


class Encoder(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Conv(HIDDEN, (3, 3))(x)
        for i in range(len(MULT)):
            x = DownsamplingBlock(i)(x)
        x = MidBlock()(x)
        return nn.Conv(Z, (3, 3))(nn.silu(nn.GroupNorm()(x)))


class Decoder(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Conv(HIDDEN * MULT[-1], (3, 3))(x)
        x = MidBlock()(x)
        for i in reversed(range(len(MULT))):
            x = UpsamplingBlock(i)(x)
        return nn.Conv(3, (3, 3))(nn.silu(nn.GroupNorm()(x)))


class Quantizer(nn.Module):
    @nn.compact
    def __call__(self, z=None, codes=None):
        e = self.param("embeddings", nn.initializers.normal(1.0), (CODES, EMBED))
        if codes is not None:
            return e[codes]
        flat = z.reshape(-1, z.shape[-1])
        d = jnp.sum(flat ** 2, 1, keepdims=True) + jnp.sum(e.T ** 2, 0, keepdims=True) - 2 * flat @ e.T
        return jnp.argmin(d, axis=1).reshape(z.shape[:-1])


class LwmVQ(nn.Module):
    def setup(self):
        self.encoder, self.decoder, self.quantize = Encoder(), Decoder(), Quantizer()
        self.quant_conv, self.post_quant_conv = nn.Conv(EMBED, (1, 1)), nn.Conv(Z, (1, 1))

    def encode(self, x):
        return self.quantize(self.quant_conv(self.encoder(x)))

    def decode(self, codes):
        return jnp.clip(self.decoder(self.post_quant_conv(self.quantize(None, codes))), -1, 1)

    def __call__(self, x):
        return self.decode(self.encode(x))


@pytest.fixture(scope="module")
def lwm_vq(tmp_path_factory):
    frames = np.random.default_rng(0).uniform(-1, 1, (4, 8, 8, 3)).astype(np.float32)
    model = LwmVQ()
    shapes = jax.eval_shape(model.init, jax.random.key(0), frames)["params"]  # no compilation
    rng = np.random.default_rng(1)
    params = jax.tree.map(lambda s: (rng.standard_normal(s.shape) / np.sqrt(np.prod(s.shape[:-1]) if len(s.shape) > 1
                                                                           else 1) + 0.01).astype(np.float32), shapes)
    path = tmp_path_factory.mktemp("lwm") / "vqgan"
    path.write_bytes(pickle.dumps(jax.tree.map(np.asarray, params)))
    return model, params, frames, str(path)


def test_lwm_vqgan_gives_lwms_codes_and_pixels(lwm_vq):
    model, params, frames, path = lwm_vq
    vq = lwm_vqgan.load_lwm_vqgan(path)
    assert vq.config.block_out_channels == (32, 64, 64) and vq.config.layers_per_block == 1
    assert vq.config.num_vq_embeddings == CODES
    assert vq.input_range == (-1.0, 1.0)
    want_codes = np.asarray(jax.jit(lambda p, x: model.apply({"params": p}, x, method=LwmVQ.encode))(params, frames))
    codes = vq.encode(frames)
    np.testing.assert_array_equal(codes, want_codes)
    want_pixels = np.asarray(jax.jit(lambda p, c: model.apply({"params": p}, c, method=LwmVQ.decode))(params, codes))
    np.testing.assert_allclose(vq.decode(codes), want_pixels, atol=1e-4, rtol=0)


def test_save_lwm_vqgan_writes_lwms_tree_back(lwm_vq, tmp_path):
    _, params, _, path = lwm_vq
    lwm_vqgan.save_lwm_vqgan(lwm_vqgan.load_lwm_vqgan(path), str(tmp_path / "again"))
    again = restricted_pickle.load(str(tmp_path / "again"))
    jax.tree.map(np.testing.assert_array_equal, again, jax.tree.map(np.asarray, dict(params)))


class _RunsCode:
    def __reduce__(self):
        return os.system, ("touch pwned",)


def test_restricted_unpickler_refuses_a_pickle_that_would_run_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil"
    path.write_bytes(pickle.dumps({"encoder": _RunsCode()}))
    with pytest.raises(ValueError, match=r"refusing to load global (posix|os|nt)\.system") as error:
        lwm_vqgan.load_lwm_vqgan(str(path))
    assert "\n" not in str(error.value) and not (tmp_path / "pwned").exists()


def test_restricted_unpickler_reads_plain_data_and_jax_arrays():
    data = {"a": [1, 2.5, "x", (True, None)], "b": np.arange(6, dtype=np.float32).reshape(2, 3),
            "c": jnp.ones((2,), jnp.bfloat16), "d": np.float32(3)}
    out = restricted_pickle.loads(pickle.dumps(data))
    assert out["a"] == data["a"] and out["d"] == 3
    np.testing.assert_array_equal(out["b"], data["b"])
    assert isinstance(out["c"], np.ndarray) and out["c"].dtype == jnp.bfloat16


@pytest.mark.parametrize("tree,message", [
    ({"encoder": {}}, "expected encoder/DownsamplingBlock_0"),
    ([1, 2], "expected a dict of parameters"),
])
def test_bad_vqgan_pickles_are_one_line_errors(tmp_path, tree, message):
    path = tmp_path / "vq"
    path.write_bytes(pickle.dumps(tree))
    with pytest.raises(ValueError, match=message):
        lwm_vqgan.load_lwm_vqgan(str(path))
    path.write_bytes(b"\x80\x04garbage")
    with pytest.raises(ValueError, match="not a readable pickle"):
        lwm_vqgan.load_lwm_vqgan(str(path))


def test_vqgan_with_an_attention_block_is_refused(lwm_vq, tmp_path):
    _, params, _, _ = lwm_vq
    tree = jax.tree.map(np.asarray, dict(params))
    tree = {**tree, "encoder": {**tree["encoder"], "MidBlock_0": {**tree["encoder"]["MidBlock_0"],
                                                                  "AttnBlock_0": {"Conv_0": {"kernel": np.zeros(1)}}}}}
    path = tmp_path / "vq"
    path.write_bytes(pickle.dumps(tree))
    with pytest.raises(ValueError, match="unexpected key 'encoder/MidBlock_0/AttnBlock_0/Conv_0/kernel'"):
        lwm_vqgan.load_lwm_vqgan(str(path))
