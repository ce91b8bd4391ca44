"""Length buckets: which packed datasets a document of n tokens goes to.

A bucket is a sequence length L and a document-length range ``[min_tokens, max_tokens)``
(``max_tokens`` None = no upper bound). One job writes one dataset per bucket,
``DIR/seq{L}/``; a document goes to every bucket whose range holds its token count.

Spec syntax (``--buckets``): comma-separated ``L[:MIN-[MAX]]``, e.g.
``32768:10000-100000,131072:100000-200000``; ``1048576:1000000-`` has no upper bound
and a bare ``L`` accepts every length. Named presets (``--buckets lwm-text``) are in
:data:`PRESETS`.
"""

from __future__ import annotations

import dataclasses
import enum


class Count(str, enum.Enum):
    """What a job counts per bucket while routing examples (the manifest's ``counts``)."""

    DOCUMENTS = "documents"  # examples that went into the bucket
    SEGMENTS = "segments"  # their pieces (a text document longer than L is cut into several)
    TOO_SHORT = "too_short"  # examples under the bucket's length range
    TOO_LONG = "too_long"  # examples at or over it


@dataclasses.dataclass(frozen=True, order=True)
class Bucket:
    seq_len: int
    min_tokens: int = 0
    max_tokens: int | None = None

    def __post_init__(self):
        if self.seq_len <= 0:
            raise ValueError(f"bucket sequence length must be positive, got {self.seq_len}")
        if self.min_tokens < 0 or (self.max_tokens is not None and self.max_tokens <= self.min_tokens):
            raise ValueError(f"bucket range [{self.min_tokens}, {self.max_tokens}) is empty or negative")

    @property
    def name(self) -> str:
        return f"seq{self.seq_len}"

    def outside(self, num_tokens: int) -> Count | None:
        """None if a document of ``num_tokens`` tokens belongs in this bucket, else why not
        (:attr:`Count.TOO_SHORT` or :attr:`Count.TOO_LONG`)."""
        if num_tokens < self.min_tokens:
            return Count.TOO_SHORT
        if self.max_tokens is not None and num_tokens >= self.max_tokens:
            return Count.TOO_LONG
        return None

    def spec(self) -> str:
        if self.min_tokens == 0 and self.max_tokens is None:
            return str(self.seq_len)
        return f"{self.seq_len}:{self.min_tokens}-{'' if self.max_tokens is None else self.max_tokens}"


# The paper's text stages and their document-length filters (docs/LWM.md, "Training recipe").
PRESETS: dict[str, tuple[Bucket, ...]] = {
    "lwm-text": (
        Bucket(2**15, 10_000, 100_000),
        Bucket(2**17, 100_000, 200_000),
        Bucket(2**18, 200_000, 500_000),
        Bucket(2**19, 500_000, 1_000_000),
        Bucket(2**20, 1_000_000, None),
    ),
}


def _parse_one(item: str) -> Bucket:
    seq_len, _, length_range = item.partition(":")
    try:
        if not length_range:
            return Bucket(int(seq_len))
        low, dash, high = length_range.partition("-")
        if not dash:
            raise ValueError("range needs a '-'")
        return Bucket(int(seq_len), int(low) if low else 0, int(high) if high else None)
    except ValueError as error:
        raise ValueError(f"bad bucket {item!r} ({error}); expected L or L:MIN-MAX, e.g. 32768:10000-100000") from None


def parse(spec: str) -> tuple[Bucket, ...]:
    """Buckets from a spec string or a preset name; sequence lengths must be distinct."""
    spec = spec.strip()
    buckets = PRESETS.get(spec) or tuple(_parse_one(item.strip()) for item in spec.split(",") if item.strip())
    if not buckets:
        raise ValueError("no buckets given")
    lengths = [b.seq_len for b in buckets]
    if len(set(lengths)) != len(lengths):
        raise ValueError(f"bucket sequence lengths must be distinct (each is its own dataset), got {lengths}")
    return tuple(sorted(buckets))
