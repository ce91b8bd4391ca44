"""Sharded training math equals single-device math: loss and gradients on (dp, fsdp, sp, tp) meshes.

The sharded batch is in the ring layout (zigzag over sp), as the loader delivers it;
the single-device reference sees natural order. Both use the same targets
(``layout.next_token_targets`` on the natural-order batch).
"""

import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from trainer import loss, model, sharding
from trainer import ring_layout as layout
from trainer.ring_layout import layout_permutation

CONFIG = dataclasses.replace(model.get_preset("tiny"), mlp_chunk_size=32, attention_block_q=4, attention_block_kv=4)
LOSS = loss.LossConfig(chunk_size=32)
BATCH, SEQ = 8, 64


def _value_and_grad(lwm):
    return jax.jit(jax.value_and_grad(lambda p, b: loss.loss_and_metrics(lwm, p, b, LOSS), has_aux=True))


@pytest.fixture(scope="module")
def setup():
    params = model.init_params(CONFIG, jax.random.key(0))
    batch = model.example_batch(CONFIG, BATCH, SEQ, seed=1)
    batch.update(layout.next_token_targets(batch))
    del batch["loss_weights"]
    (ref_loss, ref_metrics), ref_grads = _value_and_grad(model.LWM(CONFIG))(params, batch)
    assert ref_metrics["text_tokens"] > 0 and ref_metrics["vision_tokens"] > 0
    return params, batch, ref_loss, ref_grads


@pytest.mark.parametrize("mesh_config", [
    sharding.MeshConfig(fsdp=1, sp=8),
    sharding.MeshConfig(fsdp=8),
    sharding.MeshConfig(fsdp=2, sp=2, tp=2),
], ids=["sp8", "fsdp8", "fsdp2-sp2-tp2"])
def test_sharded_loss_and_grads_match_single_device(setup, mesh_config):
    params, batch, ref_loss, ref_grads = setup
    mesh = sharding.make_mesh(mesh_config)
    sharding.validate(CONFIG, mesh, BATCH, SEQ)
    perm = layout_permutation(SEQ, mesh.shape["sp"], "zigzag")
    with sharding.activate(mesh):
        shardings = sharding.param_shardings(mesh, model.abstract_params(CONFIG))
        lwm = model.LWM(CONFIG, sharding.attention_fn(mesh, CONFIG))
        (value, _), grads = _value_and_grad(lwm)(
            jax.device_put(params, shardings), sharding.shard_batch({k: v[:, perm] for k, v in batch.items()}, mesh))
    np.testing.assert_allclose(value, ref_loss, atol=1e-5, rtol=0)
    for path, got, want in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(grads),
                               jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0, err_msg=jax.tree_util.keystr(path[0]))


def test_parameters_are_split_over_fsdp_sp_and_tp():
    mesh = sharding.make_mesh(sharding.MeshConfig(fsdp=2, sp=2, tp=2))
    specs = sharding.param_shardings(mesh, model.abstract_params(CONFIG))
    assert specs["layers"]["attn"]["q"].spec == P(None, ("fsdp", "sp"), "tp", None)
    assert specs["layers"]["mlp"]["down"].spec == P(None, "tp", ("fsdp", "sp"))
    assert specs["text_head"].spec == P(("fsdp", "sp"), "tp")
    assert sharding.batch_sharding(mesh).spec == P(("dp", "fsdp"), "sp")


def test_mesh_minus_one_takes_the_remaining_devices():
    assert sharding.MeshConfig(dp=1, fsdp=-1, sp=2, tp=2).resolve(8) == (1, 2, 2, 2)
    assert dict(sharding.make_mesh(sharding.MeshConfig(fsdp=-1, tp=4)).shape) == {"dp": 1, "fsdp": 2, "sp": 1, "tp": 4}


@pytest.mark.parametrize("sizes, devices", [
    (dict(fsdp=-1, sp=-1), 8),  # two axes cannot both take "the rest"
    (dict(fsdp=3), 8),  # 3 devices asked, 8 present
    (dict(fsdp=-1, sp=3), 8),  # 8 does not split by 3
    (dict(fsdp=0), 8),
])
def test_impossible_meshes_are_refused(sizes, devices):
    with pytest.raises(ValueError):
        sharding.MeshConfig(**sizes).resolve(devices)


def test_shapes_that_do_not_split_over_the_mesh_are_refused():
    mesh = sharding.make_mesh(sharding.MeshConfig(fsdp=2, sp=2, tp=2))
    with pytest.raises(ValueError, match="batch size"):
        sharding.validate(CONFIG, mesh, 3, 64)
    with pytest.raises(ValueError, match="num_kv_heads"):
        sharding.validate(dataclasses.replace(CONFIG, num_kv_heads=1), mesh, 2, 64)


@pytest.mark.slow
def test_training_step_memory_grows_linearly_with_sequence_length():
    """Compiled peak memory of a training step on sp=8, 2K to 16K tokens (benchmarks/model_memory.py)."""
    script = pathlib.Path(__file__).parents[1] / "benchmarks" / "model_memory.py"
    out = subprocess.run([sys.executable, str(script), "--json"], check=True, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(script.parents[1])})
    peaks = np.array([row["peak"] for row in json.loads(out.stdout.strip().splitlines()[-1])], float)
    increments = np.diff(peaks)
    assert np.all(increments > 0)
    # linear: each doubling adds twice the previous increment; quadratic would add four times
    assert np.all(increments[1:] / increments[:-1] < 2.5), peaks
