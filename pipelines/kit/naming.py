"""Stable hashing and the names a data job gives what it writes; pure (no Beam, no ArrayRecord).

Every path a job writes is built here or in :mod:`schemas.manifest` (shard names,
``manifest.json``, the dead-letter file), each in exactly one place, so the job, its
checks and the inspector cannot disagree about where a dataset lives.
"""

from __future__ import annotations

import hashlib

from schemas import storage

# Beam metrics namespace of every data job's counters.
METRICS_NAMESPACE = "lwm"
STAGING_NAME = ".staging"


def stable_hash(text: str) -> int:
    """A hash that is the same in every process and run (Python's ``hash`` is salted)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def bucket_dir(output: str, bucket_name: str) -> str:
    """A bucket's dataset directory: ``OUTPUT/seq{L}`` (``bucket_name`` is :attr:`Bucket.name`)."""
    return storage.join(output, bucket_name)


def staging_dir(output: str) -> str:
    """Where ``--overwrite`` builds the new datasets, beside the old ones: ``OUTPUT/.staging/seq{L}``."""
    return storage.join(output, STAGING_NAME)
