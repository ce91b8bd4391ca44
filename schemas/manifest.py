"""The shard manifest: what a packed dataset directory holds, written last.

A job's output directory holds shards ``{name}.array_record-{i:05d}-of-{n:05d}``,
a ``dead_letter/`` folder and ``manifest.json``. The manifest is written only after
every shard is complete, atomically (temporary name, then rename), so a directory
without one is incomplete and :func:`read` refuses it. Everything in it is a
function of the inputs and the config, except ``created_at``: same inputs and
config give a byte-identical manifest apart from that one field.

Paths in the manifest are relative to its directory, so a dataset can be moved or
copied (local disk, ``gs://``) as a whole.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

from schemas import storage

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
DEAD_LETTER_DIR = "dead_letter"
DEAD_LETTER_FILE = f"{DEAD_LETTER_DIR}/dead_letter.jsonl"  # relative to the dataset directory


@dataclasses.dataclass(frozen=True)
class ShardInfo:
    """One shard file: path relative to the dataset directory, record count, size, sha256."""

    path: str
    records: int
    bytes: int
    sha256: str


@dataclasses.dataclass(frozen=True)
class Manifest:
    """The contents of ``manifest.json``; see the module docstring."""

    job: str
    name: str
    seq_len: int
    tokenizer: dict[str, str]  # {"path": ..., "sha256": ...}
    shards: tuple[ShardInfo, ...]
    counts: dict[str, Any]  # input_examples, packed_examples, dead_letter {reason: n}, ...
    tokens: int  # non-padding tokens over all records
    pad_tokens: int
    config: dict[str, Any]
    dead_letter: tuple[str, ...] = ()  # dead-letter files, relative paths
    # Largest token id per modality over all records ({"text": n, "vision": m}; a
    # modality without tokens is absent): the loader checks them against the
    # model's vocabularies before the first step, at no per-step cost.
    max_ids: dict[str, int] = dataclasses.field(default_factory=dict)
    # Bytes of the encoded records themselves (schemas.packed), without ArrayRecord's
    # framing and block padding: the format's own cost per token, beside the shards' size.
    payload_bytes: int = 0
    format_version: int = FORMAT_VERSION
    created_at: str = ""

    @property
    def records(self) -> int:
        return sum(s.records for s in self.shards)

    @property
    def utilization(self) -> float:
        total = self.tokens + self.pad_tokens
        return self.tokens / total if total else 0.0

    def to_json(self) -> str:
        fields = dataclasses.asdict(self)
        fields["utilization"] = round(self.utilization, 6)
        fields["records"] = self.records
        return json.dumps(fields, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "Manifest":
        fields = json.loads(text)
        if fields.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"manifest format_version {fields.get('format_version')!r} is not {FORMAT_VERSION}"
            )
        fields.pop("utilization", None)
        fields.pop("records", None)
        fields["shards"] = tuple(ShardInfo(**s) for s in fields["shards"])
        fields["dead_letter"] = tuple(fields.get("dead_letter", ()))
        names = {f.name for f in dataclasses.fields(cls)}
        required = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING}
        missing = required - set(fields)
        if missing:
            raise ValueError(f"manifest lacks fields: {sorted(missing)}")
        return cls(**{k: v for k, v in fields.items() if k in names})


def shard_name(name: str, index: int, num_shards: int) -> str:
    return f"{name}.array_record-{index:05d}-of-{num_shards:05d}"


def file_sha256(path: str) -> str:
    """sha256 of a file on any filesystem (:mod:`schemas.storage`), streamed."""
    digest = hashlib.sha256()
    with storage.open(path) as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write(directory: str, manifest: Manifest) -> str:
    """Write ``manifest.json`` into ``directory`` atomically; returns its path."""
    path = storage.join(directory, MANIFEST_NAME)
    storage.write_atomically(path, manifest.to_json().encode())
    return path


def read(directory: str, *, verify_hashes: bool = True) -> Manifest:
    """Read and check a dataset's manifest.

    Refuses (``ValueError``) a directory without a manifest, a manifest of another
    format version, and a shard that is missing or whose size (and, with
    ``verify_hashes``, sha256) differs from what the manifest records.

    Cost: the sizes come from one listing of the directory, so without
    ``verify_hashes`` a read does not grow with the data (the trainer's start-up);
    ``verify_hashes`` reads every byte of every shard. Damage that keeps a shard's
    size is caught as records are read: each packed record carries a CRC-32
    (``schemas.packed``), and ArrayRecord checks its own block and chunk headers.
    """
    path = storage.join(directory, MANIFEST_NAME)
    if not storage.exists(path):
        raise ValueError(
            f"{directory}: no {MANIFEST_NAME}; the dataset is incomplete (its job did not finish) or not a dataset"
        )
    manifest = Manifest.from_json(storage.read_bytes(path).decode())
    listed = storage.sizes(directory)
    for shard in manifest.shards:
        shard_path = storage.join(directory, shard.path)
        if "/" in shard.path:  # not in the listing of the directory itself
            listed[shard.path] = storage.size(shard_path) if storage.exists(shard_path) else None
        size = listed.get(shard.path)
        if size is None:
            raise ValueError(f"{directory}: shard {shard.path} listed in the manifest is missing")
        if size != shard.bytes:
            raise ValueError(f"{directory}: shard {shard.path} has {size} bytes, the manifest says {shard.bytes}")
        if verify_hashes and file_sha256(shard_path) != shard.sha256:
            raise ValueError(f"{directory}: shard {shard.path} sha256 differs from the manifest")
    return manifest


def shard_paths(directory: str, manifest: Manifest) -> list[str]:
    """Absolute paths of a manifest's shards, in manifest order."""
    return [storage.join(directory, s.path) for s in manifest.shards]
