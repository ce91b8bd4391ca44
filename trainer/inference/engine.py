"""The serving engine: continuous batching over a slot-based key/value cache, with the sampler's programs.

One thread owns the device. It holds a cache of ``max_batch`` rows (slots), each
row one request's keys and values: per device of the ``sp`` ring, ``prompt_slots``
slots for a prefilled prompt, then ``ring_slots`` decode slots, written as a ring
(the sampler's decode program; decode step t writes slot t of the ring on device
t mod sp, and slot order does not matter because masks come from the cached
segment ids and positions). Its loop, until closed:

1. **Admit.** While a row is free and a request waits, the request takes the row:
   - when the prefix cache holds a finished conversation that shares the request's
     first tokens (at least as many as are left to feed), that row's entries of the
     shared prefix are gathered into the prompt slots of a row whose ring only holds
     the rest of the prompt (``sampler.MAX_CHUNK`` steps when the rest is one chunk,
     so that it attends to about half the slots of a full row); the rest goes through
     them in one forward pass (the sampler's extend program, chunks of up to
     ``sampler.MAX_CHUNK`` tokens), the row is copied in with its ring rotated so that
     the rest sits just before the ring's next step, and the first token is chosen at once;
   - otherwise the prompt is prefilled alone (the sampler's prefill program, ring
     attention over ``sp``; the same program ``Sampler.generate`` runs for one
     prompt) and its cache copied into the row; the first token is chosen at once.
2. **Step.** One decode step of the whole batch: each busy row feeds the token it chose
   last and chooses its next one from the step's logits (``sampler.choose``, with the
   request's own settings and random generator). A row ends at EOS, after
   ``max_new_tokens``, or when its stream says stop (a stop sequence; a client that
   left). A finished row is stored in the prefix cache and freed for the next request.

So a request never waits for another to finish: it joins at the next step, and
rows that are done leave at once. Greedy tokens equal ``Sampler.generate`` of the
prompt alone: the same prefill, the same choice of tokens, the same attention
(over more, invisible, slots). Sampled tokens too, for the same seed.

Capacity: a row holds ``context`` tokens (prompt + generated, the ring sized so
that a request's own entries are never overwritten); a longer request is refused
by :meth:`Engine.check_request` before it is queued.

Shape legend: L layers, B rows, T slots per row (``sp * (prompt_slots + ring_slots)``),
K key/value heads, E head dim, V text vocab, S prompt length.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import threading
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from trainer.inference import sampler as sampling
from trainer.inference.prefix_cache import PrefixCache
from trainer.sharding import activate

log = logging.getLogger(__name__)
ROW_KEYS = ("k", "v", "segment_ids", "positions")


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """``max_batch`` rows decode together; ``context`` tokens per row (None: the checkpoint's
    ``max_position_embeddings``); at most ``max_queue`` requests wait for a row; ``prefix_entries``
    finished conversations are kept for their next turn (0: no prefix cache)."""

    max_batch: int = 8
    context: int | None = None
    max_queue: int = 64
    prefix_entries: int = 16

    def __post_init__(self):
        if self.max_batch < 1 or self.max_queue < 0 or self.prefix_entries < 0:
            raise ValueError(f"need max_batch >= 1, max_queue >= 0 and prefix_entries >= 0, got {self}")


class QueueFull(Exception):
    """More requests wait for a row than ``max_queue`` allows."""


class Stream(Protocol):
    """Where a request's tokens go, called on the engine's thread."""

    def token(self, token: int) -> bool:
        """A new token; False stops the request now (a stop sequence was met, or the client left)."""

    def finish(self, reason: str, error: str | None = None) -> None:
        """The end: ``stop`` (EOS or the stream said stop), ``length``, ``cancelled`` or ``error``."""


@dataclasses.dataclass(eq=False)
class Job:
    """One request: prompt ids (BOS first) with their vision flags, how to sample, where tokens go."""

    tokens: np.ndarray
    vision_mask: np.ndarray
    settings: sampling.SampleSettings
    stream: Stream
    cancelled: bool = False  # set by any thread; the engine frees the row at its next step

    def cancel(self) -> None:
        self.cancelled = True


@dataclasses.dataclass(eq=False)
class _Row:
    job: Job
    fed: list[int]  # ids whose keys/values are in the row, in position order
    fed_mask: list[bool]
    feed: collections.deque  # (id, is vision) still to feed before choosing
    rng: np.random.Generator
    generated: int = 0


class Engine:
    """Continuous batching over ``sampler``'s checkpoint (module docstring); :meth:`submit` from any thread."""

    def __init__(self, sampler: sampling.Sampler, config: EngineConfig = EngineConfig()):
        model = sampler.config
        self.sampler, self.config = sampler, config
        self.context = config.context or model.max_position_embeddings
        if not 1 <= self.context <= model.max_position_embeddings:
            raise ValueError(f"the context must lie in [1, {model.max_position_embeddings}] (the checkpoint's "
                             f"max_position_embeddings), got {self.context}")
        sp = sampler.sp
        self.prompt_slots = sampling.prefill_length(self.context, sp, model) // sp
        self.ring_slots = -(-self.context // sp)
        self._check_memory(model, sp)
        self._sharding = {k: NamedSharding(sampler.mesh, PartitionSpec(None, *spec))
                          for k, spec in sampling._cache_specs().items()}
        self._sharding_items = tuple(self._sharding.items())  # hashable: a static argument of _compact, _place
        slots = sp * (self.prompt_slots + self.ring_slots)
        self._cache = _empty_cache(model, config.max_batch, slots, self._sharding)
        self._feed = sampling._feed_program(model, sampler.mesh, self.prompt_slots)
        self._rows: list[_Row | None] = [None] * config.max_batch
        self._waiting: collections.deque[Job] = collections.deque()
        self._step = 0  # the ring's next step (the cache's "index")
        self.prefix: PrefixCache[dict] = PrefixCache(config.prefix_entries)  # finished rows
        self.reused_tokens = 0  # prompt tokens taken from the prefix cache instead of computed
        self._cond = threading.Condition()
        self._closed = False
        self._admitting = 0
        self._thread = threading.Thread(target=self._loop, name="lwm-engine", daemon=True)
        self._thread.start()

    def _check_memory(self, model, sp: int) -> None:
        """ValueError before anything is allocated when the rows, the prefix cache's copies of rows and a prefill
        (``sampler.memory_estimate``, on the safe side) will not fit on a device."""
        item = jnp.dtype(model.dtype).itemsize
        row = model.num_layers * (self.prompt_slots + self.ring_slots) * (2 * model.num_kv_heads * model.head_dim * item + 8)
        need = (sampling.memory_estimate(model, self.config.max_batch, self.context, self.context, sp)
                + self.config.prefix_entries * row)
        device = jax.devices()[0]
        free = sampling.available_memory(device, jax.local_device_count() if device.platform == "cpu" else 1)
        if free is not None and need > free:
            raise ValueError(f"{self.config.max_batch} rows of {self.context} tokens need about {need / 2**30:.2f} GiB "
                             f"per device at sp={sp}, but {free / 2**30:.2f} GiB are free; lower --max-batch, "
                             "--max-context or --prefix-cache, or raise --sp")

    # -- public API

    def check_request(self, prompt_len: int, max_new_tokens: int) -> None:
        """ValueError naming both numbers when a request does not fit a row."""
        total = prompt_len + max_new_tokens
        if total > self.context:
            raise ValueError(f"this model's context is {self.context} tokens, but the request needs {total} "
                             f"({prompt_len} in the prompt + {max_new_tokens} max_tokens); shorten the prompt "
                             "or max_tokens")

    def submit(self, job: Job) -> Job:
        """Queues ``job``; QueueFull when ``max_queue`` requests already wait, ValueError when it does not fit."""
        self.check_request(len(job.tokens), job.settings.max_new_tokens)
        with self._cond:
            if self._closed:
                raise RuntimeError("the engine is closed")
            free = self._rows.count(None) - self._admitting
            if len(self._waiting) - free >= self.config.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are waiting (--max-queue {self.config.max_queue})")
            self._waiting.append(job)
            self._cond.notify()
        return job

    def busy(self) -> int:
        """Requests waiting or decoding."""
        with self._cond:
            return len(self._waiting) + sum(r is not None for r in self._rows) + self._admitting

    def close(self, timeout_s: float = 30.0) -> None:
        """Stops the loop after its current step; requests still there end ``cancelled``."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout_s)

    # -- the loop

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not self._waiting and not any(self._rows):
                    self._cond.wait()
                if self._closed:
                    break
                admitted = []
                for b, row in enumerate(self._rows):
                    while row is None and self._waiting:
                        job = self._waiting.popleft()
                        if not job.cancelled:
                            admitted.append((b, job))
                            break
                        job.stream.finish("cancelled")
                    if not self._waiting:
                        break
                self._admitting = len(admitted)  # rows taken, though still None until their prompts are in
            try:
                for b, job in admitted:
                    self._admit(b, job)
                with self._cond:
                    self._admitting = 0
                self._drop_cancelled()
                if any(row is not None and row.feed for row in self._rows):
                    self._step_batch()
            except Exception as error:  # a failed step ends the requests in it, not the server
                log.exception("engine step failed")
                for b, row in enumerate(self._rows):
                    if row is not None:
                        self._rows[b] = None
                        row.job.stream.finish("error", f"{type(error).__name__}: {error}")
        with self._cond:
            leftover = [row.job for row in self._rows if row is not None] + list(self._waiting)
            self._rows = [None] * len(self._rows)
            self._waiting.clear()
        for job in leftover:
            job.stream.finish("cancelled")

    def _admit(self, b: int, job: Job) -> None:
        try:
            if not self._restore(b, job):
                self._prefill(b, job)
        except Exception as error:
            log.exception("admitting a request failed")
            self._rows[b] = None
            job.stream.finish("error", f"{type(error).__name__}: {error}")

    def _new_row(self, job: Job) -> _Row:
        return _Row(job, job.tokens.tolist(), job.vision_mask.tolist(), collections.deque(),
                    np.random.default_rng(job.settings.seed))

    def _restore(self, b: int, job: Job) -> bool:
        """Takes the longest cached prefix of ``job``'s prompt and feeds the rest through it; False if none
        is at least as long as the rest."""
        found = self.prefix.longest(job.tokens, job.vision_mask)
        if found is None:
            return False
        entry, shared = found
        keep = min(shared, len(job.tokens) - 1)  # at least one token left to feed: its logits choose
        rest = len(job.tokens) - keep
        if keep < rest:  # a short shared prefix (a BOS, a system prompt) saves little: prefill it all
            return False
        sp = self.sampler.sp
        ring_slots = self.ring_slots
        if rest <= sampling.MAX_CHUNK:
            ring_slots = min(ring_slots, -(-sampling.MAX_CHUNK // sp))
        row = _compact(entry.value, jnp.int32(keep), sp=sp, prompt_slots=self.prompt_slots, ring_slots=ring_slots,
                       sharding=self._sharding_items)
        state = sampling._State(row, np.array([keep]), 0, self.prompt_slots, None, None)
        for at in range(keep, len(job.tokens), sampling.MAX_CHUNK):
            end = min(at + sampling.MAX_CHUNK, len(job.tokens))
            state = self.sampler._feed(state, job.tokens[None, at:end], job.vision_mask[None, at:end])
        shift = (self._step - rest) % (sp * self.ring_slots)  # the rest took ring steps 0 .. rest - 1
        self._cache = _place(self._cache, state.cache, jnp.int32(b), jnp.int32(shift), sp=sp,
                             row_prompt_slots=self.prompt_slots, prompt_slots=self.prompt_slots,
                             ring_slots=self.ring_slots, sharding=self._sharding_items)
        self._rows[b] = self._new_row(job)
        self.reused_tokens += keep
        self._choose(b, state.text_logits[0, -1])
        return True

    def _prefill(self, b: int, job: Job) -> None:
        n = len(job.tokens)
        state = self.sampler._prefill(job.tokens[None], job.vision_mask[None], np.array([n]), 1)
        self._cache = _place(self._cache, state.cache, jnp.int32(b), jnp.int32(0), sp=self.sampler.sp,
                             row_prompt_slots=state.prompt_slots, prompt_slots=self.prompt_slots,
                             ring_slots=self.ring_slots, sharding=self._sharding_items)
        self._rows[b] = self._new_row(job)
        self._choose(b, state.text_logits[0, -1])

    def _step_batch(self) -> None:
        batch = len(self._rows)
        token_B, vision_B, position_B = np.zeros(batch, np.int32), np.zeros(batch, bool), np.zeros(batch, np.int32)
        stepped = []
        for b, row in enumerate(self._rows):
            if row is not None and row.feed:
                token_B[b], vision_B[b] = row.feed.popleft()
                position_B[b] = len(row.fed)
                row.fed.append(int(token_B[b]))
                row.fed_mask.append(bool(vision_B[b]))
                stepped.append(b)
        replicated = NamedSharding(self.sampler.mesh, PartitionSpec())
        args = [jax.device_put(x[:, None], replicated) for x in (token_B, vision_B, np.ones(batch, np.int32), position_B)]
        with activate(self.sampler.mesh):
            text, _, self._cache = self._feed(self.sampler.params, self._cache, *args)
        self._step += 1
        logits_BxV = np.asarray(text)[:, -1]
        for b in stepped:
            if self._rows[b] is not None and not self._rows[b].feed:
                self._choose(b, logits_BxV[b])

    def _choose(self, b: int, logits_V: np.ndarray) -> None:
        row = self._rows[b]
        settings = row.job.settings
        token = int(sampling.choose(logits_V[None], settings, row.rng)[0])
        if settings.eos_id is not None and token == settings.eos_id:
            return self._finish(b, "stop")
        row.generated += 1
        if not row.job.stream.token(token) or row.job.cancelled:
            return self._finish(b, "cancelled" if row.job.cancelled else "stop")
        if row.generated >= settings.max_new_tokens:
            return self._finish(b, "length")
        row.feed.append((token, False))

    def _finish(self, b: int, reason: str) -> None:
        row = self._rows[b]
        self._rows[b] = None
        if self.prefix.capacity and reason != "cancelled":
            self.prefix.put(row.fed, row.fed_mask, _take_row(self._cache, jnp.int32(b)))
        row.job.stream.finish(reason)

    def _drop_cancelled(self) -> None:
        for b, row in enumerate(self._rows):
            if row is not None and row.job.cancelled:
                self._rows[b] = None
                row.job.stream.finish("cancelled")


# ----------------------------------------------------------------------------- cache rows (jitted)


def _empty_cache(config, batch: int, slots: int, sharding) -> dict:
    kv = (config.num_layers, batch, slots, config.num_kv_heads, config.head_dim)
    tokens = (config.num_layers, batch, slots)

    def empty():
        dtype = jnp.dtype(config.dtype)
        return {"k": jnp.zeros(kv, dtype), "v": jnp.zeros(kv, dtype), "segment_ids": jnp.zeros(tokens, jnp.int32),
                "positions": jnp.zeros(tokens, jnp.int32), "index": jnp.zeros((config.num_layers,), jnp.int32)}

    return jax.jit(empty, out_shardings=sharding)()


@jax.jit
def _take_row(cache: dict, b) -> dict:
    return {name: jax.lax.dynamic_slice_in_dim(cache[name], b, 1, axis=1) for name in ROW_KEYS}


@functools.partial(jax.jit, static_argnames=("sp", "prompt_slots", "ring_slots", "sharding"))
def _compact(row: dict, keep, *, sp: int, prompt_slots: int, ring_slots: int, sharding) -> dict:
    """A row ``[L, 1, sp * (prompt_slots + ring_slots)]`` holding the entries of ``row`` (a stored row) at
    positions < ``keep`` in its prompt slots (in slot order: masks come from segment ids and positions, so
    order does not matter), the other slots empty (segment 0), at ring step 0."""
    kept = (row["segment_ids"] > 0) & (row["positions"] < keep)
    slots = kept.shape[2]  # the index after the kept ones: out of range, so the gather fills in zeros
    order = jax.vmap(jax.vmap(lambda k: jnp.nonzero(k, size=sp * prompt_slots, fill_value=slots)[0]))(kept)
    out = {}
    for name in ROW_KEYS:
        x = row[name]
        layers, _, _, *rest = x.shape
        x = jnp.take_along_axis(x, order.reshape(order.shape + (1,) * len(rest)), axis=2, mode="fill", fill_value=0)
        x = _padded(x.reshape(layers, 1, sp, prompt_slots, *rest), prompt_slots + ring_slots)
        out[name] = x.reshape(layers, 1, sp * (prompt_slots + ring_slots), *rest)
    out["index"] = jnp.zeros(row["positions"].shape[:1], jnp.int32)
    return jax.lax.with_sharding_constraint(out, dict(sharding))


@functools.partial(jax.jit, static_argnames=("sp", "row_prompt_slots", "prompt_slots", "ring_slots", "sharding"),
                   donate_argnums=0)
def _place(cache: dict, row: dict, b, shift, *, sp: int, row_prompt_slots: int, prompt_slots: int, ring_slots: int,
           sharding) -> dict:
    """``cache`` with row ``b`` replaced by ``row`` (``row_prompt_slots`` prompt slots per device, then a ring)
    at the engine's ``prompt_slots`` and ``ring_slots`` per device (empty slots added; a prefill's decode slots,
    empty, cut when more) and its ring rotated by ``shift`` steps (step t on device t mod sp, ring slot t // sp)."""
    out = dict(cache)
    for name in ROW_KEYS:
        x = row[name]
        layers, _, total, *rest = x.shape
        x = x.reshape(layers, 1, sp, total // sp, *rest)
        prompt = _padded(x[:, :, :, :row_prompt_slots], prompt_slots)
        ring = _padded(x[:, :, :, row_prompt_slots:row_prompt_slots + ring_slots], ring_slots)
        ring_steps = jnp.roll(jnp.swapaxes(ring, 2, 3).reshape(layers, 1, -1, *rest), shift, axis=2)
        ring = jnp.swapaxes(ring_steps.reshape(layers, 1, ring_slots, sp, *rest), 2, 3)
        x = jnp.concatenate([prompt, ring], axis=3).reshape(layers, 1, sp * (prompt_slots + ring_slots), *rest)
        out[name] = jax.lax.dynamic_update_slice_in_dim(cache[name], x.astype(cache[name].dtype), b, axis=1)
    return jax.lax.with_sharding_constraint(out, dict(sharding))


def _padded(x, slots: int):
    """``x`` ``[L, 1, sp, n, ...]`` with empty slots (zeros: segment 0) after each device's n, up to ``slots``."""
    pad = [(0, 0)] * x.ndim
    pad[3] = (0, slots - x.shape[3])
    return jnp.pad(x, pad)
