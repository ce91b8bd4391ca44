"""Raw book inputs: three formats, metadata kept, every bad record a dead letter with its reason."""

import io

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from schemas import raw


def _records(data: bytes, path: str):
    return list(raw.iter_documents(io.BytesIO(data), path))


def test_json_lines_keep_extra_fields_as_metadata():
    (document,) = _records(b'{"id": 7, "text": "hello", "lang": "en"}\n\n', "a.jsonl")
    assert (document.id, document.text, document.metadata, document.source) == ("7", "hello", (("lang", "en"),), "a.jsonl:1")


@pytest.mark.parametrize(
    "line, reason",
    [
        (b"{not json", "invalid_json"),
        (b"\xff\xfe{}", "invalid_utf8"),
        (b"[1, 2]", "not_an_object"),
        (b'{"text": "x"}', "missing_id"),
        (b'{"id": " ", "text": "x"}', "missing_id"),
        (b'{"id": "a"}', "missing_text"),
        (b'{"id": "a", "text": 5}', "missing_text"),
        (b'{"id": "a", "text": "  \\n"}', "empty_text"),
    ],
)
def test_bad_json_lines_become_dead_letters(line, reason):
    (letter,) = _records(line + b"\n", "bad.jsonl")
    assert isinstance(letter, raw.DeadLetter) and letter.reason == reason and letter.source == "bad.jsonl:1"


def test_parquet_rows_are_documents(tmp_path):
    table = pa.table({"id": ["a", "b"], "text": ["one", ""], "year": [1900, 1901]})
    pq.write_table(table, tmp_path / "x.parquet")
    first, second = _records((tmp_path / "x.parquet").read_bytes(), "x.parquet")
    assert first.id == "a" and first.metadata == (("year", 1900),)
    assert second.reason == "empty_text"


def test_parquet_without_the_book_columns_is_a_dead_letter(tmp_path):
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "y.parquet")
    (letter,) = _records((tmp_path / "y.parquet").read_bytes(), "y.parquet")
    assert letter.reason == "unsupported_format"


def test_text_files_are_one_book_named_after_the_file():
    (document,) = _records("Call me Ishmael.".encode(), "/data/moby.txt")
    assert (document.id, document.text) == ("moby.txt", "Call me Ishmael.")
    (letter,) = _records(b"\xc3\x28", "/data/bad.txt")
    assert letter.reason == "invalid_utf8"


def test_formats_are_told_by_extension():
    assert [raw.input_format(p) for p in ("a.jsonl.gz", "b.JSON", "c.parquet", "d.txt", "e.csv")] == [
        "jsonl", "jsonl", "parquet", "txt", None,
    ]


def test_book_schema_matches_the_documented_columns():
    assert raw.BOOK_SCHEMA.names == ["id", "text"]
