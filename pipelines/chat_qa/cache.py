"""The chat-QA cache: every generated pair, stored the moment it exists, so reruns pay only for changes.

A pair is keyed by what determines it: the sha256 of its chunk's text, the
generator id, the prompt version, the sampling settings, and which pair of how
many about the chunk it is (:func:`key`). A rerun with new books, another chunk
size or another generator finds exactly the pairs that still apply; a job killed
midway has lost nothing it had generated. Failures are never stored.

Layout: ``CACHE/{key[:2]}/{key}.json`` (local, ``gs://`` or any :mod:`schemas.storage` path),
each file ``{"question", "answer", "generator", "prompt_version", "settings", ...}``
for people reading it; nothing secret goes in. Entries are written atomically
(:func:`schemas.storage.write_atomically`); an unreadable one counts as missing.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
from typing import Iterable

from pipelines.chat_qa.generators.interface import Identity, QAPair, QARequest
from schemas import storage

log = logging.getLogger(__name__)
LOOKUP_THREADS = 16  # cache reads are I/O-bound (object stores: one round trip each)


def key(request: QARequest, identity: Identity) -> str:
    """The cache key of ``request`` answered by the generator of ``identity`` (hex sha256)."""
    fields = {
        "chunk_sha256": request.chunk.text_sha256,
        "generator": identity.id,
        "prompt_version": identity.prompt_version,
        "settings": dict(identity.settings),
        "pair": [request.number, request.count],
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


class QACache:
    """Pairs under ``root`` by :func:`key`; see the module docstring."""

    def __init__(self, root: str):
        self.root = root

    def path(self, cache_key: str) -> str:
        return storage.join(self.root, cache_key[:2], f"{cache_key}.json")

    def get(self, cache_key: str) -> QAPair | None:
        path = self.path(cache_key)
        try:
            entry = json.loads(storage.read_bytes(path))
            return QAPair(entry["question"], entry["answer"])
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as error:  # truncated or foreign files
            log.warning("ignoring unreadable QA cache entry %s: %s", path, error)
            return None

    def get_many(self, keys: Iterable[str]) -> dict[str, QAPair]:
        """The cached pairs among ``keys``, looked up in parallel."""
        keys = list(keys)
        if not keys:
            return {}
        with concurrent.futures.ThreadPoolExecutor(min(LOOKUP_THREADS, len(keys))) as pool:
            found = dict(zip(keys, pool.map(self.get, keys)))
        return {k: pair for k, pair in found.items() if pair is not None}

    def put(self, cache_key: str, pair: QAPair, request: QARequest, identity: Identity) -> None:
        """Store one pair now (atomically: a reader sees the whole entry or none)."""
        entry = {
            "question": pair.question,
            "answer": pair.answer,
            "generator": identity.id,
            "prompt_version": identity.prompt_version,
            "settings": dict(identity.settings),
            "chunk_sha256": request.chunk.text_sha256,
            "pair": [request.number, request.count],
        }
        storage.write_atomically(self.path(cache_key), json.dumps(entry, sort_keys=True, ensure_ascii=False).encode())
