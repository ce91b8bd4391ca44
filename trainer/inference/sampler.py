"""The sampler: long prompts prefilled with ring attention, then decoding from a sequence-sharded cache.

Use from Python (load once, generate many times)::

    from trainer.inference.sampler import Sampler, SampleSettings, encode_prompt
    sampler = Sampler("runs/tiny/checkpoints", sp=1)          # newest step
    prompts = [encode_prompt(tokenizer, "Once upon a time"), encode_prompt(tokenizer, "Q?", chat=True)]
    completions = sampler.generate(prompts, SampleSettings(max_new_tokens=64, temperature=0.7, top_p=0.9))
    tokenizer.decode(completions[0])                          # text after the prompt, EOS left out

How it works, on a mesh of ``sp`` devices (the ring, as in training):

1. **Prefill.** The batch of prompts (right-padded to a common length P, padding in
   segment 0 so it attends to nothing and nothing attends to it; each row its own
   positions 0..len-1) is put in the zigzag ring layout and run through the model with
   ring attention over ``sp``, exactly as in training. Every layer writes its keys and
   values into the key/value cache, which stays where ring attention left it: device r
   keeps the keys of its own prompt tokens.
2. **Decode.** One token per row per step. The cache of every layer is
   ``[B, sp * (Lp + Ld), K, E]``, sharded along the sequence over ``sp``: device r holds its
   ``Lp = P / sp`` prompt slots followed by ``Ld`` decode slots; decode step t writes its
   key/value to device ``t mod sp`` (so generated tokens spread over the ring too). Each
   device attends the new query to its own cache slots, and one ``pmax``/``psum`` pair
   merges the partial softmaxes (the online-softmax merge of ring attention, over one hop).
   Masks come from the cached segment ids and positions, so slot order does not matter,
   unfilled slots (segment 0) are invisible and rows of different lengths need no
   left-padding: row b's generated tokens get positions len_b, len_b + 1, ...
3. **Extend.** A chunk of N new tokens per row (a conversation's later turn, the rest of a
   prompt whose prefix is cached) goes through the cache in one forward pass: the program
   of step 2 with N queries instead of one. The chunk's keys/values take the next N decode
   steps' slots, and each query attends to the whole cache, which now holds the prefix and
   the chunk (the position mask makes the chunk causal). Chunks are padded to a few bucket
   lengths (:func:`chunk_length`), so the program compiles a bounded number of times.

Sampling (host side, numpy, seeded): greedy (``temperature=0``), or temperature with
optional top-k and top-p (nucleus) filtering. A row stops at EOS (not returned) or
after ``max_new_tokens``. Greedy results do not depend on how prompts are batched;
sampled ones depend on the seed and the row's index in the batch.

Vision generation (``generate_vision``): the prompt ends with the text ``<vision>`` (and,
to continue a video, the frames so far); the sampler then draws only VQGAN codes
(0..8191) from the vision head, forces ``<eof>`` after every 256 codes and ``<eov>`` after
the last requested frame; ``frame_codes`` gives the codes ``[F, 16, 16]`` and
``decode_frames`` uint8 RGB frames through a VQGAN. Classifier-free guidance
(``cfg_scale != 1``, as LWM's generation script): every prompt is paired with an
unconditional one (BOS ``<vision>``, plus the same frames when continuing) in the same
batch, and the codes are drawn from ``uncond + scale * (cond - uncond)``; both rows are
then fed the drawn code. ``cfg_scale == 1`` runs no unconditional rows at all.

Conversations (``prefill`` → ``sample`` → ``extend`` → ``sample`` …): a :class:`Context` is
one conversation's cache kept between turns, so a later turn feeds only its own tokens
(the previous answer's last token, EOS, the new question) through the cache, in one chunk
as in step 3, instead of prefilling the whole conversation again. When the decode
slots run out the cache grows on every device (each device's slots are padded at their
end, so slot addresses stay valid); the prompt slots stay sharded where the ring left them.

Correctness: ``teacher_forced_logits`` runs this exact path (prefill, then one token at a
time through the cache) and equals ``trainer.inference.predictor.logits`` (tests, fp32, sp 1 and 4);
so do a chunked extend's logits.

Shape legend: B batch, P padded prompt length, T cache slots, S sequence, D d_model,
H query heads, K key/value heads, G = H / K, Q = G * N, E head dim, V text vocab, W vision vocab,
L layers, N new tokens of a chunk.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from pipelines.tokens import prompts
from pipelines.tokens.text_tokenizer import TextTokenizer
from schemas import vocab
from trainer import checkpoint
from trainer.model import LWM, ModelConfig, param_shapes
from trainer.ring_layout import layout_permutation
from trainer.ring_attention import ring_attention
from trainer.sharding import MeshConfig, activate, logical_to_spec, make_mesh, validate

FRAME_TOKENS = vocab.TOKENS_PER_FRAME + 1  # 256 codes, then <eof> or <eov>
MAX_CHUNK = 256  # new tokens fed through the cache in one pass; longer feeds take several
_LAYOUT = "zigzag"


@dataclasses.dataclass(frozen=True)
class SampleSettings:
    """How tokens are drawn. ``temperature=0`` is greedy; ``top_k=0`` and ``top_p=1`` turn those filters off.

    ``eos_id``: the text id that ends a completion (Llama's and our tokenizers' 2);
    None generates ``max_new_tokens`` regardless.
    """

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    eos_id: int | None = 2

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0 or self.top_k < 0:
            raise ValueError(f"temperature and top_k must be >= 0, got {self.temperature}, {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}")


def open_checked(ckpt: str, tokenizer_path: str, *, step: int | None = None, sp: int = 1) -> tuple[TextTokenizer, "Sampler"]:
    """``(tokenizer, Sampler)`` of a checkpoint (or run) directory; the tokenizer is checked against the
    checkpoint's vocabulary before its weights are loaded."""
    tokenizer = TextTokenizer(tokenizer_path)
    ckpt = checkpoint.resolve_dir(ckpt)
    check_tokenizer(tokenizer, checkpoint.restore_model_config(ckpt, step))
    return tokenizer, Sampler(ckpt, sp=sp, step=step)


def check_tokenizer(tokenizer, config: ModelConfig) -> None:
    """ValueError unless every piece of ``tokenizer`` has a row in the model's text vocabulary."""
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} pieces but the checkpoint's text vocabulary "
                         f"only {config.vocab_size}: they do not belong together")


def unconditional_prompt(tokenizer) -> list[int]:
    """What classifier-free guidance contrasts a vision prompt with: BOS ``<vision>`` (LWM's generation script)."""
    return [int(tokenizer.bos_id), *(int(i) for i in tokenizer.encode(vocab.VISION_OPEN))]


def encode_prompt(tokenizer, text: str, *, chat: bool = False, vision: bool = False) -> list[int]:
    """Token ids of a prompt as the model saw text in training: BOS, then the text (no EOS).

    ``chat`` wraps ``text`` in LWM's chat template; ``vision`` ends the prompt with the
    ``<vision>`` tag (tokenized on its own, as ``pipelines.tokens.vision_layout`` does), so that
    the model continues with vision tokens.
    """
    ids = [tokenizer.bos_id, *tokenizer.encode(prompts.chat_prompt(text) if chat else text)]
    if vision:
        ids += list(tokenizer.encode(vocab.VISION_OPEN))
    return [int(i) for i in ids]


# ----------------------------------------------------------------------------- token choice


def filter_logits(logits_BxV: np.ndarray, top_k: int = 0, top_p: float = 1.0) -> np.ndarray:
    """Logits with everything outside the top-k and the top-p nucleus set to -inf.

    top-k keeps the k highest logits (ties at the k-th value kept); top-p keeps the
    fewest highest-probability tokens whose probabilities sum to at least ``top_p``
    (always at least one).
    """
    logits = np.asarray(logits_BxV, np.float64).copy()
    if top_k and top_k < logits.shape[-1]:
        kth = np.partition(logits, -top_k, axis=-1)[:, -top_k, None]
        logits[logits < kth] = -np.inf
    if top_p < 1.0:
        order = np.argsort(-logits, axis=-1, kind="stable")
        sorted_logits = np.take_along_axis(logits, order, axis=-1)
        probs = np.exp(sorted_logits - sorted_logits[:, :1])
        probs /= probs.sum(axis=-1, keepdims=True)
        before = np.cumsum(probs, axis=-1) - probs  # mass of strictly better tokens
        drop = np.zeros_like(logits, bool)
        np.put_along_axis(drop, order, before >= top_p, axis=-1)
        logits[drop] = -np.inf
    return logits


def choose(logits_BxV: np.ndarray, settings: SampleSettings, rng: np.random.Generator) -> np.ndarray:
    """One token per row: argmax when ``temperature == 0``, else a draw from the filtered softmax."""
    logits = np.asarray(logits_BxV, np.float64)
    if settings.temperature == 0:
        return np.argmax(logits, axis=-1)
    logits = filter_logits(logits / settings.temperature, settings.top_k, settings.top_p)
    probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
    cdf = np.cumsum(probs, axis=-1)
    draws = rng.random(len(logits))[:, None] * cdf[:, -1:]
    return np.minimum(np.sum(cdf < draws, axis=-1), logits.shape[-1] - 1)


# ----------------------------------------------------------------------------- cache attention


def _cache_specs():
    kv = logical_to_spec(("batch", "length", "act_kv_heads", "head_dim"))
    tokens = logical_to_spec(("batch", "length"))
    return {"k": kv, "v": kv, "segment_ids": tokens, "positions": tokens, "index": PartitionSpec()}


def _prefill_attention(mesh, config: ModelConfig):
    """Ring attention over ``sp`` (as in training) that also writes the prompt's keys/values to the cache."""

    def per_shard(q, k, v, segment_ids, positions, cache):
        out = ring_attention(q, k, v, q_segment_ids=segment_ids, kv_segment_ids=segment_ids,
                             q_positions=positions, kv_positions=positions, axis_name="sp", causal=True,
                             block_q=config.attention_block_q, block_kv=config.attention_block_kv)
        new = {name: jax.lax.dynamic_update_slice_in_dim(cache[name], x.astype(cache[name].dtype), 0, axis=1)
               for name, x in (("k", k), ("v", v), ("segment_ids", segment_ids), ("positions", positions))}
        return out, {**new, "index": cache["index"]}

    heads = logical_to_spec(("batch", "length", "act_heads", "head_dim"))
    kv = logical_to_spec(("batch", "length", "act_kv_heads", "head_dim"))
    tokens = logical_to_spec(("batch", "length"))
    return jax.shard_map(per_shard, mesh=mesh, in_specs=(heads, kv, kv, tokens, tokens, _cache_specs()),
                         out_specs=(heads, _cache_specs()))


def _cache_attention(mesh, prompt_slots: int):
    """Attention of a chunk of N new tokens per row against the sequence-sharded cache (module docstring,
    steps 2 and 3): the chunk's keys/values are written to the cache first, then every query attends to
    the whole cache, so the chunk sees the cached prefix and (by positions) itself causally. A decode
    step is the chunk of one token.

    Chunk token j is ring step ``index + j``: device ``(index + j) mod sp``, ring slot ``(index + j) // sp``.
    Only the first ``count`` tokens are written, ``count`` being the largest number of real tokens
    (segment id > 0) in a row: a chunk padded to its bucket keeps its padding out of the cache.
    """

    def per_shard(q_BxNxHxE, k_BxNxKxE, v_BxNxKxE, segment_ids_BxN, positions_BxN, cache):
        step, sp = cache["index"], jax.lax.axis_size("sp")
        chunk = q_BxNxHxE.shape[1]
        count = jax.lax.pmax(jnp.max(jnp.sum(segment_ids_BxN > 0, axis=1)), batch_axes)  # one step for all rows
        steps_N = step + jnp.arange(chunk)
        mine_N = (steps_N % sp == jax.lax.axis_index("sp")) & (jnp.arange(chunk) < count)
        # The decode slots are a ring: a batch that outlives them (the server's) reuses the oldest.
        slots = cache["k"].shape[1]
        slot_N = jnp.where(mine_N, prompt_slots + (steps_N // sp) % (slots - prompt_slots), slots)

        def put(buffer, new):  # slot ``slots`` is out of range: those tokens are dropped
            return buffer.at[:, slot_N].set(new.astype(buffer.dtype), mode="drop")

        cache = {"k": put(cache["k"], k_BxNxKxE), "v": put(cache["v"], v_BxNxKxE),
                 "segment_ids": put(cache["segment_ids"], segment_ids_BxN),
                 "positions": put(cache["positions"], positions_BxN), "index": step + count}
        return _merged_attention(q_BxNxHxE, segment_ids_BxN, positions_BxN, cache), cache

    # The new tokens are replicated over sp (every device attends them to its own slots).
    batch_axes = logical_to_spec(("batch",))[0]
    batch_axes = () if batch_axes is None else (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes)
    heads = logical_to_spec(("batch", None, "act_heads", "head_dim"))
    kv = logical_to_spec(("batch", None, "act_kv_heads", "head_dim"))
    tokens = logical_to_spec(("batch", None))
    return jax.shard_map(per_shard, mesh=mesh, in_specs=(heads, kv, kv, tokens, tokens, _cache_specs()),
                         out_specs=(heads, _cache_specs()))


def _merged_attention(q_BxNxHxE, segment_ids_BxN, positions_BxN, cache):
    """Exact attention over all devices' cache slots: local partial softmax (fp32), merged by pmax/psum over sp.

    A key/value head's G query heads and N tokens are one axis of Q = G * N queries, so that both products
    are plain batched matrix products: on CPU 3-4 times faster than with G and N apart (a 64-token chunk
    over 9,216 slots: about 8 ms instead of 20-40 per layer).
    """
    k_BxTxKxE, v_BxTxKxE = cache["k"], cache["v"]
    b, n, h, e = q_BxNxHxE.shape
    kh = k_BxTxKxE.shape[2]
    g = h // kh
    q_BxKxQxE = q_BxNxHxE.reshape(b, n, kh, g, e).transpose(0, 2, 3, 1, 4).reshape(b, kh, g * n, e)
    q_BxKxQxE = q_BxKxQxE.astype(jnp.float32) * e**-0.5
    s_BxKxQxT = jnp.einsum("bkqe,btke->bkqt", q_BxKxQxE, k_BxTxKxE.astype(jnp.float32))
    visible_BxNxT = ((cache["segment_ids"][:, None, :] == segment_ids_BxN[:, :, None])
                     & (segment_ids_BxN[:, :, None] > 0)
                     & (cache["positions"][:, None, :] <= positions_BxN[:, :, None]))
    visible_Bx1xQxT = jnp.tile(visible_BxNxT, (1, g, 1))[:, None]
    s_BxKxQxT = jnp.where(visible_Bx1xQxT, s_BxKxQxT, -jnp.inf)
    m_BxKxQ = jax.lax.pmax(jnp.max(s_BxKxQxT, axis=-1), "sp")
    m_BxKxQ = jnp.where(jnp.isneginf(m_BxKxQ), 0.0, m_BxKxQ)
    p_BxKxQxT = jnp.exp(s_BxKxQxT - m_BxKxQ[..., None])
    denom_BxKxQ = jax.lax.psum(jnp.sum(p_BxKxQxT, axis=-1), "sp")
    out_BxKxQxE = jax.lax.psum(jnp.einsum("bkqt,btke->bkqe", p_BxKxQxT, v_BxTxKxE.astype(jnp.float32)), "sp")
    out_BxKxQxE = out_BxKxQxE / jnp.where(denom_BxKxQ > 0, denom_BxKxQ, 1.0)[..., None]
    out_BxNxHxE = out_BxKxQxE.reshape(b, kh, g, n, e).transpose(0, 3, 1, 2, 4).reshape(b, n, h, e)
    return out_BxNxHxE.astype(q_BxNxHxE.dtype)


def chunk_length(n: int, config: ModelConfig) -> int:
    """The bucket a chunk of ``n <= MAX_CHUNK`` new tokens is padded to: 1, 4, 16, 64 or 256 (a multiple of
    the MLP chunk when longer than it), so the extend program compiles a few times, not once per length."""
    if not 1 <= n <= MAX_CHUNK:
        raise ValueError(f"a chunk holds 1 to {MAX_CHUNK} tokens, got {n}")
    length = 1 << (2 * math.ceil(math.log2(n) / 2))
    if length > config.mlp_chunk_size:
        length = -(-length // config.mlp_chunk_size) * config.mlp_chunk_size
    return length


# ----------------------------------------------------------------------------- sizes


def prefill_length(prompt_len: int, sp: int, config: ModelConfig) -> int:
    """The padded prompt length: a multiple of 2 sp (zigzag) that ring blocks and MLP chunks divide,
    and of a sixteenth of the length's power of two (at least 16), so that nearby lengths share
    compiled programs."""
    length = max(int(prompt_len), 1)
    bucket = max(16, 1 << max(length.bit_length() - 4, 0))
    length = -(-length // bucket) * bucket
    while True:
        unit = 2 * sp
        for block in (config.attention_block_q, config.attention_block_kv):
            if length // sp > block:
                unit = math.lcm(unit, sp * block)
        if length > config.mlp_chunk_size:
            unit = math.lcm(unit, config.mlp_chunk_size)
        padded = -(-length // unit) * unit
        if padded == length:
            return length
        length = padded


def memory_estimate(config: ModelConfig, batch: int, prompt_len: int, new_tokens: int, sp: int) -> int:
    """Bytes one device needs to sample (an estimate, on the safe side): replicated parameters, its
    share of the cache, prefill activations of its share of the prompt, one MLP chunk, the logits."""
    item = jnp.dtype(config.dtype).itemsize
    padded = prefill_length(prompt_len, sp, config)
    slots = padded // sp + -(-max(new_tokens - 1, 1) // sp) + 16
    params = config.num_params() * jnp.dtype(config.param_dtype).itemsize
    cache = config.num_layers * batch * slots * (2 * config.num_kv_heads * config.head_dim * item + 8)
    local = batch * (padded // sp)
    activations = local * (8 * config.d_model * 4 + 4 * (config.num_heads + 2 * config.num_kv_heads) * config.head_dim)
    mlp = 3 * batch * min(padded, config.mlp_chunk_size) * config.mlp_dim * 4
    tiles = 4 * batch * config.num_heads * config.attention_block_q * config.attention_block_kv * 4
    logits = 2 * batch * (config.vocab_size + config.vision_vocab_size) * 4
    return int(params + cache + activations + mlp + tiles + logits)


def available_memory(device: jax.Device, devices_sharing_host: int = 1) -> int | None:
    """Free bytes on ``device``: its allocator's limit minus use, or (CPU) the host's free memory
    divided among the simulated devices sharing it; None if unknown."""
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    try:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None
    return int(free // max(devices_sharing_host, 1))


# ----------------------------------------------------------------------------- the sampler


class Sampler:
    """A checkpoint loaded once onto ``sp`` devices (the first ``sp`` of ``jax.devices()``),
    ready to sample many batches. Parameters are replicated; prompts and caches are split
    over the ``sp`` ring. Compiled programs are shared per (model, mesh, batch, padded prompt,
    cache slots), prompt and budget rounded up so that nearby requests share them.
    """

    def __init__(self, ckpt_dir: str | os.PathLike, *, sp: int = 1, step: int | None = None):
        if sp < 1 or sp > jax.device_count():
            raise ValueError(f"sp must lie in [1, {jax.device_count()}] (the devices JAX sees), got {sp}")
        self.config = checkpoint.restore_model_config(ckpt_dir, step)
        self.sp = sp
        self.mesh = make_mesh(MeshConfig(dp=1, fsdp=1, sp=sp, tp=1), jax.devices()[:sp])
        validate(self.config, self.mesh, 1, sp)
        replicated = NamedSharding(self.mesh, PartitionSpec())
        shapes = param_shapes(self.config)
        self.params, _ = checkpoint.restore_params(ckpt_dir, step, sharding=jax.tree.map(lambda _: replicated, shapes))

    # -- public API

    def generate(self, prompts: Sequence[Sequence[int]], settings: SampleSettings = SampleSettings(),
                 on_token: Callable[[int, int], None] | None = None,
                 vision_masks: Sequence[Sequence[bool]] | None = None) -> list[list[int]]:
        """Text completions (token ids after each prompt, EOS left out) of a batch of prompts.

        ``prompts``: token ids (BOS first, see :func:`encode_prompt`), any lengths; ``vision_masks``
        (one per prompt, default all False) marks vision ids, e.g. an image a question is about.
        ``on_token(row, token)`` is called for every token as soon as it is chosen (streaming).
        """
        tokens, _ = self._run(prompts, settings, frames=0, on_token=on_token, vision_masks=vision_masks)
        return tokens

    def generate_vision(self, prompts: Sequence[Sequence[int]], frames: int,
                        settings: SampleSettings = SampleSettings()) -> list[list[int]]:
        """Vision ids (``frames * 257`` per prompt: codes, ``<eof>`` after each frame, ``<eov>`` after
        the last) continuing prompts that end with the ``<vision>`` tag; :func:`frame_codes` turns
        them into ``[frames, 16, 16]`` codes. ``settings.max_new_tokens`` and ``eos_id`` are not used.
        """
        if frames < 1:
            raise ValueError(f"frames must be >= 1, got {frames}")
        if not self.config.vision_vocab_size:
            raise ValueError("this checkpoint has no vision head (vision_vocab_size 0): it cannot generate images")
        return self.generate_guided(prompts, frames, settings)

    def generate_guided(self, prompts: Sequence[Sequence[int]], frames: int, settings: SampleSettings = SampleSettings(),
                        *, cfg_scale: float = 1.0, unconditional: Sequence[int] | None = None,
                        vision_masks: Sequence[Sequence[bool]] | None = None,
                        unconditional_mask: Sequence[bool] | None = None) -> list[list[int]]:
        """:meth:`generate_vision` with classifier-free guidance and prompts that may hold vision tokens.

        ``vision_masks``: one per prompt (True on its vision ids: the frames a video continues);
        ``unconditional``: the prompt guidance contrasts with (LWM's BOS ``<vision>``, then the
        same frames), used for every row. ``cfg_scale == 1`` is exactly :meth:`generate_vision`.
        """
        if frames < 1:
            raise ValueError(f"frames must be >= 1, got {frames}")
        if not self.config.vision_vocab_size:
            raise ValueError("this checkpoint has no vision head (vision_vocab_size 0): it cannot generate images")
        if cfg_scale != 1.0 and unconditional is None:
            raise ValueError("classifier-free guidance needs the unconditional prompt")
        masks = list(vision_masks) if vision_masks is not None else [np.zeros(len(p), bool) for p in prompts]
        rows, row_masks, guidance = list(prompts), masks, None
        if cfg_scale != 1.0:
            uncond_mask = np.zeros(len(unconditional), bool) if unconditional_mask is None else unconditional_mask
            rows = rows + [unconditional] * len(prompts)
            row_masks = masks + [uncond_mask] * len(prompts)
            guidance = float(cfg_scale)
        settings = dataclasses.replace(settings, max_new_tokens=frames * FRAME_TOKENS, eos_id=None)
        tokens, _ = self._run(rows, settings, frames=frames, vision_masks=row_masks, guidance=guidance)
        return tokens[:len(prompts)]

    def continue_video(self, prompt: Sequence[int], first_Fx16x16: np.ndarray, frames: int,
                       settings: SampleSettings = SampleSettings(), *, cfg_scale: float = 1.0,
                       unconditional: Sequence[int] | None = None) -> np.ndarray:
        """Codes ``[frames, 16, 16]`` of a video that starts with the given frame(s) (LWM's video generation:
        the first frame drawn as an image, then the rest conditioned on it). ``prompt`` ends with ``<vision>``;
        the given frames follow it, each closed by ``<eof>``, in the prompt and (for guidance) in the
        unconditional prompt alike."""
        first = np.asarray(first_Fx16x16, np.int64).reshape(-1, vocab.TOKENS_PER_FRAME)
        if not 1 <= len(first) < frames:
            raise ValueError(f"continuing needs 1 to frames - 1 given frames; got {len(first)} of {frames}")
        given = np.concatenate([first, np.full((len(first), 1), vocab.EOF_ID)], axis=1).reshape(-1)

        def with_frames(ids):
            ids = np.asarray(ids, np.int64)
            return np.concatenate([ids, given]), np.concatenate([np.zeros(len(ids), bool), np.ones(len(given), bool)])

        tokens, mask = with_frames(prompt)
        uncond, uncond_mask = with_frames(unconditional) if unconditional is not None else (None, None)
        (ids,) = self.generate_guided([tokens], frames - len(first), settings, cfg_scale=cfg_scale,
                                      unconditional=uncond, vision_masks=[mask], unconditional_mask=uncond_mask)
        return np.concatenate([first.reshape(-1, 16, 16).astype(np.int32), frame_codes(ids)])

    def teacher_forced_logits(self, tokens: np.ndarray, prefill_len: int,
                              vision_mask: np.ndarray | None = None) -> np.ndarray:
        """Text-head logits ``[B, S, V]`` (float32) computed by the sampler's own path: prefill of
        ``tokens[:, :prefill_len]``, then the remaining tokens fed one at a time through the cache."""
        tokens = np.asarray(tokens)
        vision_mask = np.zeros(tokens.shape, bool) if vision_mask is None else np.asarray(vision_mask, bool)
        if tokens.ndim != 2 or vision_mask.shape != tokens.shape or not 1 <= prefill_len <= tokens.shape[1]:
            raise ValueError(f"need tokens [B, S], a vision mask of the same shape and 1 <= prefill_len <= S; "
                             f"got {tokens.shape}, {vision_mask.shape}, {prefill_len}")
        batch, seq = tokens.shape
        lengths = np.full(batch, prefill_len)
        state = self._prefill(tokens[:, :prefill_len], vision_mask[:, :prefill_len], lengths,
                              seq - prefill_len, all_positions=True)
        logits = [state.text_logits]
        for step in range(seq - prefill_len):
            state = self._decode(state, tokens[:, prefill_len + step], vision_mask[:, prefill_len + step])
            logits.append(state.text_logits)
        return np.concatenate(logits, axis=1)

    def check_fits(self, batch: int, prompt_len: int, new_tokens: int) -> None:
        """ValueError, before anything is allocated, if a request is longer than the model's
        ``max_position_embeddings`` or (by :func:`memory_estimate`) will not fit on a device."""
        total = prompt_len + new_tokens
        if total > self.config.max_position_embeddings:
            raise ValueError(f"{prompt_len} prompt tokens + {new_tokens} new tokens = {total} exceeds the "
                             f"checkpoint's max_position_embeddings {self.config.max_position_embeddings}")
        need = memory_estimate(self.config, batch, prompt_len, new_tokens, self.sp)
        device = jax.devices()[0]
        free = available_memory(device, jax.local_device_count() if device.platform == "cpu" else 1)
        if free is not None and need > free:
            raise ValueError(f"{batch} x {total} tokens need about {need / 2**30:.2f} GiB per device at sp={self.sp}, "
                             f"but {free / 2**30:.2f} GiB are free; use a larger sp or shorter lengths")

    # -- conversations: one row's cache kept between turns (module docstring, "Conversations")

    def prefill(self, tokens: Sequence[int], vision_mask: Sequence[bool] | None = None, *,
                reserve: int = 256) -> "Context":
        """A conversation's first prompt prefilled with ring attention over ``sp``, its cache kept with
        decode room for ``reserve`` more tokens (it grows when a conversation needs more). Checked
        against the context and the device memory first, like :meth:`generate`."""
        tokens = np.asarray(tokens, np.int64)
        mask = np.zeros(tokens.shape, bool) if vision_mask is None else np.asarray(vision_mask, bool)
        self._check_ids(tokens, mask)
        self.check_fits(1, len(tokens), reserve)
        state = self._prefill(tokens[None], mask[None], np.array([len(tokens)]), reserve)
        return Context(state, len(tokens), (), state.text_logits[0], [False])

    def extend(self, context: "Context", tokens: Sequence[int], vision_mask: Sequence[bool] | None = None) -> "Context":
        """``context`` with its pending tokens (the last answer's last token or EOS) and then ``tokens``
        fed through the cache in chunks of up to ``MAX_CHUNK`` tokens, one forward pass each: nothing
        before them is computed again. ``text_logits`` of the result: one row per token fed."""
        tokens = np.asarray(tokens, np.int64)
        mask = np.zeros(tokens.shape, bool) if vision_mask is None else np.asarray(vision_mask, bool)
        context.take()
        feed = np.concatenate([np.asarray(context.pending, np.int64), tokens])
        feed_mask = np.concatenate([np.zeros(len(context.pending), bool), mask])
        if not feed.size:
            return dataclasses.replace(context, used=[False])
        self._check_ids(feed, feed_mask)
        self._check_room(context.length + len(feed))
        state = self._grown(context.state, len(feed))
        logits = []
        for start in range(0, len(feed), MAX_CHUNK):
            state = self._feed(state, feed[None, start:start + MAX_CHUNK], feed_mask[None, start:start + MAX_CHUNK])
            logits.append(state.text_logits[0])
        return Context(state, context.length + len(feed), (), np.concatenate(logits), [False])

    def sample(self, context: "Context", settings: SampleSettings = SampleSettings(),
               on_token: Callable[[int], None] | None = None) -> "Answer":
        """A text answer continuing ``context`` (fed its pending tokens first). The answer's tokens are
        fed through the cache as they are drawn, except the last one drawn (EOS, or the last token of an
        answer cut at ``max_new_tokens``): that one is the returned context's ``pending``, fed by the
        next :meth:`extend`."""
        context = self.extend(context, [])  # its pending tokens fed (and ``context`` taken)
        new = settings.max_new_tokens
        self._check_room(context.length + new)
        state, rng, out = self._grown(context.state, new - 1), np.random.default_rng(settings.seed), []
        for step in range(new):
            token = int(choose(state.text_logits[:, -1], settings, rng)[0])
            if settings.eos_id is not None and token == settings.eos_id:
                return Answer(out, True, Context(state, context.length + step, (token,), state.text_logits[0], [False]))
            out.append(token)
            if on_token is not None:
                on_token(token)
            if step == new - 1:
                break
            state = self._decode(state, np.array([token]), np.array([False]))
        return Answer(out, False, Context(state, context.length + new - 1, (out[-1],), state.text_logits[0], [False]))

    def fork(self, context: "Context") -> "Context":
        """An independent copy of ``context`` (its cache copied on the devices), e.g. to try two next turns."""
        if context.used[0]:
            raise ValueError("this context was already extended or sampled from; use the one that returned")
        cache = jax.tree.map(jnp.copy, context.state.cache)
        return dataclasses.replace(context, state=dataclasses.replace(context.state, cache=cache), used=[False])

    def _check_room(self, total: int) -> None:
        if total > self.config.max_position_embeddings:
            raise ValueError(f"the conversation would reach {total} tokens, beyond the checkpoint's "
                             f"max_position_embeddings {self.config.max_position_embeddings}")

    def _grown(self, state: "_State", more: int) -> "_State":
        """``state`` with decode slots for ``more`` further steps: every device's slots padded at their end."""
        slots = state.cache["k"].shape[2] // self.sp - state.prompt_slots
        need = -(-(state.steps + max(more, 0)) // self.sp)
        if need <= slots:
            return state
        extra = -(-max(need, 2 * slots) // 16) * 16 - slots
        with activate(self.mesh):
            cache = _grow_program(self.mesh, extra)(state.cache)
        return dataclasses.replace(state, cache=cache)

    # -- internals

    def _run(self, prompts, settings: SampleSettings, frames: int, on_token=None, vision_masks=None,
             guidance: float | None = None):
        prompts = [np.asarray(p, np.int64) for p in prompts]
        if not prompts or any(p.ndim != 1 or p.size == 0 for p in prompts):
            raise ValueError("prompts must be a non-empty list of non-empty token id lists")
        masks = [np.zeros(len(p), bool) if vision_masks is None else np.asarray(m, bool)
                 for p, m in zip(prompts, vision_masks or prompts)]
        for p, m in zip(prompts, masks):
            self._check_ids(p, m)
        lengths = np.array([len(p) for p in prompts])
        new = settings.max_new_tokens
        self.check_fits(len(prompts), int(lengths.max()), new)
        padded = np.zeros((len(prompts), lengths.max()), np.int64)
        padded_mask = np.zeros(padded.shape, bool)
        for row, (p, m) in enumerate(zip(prompts, masks)):
            padded[row, :len(p)], padded_mask[row, :len(p)] = p, m
        state = self._prefill(padded, padded_mask, lengths, new - 1)
        rng = np.random.default_rng(settings.seed)
        out: list[list[int]] = [[] for _ in prompts]
        done = np.zeros(len(prompts), bool)
        vision = np.full(len(prompts), frames > 0)
        for step in range(new):
            token = self._next(state, step, frames, settings, rng, guidance)
            for row in np.flatnonzero(~done):
                if not frames and settings.eos_id is not None and token[row] == settings.eos_id:
                    done[row] = True
                    continue
                out[row].append(int(token[row]))
                if on_token is not None:
                    on_token(int(row), int(token[row]))
            if done.all() or step == new - 1:
                break
            state = self._decode(state, token, vision)
        return out, state

    def _next(self, state, step: int, frames: int, settings: SampleSettings, rng, guidance=None) -> np.ndarray:
        """The tokens of decode step ``step``: text, or vision codes with forced frame markers; with
        ``guidance`` (a CFG scale) the second half of the rows are the first half's unconditional
        prompts, and both halves get the code drawn from the guided logits."""
        if not frames:
            return choose(state.text_logits[:, -1], settings, rng)
        if step % FRAME_TOKENS == FRAME_TOKENS - 1:
            marker = vocab.EOV_ID if step == frames * FRAME_TOKENS - 1 else vocab.EOF_ID
            return np.full(state.vision_logits.shape[0], marker)
        logits = state.vision_logits[:, -1, :vocab.VISION_CODEBOOK_SIZE].astype(np.float64)
        if guidance is None:
            return choose(logits, settings, rng)
        cond, uncond = np.split(logits, 2)
        token = choose(uncond + guidance * (cond - uncond), settings, rng)
        return np.concatenate([token, token])

    def _check_ids(self, tokens: np.ndarray, vision_mask: np.ndarray) -> None:
        if tokens.ndim != 1 or tokens.size == 0 or vision_mask.shape != tokens.shape:
            raise ValueError("a prompt is a non-empty list of token ids with a vision mask of the same length")
        text, vision = tokens[~vision_mask], tokens[vision_mask]
        if text.size and (text.min() < 0 or text.max() >= self.config.vocab_size):
            raise ValueError(f"prompt token ids must lie in [0, {self.config.vocab_size})")
        if vision.size and (vision.min() < 0 or vision.max() >= self.config.vision_vocab_size):
            raise ValueError(f"vision ids must lie in [0, {self.config.vision_vocab_size}) (this checkpoint's "
                             f"vision vocabulary)")

    def _prefill(self, tokens_BxS, vision_BxS, lengths_B, decode_steps: int, all_positions: bool = False):
        batch, seq = tokens_BxS.shape
        padded = prefill_length(seq, self.sp, self.config)
        decode_slots = -(-max(decode_steps, 1) // self.sp)
        decode_slots = -(-decode_slots // 16) * 16  # shared programs for nearby budgets
        columns = np.arange(padded)
        valid = columns[None, :] < lengths_B[:, None]
        natural = {
            "tokens": np.where(valid, np.pad(tokens_BxS, ((0, 0), (0, padded - seq))), 0).astype(np.int32),
            "vision_mask": valid & np.pad(vision_BxS, ((0, 0), (0, padded - seq))),
            "segment_ids": valid.astype(np.int32),
            "positions": np.where(valid, columns[None, :], 0).astype(np.int32),
        }
        perm = layout_permutation(padded, self.sp, _LAYOUT)
        inverse = np.argsort(perm)
        gather = inverse[None, :seq].repeat(batch, 0) if all_positions else inverse[lengths_B - 1][:, None]
        fn = _prefill_program(self.config, self.mesh, decode_slots)
        with activate(self.mesh):
            sharding = NamedSharding(self.mesh, logical_to_spec(("batch", "length")))
            inputs = {k: jax.device_put(v[:, perm], sharding) for k, v in natural.items()}
            text, vision, cache = fn(self.params, inputs, jnp.asarray(gather, jnp.int32))
        return _State(cache, np.asarray(lengths_B), 0, padded // self.sp, np.asarray(text),
                      None if vision is None else np.asarray(vision))

    def _decode(self, state: "_State", token_B, vision_B) -> "_State":
        return self._feed(state, np.asarray(token_B)[:, None], np.asarray(vision_B)[:, None])

    def _feed(self, state: "_State", tokens_BxN, vision_BxN) -> "_State":
        """``state`` after a chunk of new tokens (every row the same number, at most ``MAX_CHUNK``) went
        through the cache in one pass; its logits: one row per token fed."""
        batch, n = tokens_BxN.shape
        pad = chunk_length(n, self.config) - n
        real = np.pad(np.ones((batch, n), np.int32), ((0, 0), (0, pad)))
        positions = (state.lengths + state.steps)[:, None] + np.arange(n + pad)[None]
        fn = _feed_program(self.config, self.mesh, state.prompt_slots)
        replicated = NamedSharding(self.mesh, PartitionSpec())
        args = [jax.device_put(x, replicated) for x in (
            np.pad(np.asarray(tokens_BxN, np.int32), ((0, 0), (0, pad))),
            np.pad(np.asarray(vision_BxN, bool), ((0, 0), (0, pad))), real, (positions * real).astype(np.int32))]
        text, vision, cache = fn(self.params, state.cache, *args)
        return _State(cache, state.lengths, state.steps + n, state.prompt_slots, np.asarray(text)[:, :n],
                      None if vision is None else np.asarray(vision)[:, :n])


def _heads(model: LWM, params, hidden_BxNxD):
    text_head, vision_head = model.apply({"params": params}, method=LWM.head_kernels)
    text = jnp.einsum("bnd,dv->bnv", hidden_BxNxD, text_head, preferred_element_type=jnp.float32)
    vision = None if vision_head is None else jnp.einsum(
        "bnd,dw->bnw", hidden_BxNxD, vision_head, preferred_element_type=jnp.float32)
    return text, vision


@functools.lru_cache(maxsize=16)
def _prefill_program(config: ModelConfig, mesh, decode_slots: int) -> Callable:
    """``prefill(params, inputs, gather) -> (text logits, vision logits, cache)``, jitted; shared by
    every sampler of this model and mesh, so a checkpoint loaded twice compiles once."""
    model = LWM(config, _prefill_attention(mesh, config))
    cache_sharding = {k: NamedSharding(mesh, PartitionSpec(None, *spec)) for k, spec in _cache_specs().items()}
    sp = mesh.shape["sp"]

    def prefill(params, inputs, gather_BxN):
        batch, padded = inputs["tokens"].shape
        slots = padded + sp * decode_slots
        dtype = jnp.dtype(config.dtype)
        layers, kv = config.num_layers, (config.num_kv_heads, config.head_dim)
        empty = {"k": jnp.zeros((layers, batch, slots, *kv), dtype), "v": jnp.zeros((layers, batch, slots, *kv), dtype),
                 "segment_ids": jnp.zeros((layers, batch, slots), jnp.int32),
                 "positions": jnp.zeros((layers, batch, slots), jnp.int32),
                 "index": jnp.zeros((layers,), jnp.int32)}
        empty = jax.lax.with_sharding_constraint(empty, cache_sharding)
        hidden_BxPxD, cache = model.apply({"params": params}, inputs["tokens"], inputs["vision_mask"],
                                          inputs["segment_ids"], inputs["positions"], empty)
        hidden_BxNxD = jnp.take_along_axis(hidden_BxPxD, gather_BxN[..., None], axis=1)
        return (*_heads(model, params, hidden_BxNxD), cache)

    return jax.jit(prefill, out_shardings=(None, None, cache_sharding))


@functools.lru_cache(maxsize=16)
def _feed_program(config: ModelConfig, mesh, prompt_slots: int) -> Callable:
    """``feed(params, cache, tokens, vision, segment_ids, positions) -> (text logits, vision logits, cache)``,
    jitted: a chunk ``[B, N]`` of new tokens through the cache in one forward pass (a decode step: N = 1);
    logits ``[B, N, V]`` of every chunk position. It compiles once per chunk length (:func:`chunk_length`)."""
    model = LWM(config, _cache_attention(mesh, prompt_slots))

    def feed(params, cache, tokens_BxN, vision_BxN, segment_ids_BxN, positions_BxN):
        hidden, cache = model.apply({"params": params}, tokens_BxN, vision_BxN, segment_ids_BxN, positions_BxN, cache)
        return (*_heads(model, params, hidden), cache)

    return jax.jit(feed, donate_argnums=1)


@functools.lru_cache(maxsize=8)
def _grow_program(mesh, extra: int) -> Callable:
    """``grow(cache) -> cache`` with ``extra`` empty slots (segment 0: invisible) after each device's own."""

    def per_shard(cache):
        def pad(x):
            return jnp.pad(x, [(0, 0), (0, 0), (0, extra)] + [(0, 0)] * (x.ndim - 3)) if x.ndim >= 3 else x
        return jax.tree.map(pad, cache)

    specs = {k: PartitionSpec(None, *spec) for k, spec in _cache_specs().items()}
    return jax.jit(jax.shard_map(per_shard, mesh=mesh, in_specs=(specs,), out_specs=specs))


@dataclasses.dataclass(frozen=True)
class Context:
    """One conversation's key/value cache on the sampler's devices, between turns (:meth:`Sampler.prefill`).

    ``length``: tokens fed so far (the next one gets this position); ``pending``: tokens chosen
    but not yet fed (the last answer's EOS or last token); ``text_logits``: ``[n, V]`` float32
    text-head logits after each token of the last prefill (its last token only) or extend.

    A context is used once: ``extend`` and ``sample`` update its cache in place (the decode step
    donates the buffers, so a long cache is never copied) and return the next context; passing
    the old one again is a ValueError. :meth:`Sampler.fork` copies one to branch a conversation.
    """

    state: Any
    length: int
    pending: tuple[int, ...]
    text_logits: np.ndarray
    used: list = dataclasses.field(default_factory=lambda: [False], repr=False, compare=False)

    def take(self) -> None:
        """Mark this context consumed; ValueError if it already was."""
        if self.used[0]:
            raise ValueError("this context was already extended or sampled from; use the one that returned "
                             "(or Sampler.fork a context to branch)")
        self.used[0] = True

    @property
    def total(self) -> int:
        """Tokens of the conversation, pending ones included."""
        return self.length + len(self.pending)


@dataclasses.dataclass(frozen=True)
class Answer:
    """What :meth:`Sampler.sample` drew: the answer's ids (EOS left out), whether it ended with EOS
    (False: cut at ``max_new_tokens``), and the conversation's context after it."""

    tokens: list[int]
    ended: bool
    context: Context


@dataclasses.dataclass(frozen=True)
class _State:
    """The sampler between steps: cache, prompt lengths, decode steps taken, logits of the last token(s)."""

    cache: Any
    lengths: np.ndarray
    steps: int
    prompt_slots: int
    text_logits: np.ndarray
    vision_logits: np.ndarray | None


@functools.lru_cache(maxsize=2)
def _sampler(ckpt_dir: str, step: int, sp: int) -> Sampler:
    return Sampler(ckpt_dir, sp=sp, step=step)


def teacher_forced_logits(ckpt_dir: str | os.PathLike, tokens: np.ndarray, prefill_len: int, *, sp: int = 1,
                          vision_mask: np.ndarray | None = None) -> np.ndarray:
    """Text-head logits ``[B, S, V]`` the sampler computes for ``tokens`` (newest step of ``ckpt_dir``):
    prefill of ``tokens[:, :prefill_len]`` over ``sp`` devices, then one token at a time through
    its cache. Equal to ``trainer.inference.predictor.logits`` on the same tokens (the sampler's test)."""
    path = os.path.abspath(os.fspath(ckpt_dir))
    return _sampler(path, checkpoint.latest_step(path), sp).teacher_forced_logits(tokens, prefill_len, vision_mask)


def frame_codes(vision_ids: Sequence[int]) -> np.ndarray:
    """Codes ``[F, 16, 16]`` of a generated vision span (F frames of 256 codes, each closed by
    ``<eof>``, the last by ``<eov>``); ValueError if the span is not laid out that way."""
    ids = np.asarray(vision_ids, np.int64)
    frames = len(ids) // FRAME_TOKENS
    markers = np.full(frames, vocab.EOF_ID)
    if frames:
        markers[-1] = vocab.EOV_ID
    spans = ids[:frames * FRAME_TOKENS].reshape(frames, FRAME_TOKENS)
    if (not frames or len(ids) % FRAME_TOKENS or not np.array_equal(spans[:, -1], markers)
            or spans[:, :-1].max() >= vocab.VISION_CODEBOOK_SIZE or spans.min() < 0):
        raise ValueError(f"not a vision span of whole frames ({len(ids)} ids; each frame is 256 codes "
                         f"then <eof> {vocab.EOF_ID}, the last <eov> {vocab.EOV_ID})")
    side = math.isqrt(vocab.TOKENS_PER_FRAME)
    return spans[:, :-1].reshape(frames, side, side).astype(np.int32)


def decode_frames(codes_Fx16x16: np.ndarray, vqgan) -> np.ndarray:
    """uint8 RGB frames ``[F, 256, 256, 3]`` of generated codes, through a ``pipelines.tokens.vqgan.VQGAN``."""
    low, high = vqgan.input_range
    frames = vqgan.decode(np.asarray(codes_Fx16x16, np.int32))
    return np.round((frames - low) / (high - low) * 255.0).clip(0, 255).astype(np.uint8)
