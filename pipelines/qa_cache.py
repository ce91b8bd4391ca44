"""The chat-QA cache: every generated pair, stored the moment it exists, so reruns pay only for changes.

A pair is keyed by what determines it: the sha256 of its chunk's text, the
generator id, the prompt version, the sampling settings, and which pair of how
many about the chunk it is (:func:`key`). A rerun with new books, another chunk
size or another generator finds exactly the pairs that still apply; a job killed
midway has lost nothing it had generated. Failures are never stored.

Layout: ``CACHE/{key[:2]}/{key}.json`` (local or any Beam filesystem, e.g. ``gs://``),
each file ``{"question", "answer", "generator", "prompt_version", "settings", ...}``
for people reading it; nothing secret goes in. A local entry appears under its
final name only once complete (temporary name, then rename); object stores make
each object appear whole anyway. An unreadable entry counts as missing.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import os
import threading
from typing import Iterable

from apache_beam.io.filesystems import FileSystems

from pipelines.qa_generators import QAGenerator, QAPair, QARequest

log = logging.getLogger(__name__)
LOOKUP_THREADS = 16  # cache reads are I/O-bound (object stores: one round trip each)


def key(request: QARequest, generator: QAGenerator) -> str:
    """The cache key of ``request`` answered by ``generator`` (hex sha256)."""
    fields = {
        "chunk_sha256": request.chunk.text_sha256,
        "generator": generator.id,
        "prompt_version": generator.prompt_version,
        "settings": generator.settings,
        "pair": [request.number, request.count],
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


class QACache:
    """Pairs under ``root`` by :func:`key`; see the module docstring."""

    def __init__(self, root: str):
        self.root = root
        self._local = FileSystems.get_scheme(root) is None

    def path(self, cache_key: str) -> str:
        return FileSystems.join(self.root, cache_key[:2], f"{cache_key}.json")

    def get(self, cache_key: str) -> QAPair | None:
        path = self.path(cache_key)
        try:
            with FileSystems.open(path) as f:
                entry = json.loads(f.read())
            return QAPair(entry["question"], entry["answer"])
        except FileNotFoundError:
            return None
        except Exception as error:  # noqa: BLE001 - missing on object stores, truncated or foreign files
            if FileSystems.exists(path):
                log.warning("ignoring unreadable QA cache entry %s: %s", path, error)
            return None

    def get_many(self, keys: Iterable[str]) -> dict[str, QAPair]:
        """The cached pairs among ``keys``, looked up in parallel."""
        keys = list(keys)
        with concurrent.futures.ThreadPoolExecutor(min(LOOKUP_THREADS, max(1, len(keys)))) as pool:
            found = dict(zip(keys, pool.map(self.get, keys)))
        return {k: pair for k, pair in found.items() if pair is not None}

    def put(self, cache_key: str, pair: QAPair, request: QARequest, generator: QAGenerator) -> None:
        entry = {
            "question": pair.question,
            "answer": pair.answer,
            "generator": generator.id,
            "prompt_version": generator.prompt_version,
            "settings": generator.settings,
            "chunk_sha256": request.chunk.text_sha256,
            "pair": [request.number, request.count],
        }
        data = json.dumps(entry, sort_keys=True, ensure_ascii=False).encode()
        path = self.path(cache_key)
        if not self._local:
            with FileSystems.create(path) as f:
                f.write(data)
            return
        os.makedirs(os.path.dirname(path), exist_ok=True)
        temporary = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}"
        with open(temporary, "wb") as f:
            f.write(data)
        os.replace(temporary, path)
