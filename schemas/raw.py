"""Raw book inputs and the dead-letter record.

Books arrive in three forms, told apart by file extension (``.gz`` allowed on top):

* JSON lines (``.jsonl``, ``.json``): one object per line, ``{"id": str, "text": str, ...}``;
  extra fields are kept as metadata.
* Parquet (``.parquet``): columns as :data:`BOOK_SCHEMA`, extra columns kept as metadata.
* Plain text (``.txt``): the whole file is one book, its id the file name.

Parsing is pure (bytes in, :class:`Document` or :class:`DeadLetter` out), so the
Beam reader, the tokenizer trainer and tests share it. Bad input never raises: it
becomes a dead letter with a reason from :data:`REASONS`.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import posixpath
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

BOOK_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("text", pa.string(), nullable=False),
    ]
)

REASONS = (
    "unreadable_file",
    "unsupported_format",
    "invalid_utf8",
    "invalid_json",
    "not_an_object",
    "missing_id",
    "missing_text",
    "empty_text",
    "duplicate_id",
)


@dataclasses.dataclass(frozen=True)
class Document:
    """One raw input example, with where it came from (file path, 1-based line or row; 0 = whole file)."""

    id: str
    text: str
    path: str
    index: int = 0
    metadata: tuple[tuple[str, Any], ...] = ()

    @property
    def source(self) -> str:
        return f"{self.path}:{self.index}" if self.index else self.path


@dataclasses.dataclass(frozen=True)
class DeadLetter:
    """An input that could not be used, with a reason from :data:`REASONS` (or a pipeline's own)."""

    id: str
    reason: str
    detail: str
    source: str = ""

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True, ensure_ascii=False)


def input_format(path: str) -> str | None:
    """``"jsonl"``, ``"parquet"``, ``"txt"`` or None, from the file name."""
    name = posixpath.basename(path).lower()
    if name.endswith(".gz"):
        name = name[: -len(".gz")]
    for suffix, kind in ((".jsonl", "jsonl"), (".json", "jsonl"), (".parquet", "parquet"), (".txt", "txt")):
        if name.endswith(suffix):
            return kind
    return None


def _from_fields(fields: Any, path: str, index: int) -> Document | DeadLetter:
    source = f"{path}:{index}" if index else path
    if not isinstance(fields, dict):
        return DeadLetter("", "not_an_object", f"expected a JSON object, got {type(fields).__name__}", source)
    doc_id = fields.get("id")
    if doc_id is None or (isinstance(doc_id, str) and not doc_id.strip()):
        return DeadLetter("", "missing_id", "no non-empty 'id' field", source)
    doc_id = str(doc_id)
    text = fields.get("text")
    if text is None:
        return DeadLetter(doc_id, "missing_text", "no 'text' field", source)
    if not isinstance(text, str):
        return DeadLetter(doc_id, "missing_text", f"'text' is a {type(text).__name__}, not a string", source)
    if not text.strip():
        return DeadLetter(doc_id, "empty_text", "'text' is empty or whitespace", source)
    metadata = tuple(sorted((k, v) for k, v in fields.items() if k not in ("id", "text")))
    return Document(doc_id, text, path, index, metadata)


def parse_json_line(line: bytes, path: str, index: int) -> Document | DeadLetter:
    """One JSON-lines record, line ``index`` of ``path``."""
    source = f"{path}:{index}"
    try:
        decoded = line.decode("utf-8")
    except UnicodeDecodeError as error:
        return DeadLetter("", "invalid_utf8", str(error), source)
    try:
        fields = json.loads(decoded)
    except json.JSONDecodeError as error:
        return DeadLetter("", "invalid_json", str(error), source)
    return _from_fields(fields, path, index)


def parse_text_file(data: bytes, path: str) -> Document | DeadLetter:
    """A whole ``.txt`` file as one book, id = file name."""
    doc_id = posixpath.basename(path)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        return DeadLetter(doc_id, "invalid_utf8", str(error), path)
    return _from_fields({"id": doc_id, "text": text}, path, 0)


def iter_json_lines(stream, path: str) -> Iterator[Document | DeadLetter]:
    """Records of a JSON-lines stream (binary); blank lines are skipped."""
    for number, line in enumerate(iter(stream.readline, b""), start=1):  # Beam's gzip streams only readline
        if line.strip():
            yield parse_json_line(line, path, number)


def iter_parquet_rows(stream, path: str, required: tuple[str, ...], batch_size: int = 256):
    """(1-based row, fields dict) of a Parquet file in record batches, or one ``unsupported_format``
    dead letter if it lacks a ``required`` column."""
    table = pq.ParquetFile(stream)
    names = table.schema_arrow.names
    if not set(required) <= set(names):
        yield DeadLetter("", "unsupported_format", f"parquet columns {names} lack {' and '.join(map(repr, required))}", path)
        return
    row = 0
    for batch in table.iter_batches(batch_size=batch_size):
        for fields in batch.to_pylist():
            row += 1
            yield row, fields


def iter_parquet(stream, path: str) -> Iterator[Document | DeadLetter]:
    """Rows of a Parquet book file."""
    for item in iter_parquet_rows(stream, path, ("id", "text")):
        yield item if isinstance(item, DeadLetter) else _from_fields(item[1], path, item[0])


def iter_documents(stream, path: str) -> Iterator[Document | DeadLetter]:
    """Every record of one input file (raw binary stream, still compressed if ``.gz``), whatever its format.

    Decompression happens here with Python's gzip so that a corrupt or truncated
    archive raises (the caller dead-letters the file) instead of reading as empty.
    """
    if path.lower().endswith(".gz"):
        stream = gzip.GzipFile(fileobj=stream, mode="rb")
    kind = input_format(path)
    if kind is None:
        yield DeadLetter("", "unsupported_format", "expected .jsonl, .json, .parquet or .txt (optionally .gz)", path)
    elif kind == "txt":
        yield parse_text_file(stream.read(), path)
    elif kind == "parquet":
        yield from iter_parquet(stream, path)
    else:
        yield from iter_json_lines(stream, path)
