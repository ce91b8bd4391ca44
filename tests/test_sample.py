"""The sampler: cache decoding equals the dense model, batching changes nothing, stops and frame markers."""

import dataclasses

import jax
import numpy as np
import pytest

from orchestration import cli
from schemas import vocab
from trainer import checkpoint
from trainer.inference import predictor as inference
from trainer.inference import sampler as sample
from trainer.model import PRESETS, init_params

# Small ring blocks and MLP chunks so that a 48-token prompt spans several of each on 4 devices;
# a wide init so logits are far apart (greedy choices are not near-ties).
CONFIG = dataclasses.replace(PRESETS["tiny"], attention_block_q=8, attention_block_kv=8, mlp_chunk_size=16,
                             init_std=0.2, remat_policy="none", max_position_embeddings=1024)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("sample") / "ckpt"
    checkpoint.save_params(path, init_params(CONFIG, jax.random.key(0)), CONFIG)
    return path


@pytest.fixture(scope="module")
def sampler(ckpt):
    return sample.Sampler(ckpt)


def _tokens(vision_span: bool):
    rng = np.random.default_rng(1)
    tokens = rng.integers(3, CONFIG.vocab_size, (2, 48))
    mask = np.zeros(tokens.shape, bool)
    if vision_span:  # a vision span that starts in the prompt and runs into the decoded part
        mask[:, 12:40] = True
        tokens[mask] = rng.integers(0, CONFIG.vision_vocab_size, int(mask.sum()))
    return tokens, mask


@pytest.mark.parametrize("sp", [1, 4])
@pytest.mark.parametrize("vision_span", [False, True], ids=["text", "vision"])
def test_prefill_then_cached_decoding_equals_the_dense_model(ckpt, sp, vision_span):
    tokens, mask = _tokens(vision_span)
    want = inference.logits(ckpt, tokens, mask)
    got = sample.teacher_forced_logits(ckpt, tokens, 21, sp=sp, vision_mask=mask)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("sp,max_chunk", [(1, sample.MAX_CHUNK), (4, 16)], ids=["sp1", "sp4-chunks-of-16"])
def test_a_chunked_extend_equals_prefilling_all_the_tokens(ckpt, sp, max_chunk, monkeypatch):
    monkeypatch.setattr(sample, "MAX_CHUNK", max_chunk)  # 16: the 27 fed tokens take two passes
    tokens, mask = (x[0] for x in _tokens(vision_span=True))
    sampler = sample.Sampler(ckpt, sp=sp)
    context = sampler.extend(sampler.prefill(tokens[:21], mask[:21], reserve=8), tokens[21:], mask[21:])
    want = sampler.teacher_forced_logits(tokens[None], len(tokens), mask[None])[0]  # one prefill of all 48
    assert context.length == len(tokens) and context.text_logits.shape == (27, CONFIG.vocab_size)
    np.testing.assert_allclose(context.text_logits, want[21:], atol=1e-4, rtol=0)


def test_chunks_are_padded_to_a_few_lengths():
    assert [sample.chunk_length(n, CONFIG) for n in (1, 2, 4, 5, 16, 17, 65, 256)] == [1, 4, 4, 16, 16, 64, 256, 256]
    with pytest.raises(ValueError):
        sample.chunk_length(sample.MAX_CHUNK + 1, CONFIG)


def test_a_batch_of_unequal_prompts_gives_the_same_tokens_as_one_by_one(ckpt):
    sampler = sample.Sampler(ckpt, sp=2)
    rng = np.random.default_rng(2)
    prompts = [list(rng.integers(3, CONFIG.vocab_size, n)) for n in (5, 15, 11)]
    settings = sample.SampleSettings(max_new_tokens=12, eos_id=None)
    batched = sampler.generate(prompts, settings)
    assert batched == [sampler.generate([p], settings)[0] for p in prompts]
    assert all(len(row) == 12 for row in batched)


def test_generation_stops_at_eos_and_leaves_it_out(sampler):
    prompt = [1, 40, 41, 42]
    free = sampler.generate([prompt], sample.SampleSettings(max_new_tokens=10, eos_id=None))[0]
    stop = free[3]
    stopped = sampler.generate([prompt], sample.SampleSettings(max_new_tokens=10, eos_id=stop))[0]
    assert stopped == free[:free.index(stop)]
    streamed = []
    sampler.generate([prompt, prompt[:2]], sample.SampleSettings(max_new_tokens=3, eos_id=None),
                     on_token=lambda row, token: streamed.append((row, token)))
    assert sorted(r for r, _ in streamed) == [0, 0, 0, 1, 1, 1]


def test_sampling_is_deterministic_for_a_seed_and_varies_across_seeds(sampler):
    prompt = [[1, 7, 8, 9]]

    def draw(seed):
        return sampler.generate(prompt, sample.SampleSettings(max_new_tokens=10, temperature=1.5, seed=seed,
                                                              eos_id=None))[0]

    assert draw(3) == draw(3)
    assert len({tuple(draw(s)) for s in range(4)}) > 1


def test_vision_generation_forces_frame_markers_and_draws_codes_only(sampler):
    (ids,) = sampler.generate_vision([[1, 30, 31]], frames=2,
                                     settings=sample.SampleSettings(temperature=1.0, seed=1))
    ids = np.asarray(ids)
    assert len(ids) == 2 * 257
    assert ids[256] == vocab.EOF_ID and ids[-1] == vocab.EOV_ID
    codes = sample.frame_codes(ids)
    assert codes.shape == (2, 16, 16) and codes.max() < vocab.VISION_CODEBOOK_SIZE
    with pytest.raises(ValueError, match="whole frames"):
        sample.frame_codes(ids[:-1])


def test_cfg_scale_1_is_no_guidance_and_guidance_against_the_prompt_itself_changes_nothing(sampler):
    prompt, settings = [1, 30, 31], sample.SampleSettings(temperature=1.0, seed=4)
    plain = sampler.generate_vision([prompt], frames=1, settings=settings)
    assert sampler.generate_guided([prompt], 1, settings, cfg_scale=1.0, unconditional=[1, 5]) == plain
    # uncond + s (cond - uncond) = cond when both rows hold the same prompt: the guided rows change nothing
    assert sampler.generate_guided([prompt], 1, settings, cfg_scale=3.0, unconditional=prompt) == plain
    guided = sampler.generate_guided([prompt], 1, sample.SampleSettings(), cfg_scale=3.0, unconditional=[1, 5])
    assert guided != sampler.generate_vision([prompt], 1, sample.SampleSettings())


def test_guided_codes_follow_the_guidance_formula(sampler, monkeypatch):
    seen = []
    real = sample.choose
    monkeypatch.setattr(sample, "choose", lambda logits, *a: seen.append(np.array(logits)) or real(logits, *a))
    sampler.generate_guided([[1, 30, 31]], 1, sample.SampleSettings(), cfg_scale=2.5, unconditional=[1, 5])
    assert len(seen) == 256 and seen[0].shape == (1, vocab.VISION_CODEBOOK_SIZE)
    want_cond = sampler._prefill(np.array([[1, 30, 31]]), np.zeros((1, 3), bool), np.array([3]), 1).vision_logits
    want_uncond = sampler._prefill(np.array([[1, 5]]), np.zeros((1, 2), bool), np.array([2]), 1).vision_logits
    c, u = want_cond[0, -1, :vocab.VISION_CODEBOOK_SIZE], want_uncond[0, -1, :vocab.VISION_CODEBOOK_SIZE]
    np.testing.assert_allclose(seen[0][0], u + 2.5 * (c - u), atol=1e-4)


def test_a_video_continues_from_its_first_frame(sampler):
    first = np.arange(256, dtype=np.int32).reshape(1, 16, 16)
    codes = sampler.continue_video([1, 30, 31], first, 3, sample.SampleSettings(), cfg_scale=2.0,
                                   unconditional=[1, 5])
    assert codes.shape == (3, 16, 16) and np.array_equal(codes[0], first[0])
    tokens = np.concatenate([[1, 30, 31], first.reshape(-1), [vocab.EOF_ID]])
    mask = np.r_[np.zeros(3, bool), np.ones(257, bool)]
    plain = sampler.generate_guided([tokens], 2, sample.SampleSettings(), vision_masks=[mask])
    assert np.array_equal(sampler.continue_video([1, 30, 31], first, 3, sample.SampleSettings())[1:],
                          sample.frame_codes(plain[0]))


def test_top_k_and_top_p_keep_only_the_best_tokens():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]]))
    assert np.isfinite(sample.filter_logits(logits, top_k=2)).tolist() == [[True, True, False, False]]
    assert np.isfinite(sample.filter_logits(logits, top_p=0.79)).tolist() == [[True, True, False, False]]
    assert np.isfinite(sample.filter_logits(logits, top_p=0.81)).tolist() == [[True, True, True, False]]
    assert np.isfinite(sample.filter_logits(logits, top_p=0.1)).tolist() == [[True, False, False, False]]
    settings = sample.SampleSettings(temperature=1.0, top_k=2)
    drawn = {int(sample.choose(logits, settings, np.random.default_rng(s))[0]) for s in range(50)}
    assert drawn == {0, 1}
    assert sample.choose(logits, sample.SampleSettings(), np.random.default_rng(0)).tolist() == [0]


def test_requests_beyond_the_context_or_memory_are_refused_before_running(sampler):
    with pytest.raises(ValueError, match="1000 prompt tokens \\+ 100 new tokens = 1100 exceeds .* 1024"):
        sampler.check_fits(1, 1000, 100)
    with pytest.raises(ValueError, match="GiB"):
        sampler.check_fits(10**7, 512, 1)
    with pytest.raises(ValueError, match="top_p"):
        sample.SampleSettings(top_p=0)


def test_prefill_length_is_divisible_by_the_ring_blocks_and_chunks():
    for n in (1, 7, 33, 100, 257):
        for sp in (1, 2, 4):
            p = sample.prefill_length(n, sp, CONFIG)
            assert p >= n and p % (2 * sp) == 0
            assert p // sp <= CONFIG.attention_block_q or (p // sp) % CONFIG.attention_block_q == 0
            assert p <= CONFIG.mlp_chunk_size or p % CONFIG.mlp_chunk_size == 0


def test_generate_cli_streams_a_completion(ckpt, tmp_path, tokenizer_path, capsys):
    code = cli.main(["generate", "--ckpt", str(ckpt), "--tokenizer", tokenizer_path,
                     "--prompt", "The old sailor", "--max-tokens", "6", "--chat"])
    out = capsys.readouterr().out
    assert code == 0 and out.strip()
    code = cli.main(["generate", "--ckpt", str(ckpt), "--tokenizer", tokenizer_path,
                     "--prompt", "x", "--image", str(tmp_path / "x.png")])
    assert code == 2 and "--vqgan" in capsys.readouterr().err


@pytest.mark.slow
def test_generate_cli_draws_an_image_through_the_vqgan(ckpt, tmp_path, tokenizer_path):
    from PIL import Image

    from pipelines.tokens.vqgan import SMALL, VQGAN

    VQGAN.init_random(SMALL, seed=0).save(str(tmp_path / "vqgan"))
    code = cli.main(["generate", "--ckpt", str(ckpt), "--tokenizer", tokenizer_path, "--prompt", "a red circle",
                     "--chat", "--temperature", "1", "--image", str(tmp_path / "out.png"),
                     "--vqgan", str(tmp_path / "vqgan")])
    assert code == 0
    with Image.open(tmp_path / "out.png") as image:
        assert image.size == (256, 256) and image.mode == "RGB"


def test_a_tokenizer_larger_than_the_text_vocabulary_is_refused_naming_both_sizes():
    class Tokenizer:
        vocab_size = CONFIG.vocab_size

    sample.check_tokenizer(Tokenizer(), CONFIG)
    Tokenizer.vocab_size += 1
    with pytest.raises(ValueError, match=f"{CONFIG.vocab_size + 1} pieces .* only {CONFIG.vocab_size}"):
        sample.check_tokenizer(Tokenizer(), CONFIG)
