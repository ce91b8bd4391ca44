"""Raw book inputs: three formats, metadata kept, every bad record a dead letter with its reason."""

import gzip
import io
import json

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


@pytest.mark.parametrize(
    "line, detail",
    [
        (b'{"id": "a", "text": null}', "'text' is null"),
        (b'{"id": "a"}', "no 'text' field"),
        (b'{"id": "a", "text": ["x"]}', "'text' is a list, not a string"),
        (b'{"id": null, "text": "x"}', "'id' is null"),
        (b'{"text": "x"}', "no 'id' field"),
        (b'{"id": "", "text": "x"}', "'id' is empty or whitespace"),
    ],
)
def test_dead_letters_say_whether_a_field_is_absent_null_or_wrong(line, detail):
    (letter,) = _records(line + b"\n", "bad.jsonl")
    assert letter.detail == detail


def test_a_byte_order_mark_is_accepted_in_json_lines_and_text():
    first, second = _records(b'\xef\xbb\xbf{"id": "a", "text": "one"}\n{"id": "b", "text": "two"}\n', "bom.jsonl")
    assert (first.id, first.text, second.id) == ("a", "one", "b")
    (book,) = _records("\ufeffCall me Ishmael.".encode(), "bom.txt")
    assert book.text == "Call me Ishmael."


def _gzip_books(count: int) -> bytes:
    return gzip.compress(b"".join(json.dumps({"id": str(i), "text": f"book {i} " * 40}).encode() + b"\n"
                                  for i in range(count)), mtime=0)


@pytest.mark.parametrize("cut", [0.3, 0.6, 0.95])
def test_a_truncated_gz_keeps_the_records_before_the_damage_and_says_how_many(cut):
    data = _gzip_books(400)
    *documents, letter = _records(data[: int(len(data) * cut)], "books.jsonl.gz")
    assert 0 < len(documents) < 400 and [d.id for d in documents] == [str(i) for i in range(len(documents))]
    assert letter.reason == "unreadable_file" and letter.source == "books.jsonl.gz"
    assert f"the {len(documents)} record(s) before the damage are kept" in letter.detail


def test_a_gz_damaged_from_the_start_says_nothing_could_be_read():
    (letter,) = _records(b"\x1f\x8b\x08\x00garbage", "books.jsonl.gz")
    assert letter.reason == "unreadable_file" and letter.detail.endswith("no record could be read")


def test_parquet_rows_are_documents(tmp_path):
    table = pa.table({"id": ["a", "b", "c"], "text": ["one", "", None], "year": [1900, 1901, 1902]})
    pq.write_table(table, tmp_path / "x.parquet")
    first, second, third = _records((tmp_path / "x.parquet").read_bytes(), "x.parquet")
    assert first.id == "a" and first.metadata == (("year", 1900),)
    assert second.reason == "empty_text"
    assert (third.reason, third.detail) == ("missing_text", "'text' is null")


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
