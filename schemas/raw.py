"""Raw book inputs and the dead-letter record.

Books arrive in three forms, told apart by file extension (``.gz`` allowed on top):

* JSON lines (``.jsonl``, ``.json``): one object per line, ``{"id": str, "text": str, ...}``;
  extra fields are kept as metadata.
* Parquet (``.parquet``): columns as :data:`BOOK_SCHEMA`, extra columns kept as metadata.
* Plain text (``.txt``): the whole file is one book, its id the file name.

Text is UTF-8, with or without a byte-order mark. Parsing is pure (bytes in,
:class:`Document` or :class:`DeadLetter` out), so the Beam reader, the tokenizer
trainer and tests share it. Bad input never raises: it becomes a dead letter with a
reason from :data:`REASONS`; a file damaged part way (a truncated ``.gz``) keeps the
records before the damage and ends with an ``unreadable_file`` dead letter saying how
many there were. The format handling (:func:`iter_records`, :func:`id_and_text`)
serves the vision inputs too.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import posixpath
import zlib
from typing import Any, Callable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

BOOK_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("text", pa.string(), nullable=False),
    ]
)

# Why a file or record of any data job is rejected; each job adds its own field's reasons.
COMMON_REASONS = (
    "unreadable_file",
    "unsupported_format",
    "invalid_utf8",
    "invalid_json",
    "not_an_object",
    "missing_id",
    "duplicate_id",
)
REASONS = COMMON_REASONS + ("missing_text", "empty_text")


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


def source_of(path: str, index: int) -> str:
    """``path:index`` for a line or row, the bare path for a whole file (index 0)."""
    return f"{path}:{index}" if index else path


def _absent(fields: dict, name: str) -> str:
    return f"'{name}' is null" if name in fields else f"no '{name}' field"


def id_and_text(fields: Any, field: str, source: str) -> tuple[str, str] | DeadLetter:
    """A record's id and its non-empty string ``field`` (``text``, ``caption``), or why not.

    Reasons: ``not_an_object``, ``missing_id``, ``missing_{field}`` (absent, null or
    not a string; the detail says which), ``empty_{field}``.
    """
    if not isinstance(fields, dict):
        return DeadLetter("", "not_an_object", f"expected a JSON object, got {type(fields).__name__}", source)
    record_id = fields.get("id")
    if record_id is None:
        return DeadLetter("", "missing_id", _absent(fields, "id"), source)
    if isinstance(record_id, str) and not record_id.strip():
        return DeadLetter("", "missing_id", "'id' is empty or whitespace", source)
    record_id = str(record_id)
    value = fields.get(field)
    if not isinstance(value, str):
        found = _absent(fields, field) if value is None else f"'{field}' is a {type(value).__name__}, not a string"
        return DeadLetter(record_id, f"missing_{field}", found, source)
    if not value.strip():
        return DeadLetter(record_id, f"empty_{field}", f"'{field}' is empty or whitespace", source)
    return record_id, value


def book_from_fields(fields: Any, path: str, index: int) -> Document | DeadLetter:
    """One book record (a JSON object or a Parquet row as a dict)."""
    checked = id_and_text(fields, "text", source_of(path, index))
    if isinstance(checked, DeadLetter):
        return checked
    metadata = tuple(sorted((k, v) for k, v in fields.items() if k not in ("id", "text")))
    return Document(*checked, path, index, metadata)


def decode_json_line(line: bytes, source: str) -> Any:
    """The JSON value of one line (a leading byte-order mark is dropped), or an ``invalid_utf8`` /
    ``invalid_json`` dead letter."""
    try:
        return json.loads(line.decode("utf-8-sig"))
    except UnicodeDecodeError as error:
        return DeadLetter("", "invalid_utf8", str(error), source)
    except json.JSONDecodeError as error:
        return DeadLetter("", "invalid_json", str(error), source)


def parse_text_file(data: bytes, path: str) -> Document | DeadLetter:
    """A whole ``.txt`` file as one book, id = file name (a leading byte-order mark is dropped)."""
    doc_id = posixpath.basename(path)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        return DeadLetter(doc_id, "invalid_utf8", str(error), path)
    return book_from_fields({"id": doc_id, "text": text}, path, 0)


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


RecordParser = Callable[..., Any]  # (fields, *, path, index) → record or DeadLetter

# What a file damaged part way raises while it is read: gzip and zlib for archives, Arrow for
# Parquet, OSError for the filesystem.
_READ_ERRORS = (OSError, EOFError, zlib.error, pa.ArrowException)


def iter_records(
    stream,
    path: str,
    from_fields: RecordParser,
    required: tuple[str, ...],
    *,
    text_file: Callable[[bytes, str], Any] | None = None,
    parquet_batch: int = 256,
    first_line: int = 1,
) -> Iterator[Any]:
    """Every record of one input file (raw binary stream, still compressed if ``.gz``), whatever its format.

    ``first_line``: the line number of the stream's first line, where the stream is a
    range of a JSON-lines file that starts at a line (see :mod:`pipelines.kit.sources`).

    JSON lines and Parquet rows go through ``from_fields``; ``.txt`` files through
    ``text_file`` where the job reads them. Decompression happens here with Python's
    gzip so that a corrupt or truncated archive is noticed instead of reading as
    empty: the records before the damage are yielded, then an ``unreadable_file``
    dead letter that says how many they were.
    """
    read = 0
    try:
        for record in _parse_records(stream, path, from_fields, required, text_file, parquet_batch, first_line):
            read += 1
            yield record
    except _READ_ERRORS as error:
        kept = f"the {read} record(s) before the damage are kept" if read else "no record could be read"
        yield DeadLetter("", "unreadable_file", f"{type(error).__name__}: {error}; {kept}", path)


def _parse_records(stream, path: str, from_fields: RecordParser, required: tuple[str, ...],
                   text_file: Callable[[bytes, str], Any] | None, parquet_batch: int, first_line: int) -> Iterator[Any]:
    if path.lower().endswith(".gz"):
        stream = gzip.GzipFile(fileobj=stream, mode="rb")
    kind = input_format(path)
    if kind == "jsonl":
        for number, line in enumerate(iter(stream.readline, b""), start=first_line):  # Beam's gzip streams only readline
            if line.strip():
                fields = decode_json_line(line, source_of(path, number))
                yield fields if isinstance(fields, DeadLetter) else from_fields(fields, path=path, index=number)
    elif kind == "parquet":
        for item in iter_parquet_rows(stream, path, required, parquet_batch):
            yield item if isinstance(item, DeadLetter) else from_fields(item[1], path=path, index=item[0])
    elif kind == "txt" and text_file is not None:
        yield text_file(stream.read(), path)
    else:
        accepted = ".jsonl, .json, .parquet" + (" or .txt" if text_file else "")
        yield DeadLetter("", "unsupported_format", f"expected {accepted} (optionally .gz)", path)


def iter_documents(stream, path: str, first_line: int = 1) -> Iterator[Document | DeadLetter]:
    """Every book of one input file, or of a range of lines of one (see :func:`iter_records`)."""
    return iter_records(stream, path, book_from_fields, ("id", "text"), text_file=parse_text_file,
                        first_line=first_line)

