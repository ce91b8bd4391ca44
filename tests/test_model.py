"""The LWM model, its loss and its checkpoints on one device (the sharded path: test_model_sharding.py)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trainer import checkpoint, loss, model
from trainer.inference import predictor as inference
from trainer import ring_layout as layout

CONFIG = dataclasses.replace(model.get_preset("tiny"), mlp_chunk_size=16)
SEQ = 64


@pytest.fixture(scope="module")
def params():
    return model.init_params(CONFIG, jax.random.key(0))


@pytest.fixture(scope="module")
def hidden_fn():
    lwm = model.LWM(CONFIG)
    return jax.jit(lambda p, b: lwm.apply({"params": p}, b["tokens"], b["vision_mask"], b["segment_ids"],
                                          b["positions"]))


def _batch(seed=1, batch=2):
    b = model.example_batch(CONFIG, batch, SEQ, seed=seed)
    del b["loss_weights"]
    return b


# ----------------------------------------------------------------------------- config


def test_llama2_7b_preset_has_llama2_7b_parameter_count():
    assert model.get_preset("llama2-7b").num_params() == 6_738_415_616  # HF meta-llama/Llama-2-7b-hf
    lwm = model.get_preset("lwm-7b")
    assert lwm.num_params() - 6_738_415_616 == 2 * 8448 * 4096


def test_num_params_counts_the_initialised_parameters():
    shapes = model.param_shapes(CONFIG)
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes)) == CONFIG.num_params()


@pytest.mark.parametrize("fields", [
    dict(num_heads=3), dict(num_kv_heads=3), dict(vocab_size=0), dict(dtype="int8"),
    dict(remat_policy="sometimes"), dict(vision_vocab_size=-1), dict(d_model=72, num_heads=8),
])
def test_invalid_configs_are_refused(fields):
    with pytest.raises(ValueError):
        dataclasses.replace(CONFIG, **fields)


def test_config_dict_round_trip_rejects_unknown_fields():
    assert model.ModelConfig.from_dict(CONFIG.to_dict()) == CONFIG
    with pytest.raises(ValueError, match=r"unknown key 'n_layers'; did you mean model.num_layers\?"):
        model.ModelConfig.from_dict({**CONFIG.to_dict(), "n_layers": 2})
    with pytest.raises(ValueError, match="unknown model preset"):
        model.get_preset("gpt-2")


# ----------------------------------------------------------------------------- forward


def test_a_packed_segment_computes_as_if_it_were_alone(params, hidden_fn):
    packed = _batch()
    segment = packed["segment_ids"][0] == 2
    alone = {k: np.zeros_like(v) for k, v in packed.items()}
    n = int(segment.sum())
    for k in alone:
        alone[k][0, :n] = packed[k][0, segment]
    alone["segment_ids"][0, :n] = 1
    got = np.asarray(hidden_fn(params, packed))[0, segment]
    want = np.asarray(hidden_fn(params, alone))[0, :n]
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)


def test_changing_one_segment_leaves_every_other_segment_unchanged(params, hidden_fn):
    batch = _batch()
    changed = {k: v.copy() for k, v in batch.items()}
    target = batch["segment_ids"] == 2
    changed["tokens"][target] = (changed["tokens"][target] + 7) % CONFIG.vocab_size
    changed["vision_mask"][target] = False
    before, after = np.asarray(hidden_fn(params, batch)), np.asarray(hidden_fn(params, changed))
    others = (batch["segment_ids"] > 0) & ~target
    np.testing.assert_array_equal(after[others], before[others])
    assert not np.allclose(after[target], before[target])


def test_model_output_follows_any_token_order(params, hidden_fn):
    """The ring layout permutes the sequence; masks come from positions, so outputs just permute."""
    batch = _batch()
    perm = np.random.default_rng(0).permutation(SEQ)
    permuted = hidden_fn(params, {k: v[:, perm] for k, v in batch.items()})
    valid = batch["segment_ids"][:, perm] > 0
    np.testing.assert_allclose(np.asarray(permuted)[valid], np.asarray(hidden_fn(params, batch))[:, perm][valid],
                               atol=2e-5, rtol=0)


def test_vision_mask_selects_the_vision_embedding(params, hidden_fn):
    batch = _batch()
    flipped = {k: v.copy() for k, v in batch.items()}
    flipped["tokens"][0, 0] = 5
    flipped["vision_mask"][0, 0] = True
    text = dict(flipped, vision_mask=flipped["vision_mask"].copy())
    text["vision_mask"][0, 0] = False
    assert not np.allclose(hidden_fn(params, flipped)[0, 0], hidden_fn(params, text)[0, 0])


def test_rope_scores_depend_only_on_relative_position():
    rng = np.random.default_rng(0)
    q, k = (jnp.asarray(rng.normal(size=(1, 1, 1, 16)), jnp.float32) for _ in range(2))

    def score(pq, pk):
        rq = model.rope(q, jnp.array([[pq]]), 5e4)
        rk = model.rope(k, jnp.array([[pk]]), 5e4)
        return float(jnp.sum(rq * rk))

    assert score(7, 3) == pytest.approx(score(104, 100), abs=1e-4)
    assert score(7, 3) != pytest.approx(score(7, 4), abs=1e-3)


def test_sequence_chunked_map_equals_one_pass_and_rejects_ragged_chunks():
    x = jnp.arange(2 * 12 * 3, dtype=jnp.float32).reshape(2, 12, 3)

    def fn(a):
        return a * 2 + jnp.sum(a, axis=-1, keepdims=True)

    np.testing.assert_array_equal(model.sequence_chunked_map(fn, (x,), 4), fn(x))
    with pytest.raises(ValueError, match="multiple of chunk size"):
        model.sequence_chunked_map(fn, (x,), 5)


# ----------------------------------------------------------------------------- loss


def test_next_token_targets_shift_within_segments_only():
    batch = {
        "tokens": np.array([10, 11, 12, 20, 21, 0]),
        "vision_mask": np.array([0, 0, 1, 0, 1, 0], bool),
        "segment_ids": np.array([1, 1, 1, 2, 2, 0]),
        "loss_weights": np.array([0, 1, 0.5, 0, 2, 0], np.float32),
    }
    out = layout.next_token_targets(batch)
    np.testing.assert_array_equal(out["targets"], [11, 12, 0, 21, 0, 0])
    np.testing.assert_array_equal(out["target_vision_mask"], [0, 1, 0, 1, 0, 0])
    np.testing.assert_array_equal(out["target_weights"], [1, 0.5, 0, 2, 0, 0])


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(0, 5), min_size=1, max_size=40), st.integers(0, 2**31 - 1))
def test_next_token_targets_weight_each_token_once_from_its_predecessor(lengths, seed):
    rng = np.random.default_rng(seed)
    segments = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)] + [np.zeros(3, int)])
    size = segments.size
    starts = np.r_[True, segments[1:] != segments[:-1]]
    batch = {"tokens": rng.integers(0, 100, size), "vision_mask": rng.random(size) < 0.5,
             "segment_ids": segments, "loss_weights": np.where(starts | (segments == 0), 0, rng.random(size))}
    out = layout.next_token_targets(batch)
    # every weighted token is the target of exactly its predecessor, with its weight and vocabulary
    for t in np.flatnonzero(batch["loss_weights"]):
        assert out["targets"][t - 1] == batch["tokens"][t]
        assert out["target_weights"][t - 1] == np.float32(batch["loss_weights"][t])
        assert out["target_vision_mask"][t - 1] == batch["vision_mask"][t]
    assert out["target_weights"].sum() == pytest.approx(batch["loss_weights"].sum(), rel=1e-5)


def test_next_token_targets_reject_mismatched_shapes():
    with pytest.raises(ValueError, match="share one"):
        layout.next_token_targets({"tokens": np.zeros(4), "vision_mask": np.zeros(4), "segment_ids": np.zeros(5),
                                 "loss_weights": np.zeros(4)})


@pytest.mark.parametrize("vision_share", [0.4, 0.0, "one chunk"])
def test_chunked_token_losses_equal_full_logits_cross_entropy(vision_share):
    rng = np.random.default_rng(0)
    hidden = rng.normal(size=(2, 16, 8)).astype(np.float32)
    text_head, vision_head = rng.normal(size=(8, 11)).astype(np.float32), rng.normal(size=(8, 7)).astype(np.float32)
    if vision_share == "one chunk":  # chunks are strided: chunk 1 holds tokens 1, 5, 9, 13; the rest skip the head
        vision = np.zeros((2, 16), bool)
        vision[:, 1::4] = True
    else:
        vision = rng.random((2, 16)) < vision_share
    targets = np.where(vision, rng.integers(0, 7, (2, 16)), rng.integers(0, 11, (2, 16)))
    ce, correct = loss.token_losses(jnp.asarray(hidden), text_head, vision_head, targets, vision, chunk_size=4)
    for mask, head in ((~vision, text_head), (vision, vision_head)):
        logits = hidden[mask] @ head
        logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        want = logz - logits[np.arange(len(logits)), targets[mask]]
        np.testing.assert_allclose(np.asarray(ce)[mask], want, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(np.asarray(correct)[mask], logits.argmax(-1) == targets[mask])


def test_vision_targets_without_weight_skip_the_vision_head_and_change_no_weighted_loss():
    rng = np.random.default_rng(1)
    hidden = jnp.asarray(rng.normal(size=(1, 16, 8)).astype(np.float32))
    text_head, vision_head = rng.normal(size=(8, 11)).astype(np.float32), rng.normal(size=(8, 7)).astype(np.float32)
    vision = np.zeros((1, 16), bool)
    vision[:, :12] = True  # a video question: vision targets first, then text
    targets = np.where(vision, rng.integers(0, 7, (1, 16)), rng.integers(0, 11, (1, 16)))
    answer_only = np.where(vision, 0.0, 1.0).astype(np.float32)

    def weighted(h, weights):
        ce, _ = loss.token_losses(h, text_head, vision_head, targets, vision, chunk_size=4, target_weights_BxS=weights)
        return jnp.sum(ce * answer_only)

    skipped = jax.value_and_grad(weighted)(hidden, answer_only)
    computed = jax.value_and_grad(weighted)(hidden, np.ones((1, 16), np.float32))
    np.testing.assert_allclose(skipped[0], computed[0], rtol=1e-6)
    np.testing.assert_allclose(skipped[1], computed[1], rtol=1e-6, atol=1e-7)
    ce, _ = loss.token_losses(hidden, text_head, vision_head, targets, vision, chunk_size=4,
                              target_weights_BxS=answer_only)
    text_ce, _ = loss.token_losses(hidden, text_head, None, np.minimum(targets, 10), vision, chunk_size=4)
    np.testing.assert_allclose(np.asarray(ce)[vision], np.asarray(text_ce)[vision], rtol=1e-6)  # text head's values


def _reduce(ce, vision, weights, **config):
    return loss.reduce_losses(jnp.asarray(ce, jnp.float32), jnp.zeros_like(jnp.asarray(ce), bool),
                              jnp.asarray(vision), jnp.asarray(weights, jnp.float32), loss.LossConfig(**config))


def test_default_loss_is_half_mean_text_plus_half_mean_vision():
    ce, vision, weights = [[1.0, 3.0, 10.0, 0.0]], [[False, False, True, True]], [[1.0, 1.0, 1.0, 0.0]]
    value, metrics = _reduce(ce, vision, weights)
    assert float(value) == pytest.approx(0.5 * 2.0 + 0.5 * 10.0)
    assert (float(metrics["text_loss"]), float(metrics["vision_loss"])) == (2.0, 10.0)
    assert (float(metrics["text_tokens"]), float(metrics["vision_tokens"])) == (2, 1)
    token_mean, _ = _reduce(ce, vision, weights, normalization="token_mean")
    assert float(token_mean) == pytest.approx(14.0 / 3)


def test_absent_modality_contributes_nothing():
    value, metrics = _reduce([[1.0, 3.0]], [[False, False]], [[1.0, 3.0]])
    assert float(value) == pytest.approx((1.0 + 9.0) / 4)
    assert float(metrics["vision_loss"]) == 0.0 and float(metrics["vision_weight"]) == 0.0
    empty, _ = _reduce([[1.0]], [[False]], [[0.0]])
    assert float(empty) == 0.0


def test_loss_gradient_ignores_zero_weight_targets(params):
    batch = _batch()
    batch["loss_weights"] = model.example_batch(CONFIG, 2, SEQ, seed=1)["loss_weights"]
    batch.update(layout.next_token_targets(batch))
    del batch["loss_weights"]
    lwm = model.LWM(CONFIG)
    fn = jax.jit(lambda b: loss.loss_and_metrics(lwm, params, b, loss.LossConfig(chunk_size=16))[0])
    changed = dict(batch, targets=np.where(batch["target_weights"] == 0, 3, batch["targets"]))
    assert float(fn(batch)) == float(fn(changed))
    assert np.isfinite(float(fn(batch)))


# ----------------------------------------------------------------------------- checkpoints and inference


def test_checkpoint_round_trip_with_training_items_and_inference(params, tmp_path):
    checkpoint.save_params(tmp_path / "ckpt", params, CONFIG, step=1)
    with checkpoint.manager(tmp_path / "ckpt", item_names=checkpoint.item_names("train_config")) as mngr:
        mngr.save(2, args=ocp.args.Composite(params=ocp.args.StandardSave(params),
                                             model_config=ocp.args.JsonSave(CONFIG.to_dict()),
                                             train_config=ocp.args.JsonSave({"steps": 2})))
    restored, config = checkpoint.restore_params(tmp_path / "ckpt", step=1)
    assert config == CONFIG and checkpoint.latest_step(tmp_path / "ckpt") == 2
    jax.tree.map(np.testing.assert_array_equal, restored, params)

    tokens = np.random.default_rng(0).integers(0, CONFIG.vocab_size, (1, 16))
    got = inference.logits(tmp_path / "ckpt", tokens)
    ones = np.ones_like(tokens)
    want = model.LWM(CONFIG).apply({"params": params}, tokens, ones == 0, ones, np.arange(16)[None],
                                   method=model.LWM.text_logits)
    assert got.shape == (1, 16, CONFIG.vocab_size)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="text token ids"):
        inference.logits(tmp_path / "ckpt", tokens + CONFIG.vocab_size)
    with pytest.raises(ValueError, match="no checkpoint|does not exist"):
        checkpoint.restore_params(tmp_path / "missing")
