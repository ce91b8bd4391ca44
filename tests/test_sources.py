"""The shared front half of the data jobs: large JSON-lines files read as ranges of lines, deduplicated."""

import io

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to
from hypothesis import given, settings
from hypothesis import strategies as st

from pipelines.kit import sources
from schemas import raw


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"")), max_size=30),
       st.booleans(), st.integers(1, 100))
def test_line_ranges_cover_the_file_in_whole_lines_with_their_line_numbers(lines, final_newline, target):
    data = b"\n".join(lines) + (b"\n" if final_newline and lines else b"")
    ranges = list(sources.line_ranges(io.BytesIO(data), target))
    assert b"".join(data[start:stop] for start, stop, _ in ranges) == data
    for start, stop, first_line in ranges:
        assert start == 0 or data[start - 1:start] == b"\n"  # starts at a line start
        assert first_line == data[:start].count(b"\n") + 1
    for start, stop, _ in ranges[:-1]:
        assert stop - start >= target and data[stop - 1:stop] == b"\n"


def test_a_file_split_into_ranges_reads_as_the_whole_file(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "_SCAN_BLOCK", 7)  # range ends across scan blocks too
    lines = [f'{{"id": "d{i % 7}", "text": "book {i} ' + "word " * i + '"}' for i in range(30)]
    lines[11] = "{broken"
    (tmp_path / "big.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "small.jsonl").write_text('{"id": "d3", "text": "again"}\n')

    def read(range_bytes):
        with BeamTestPipeline() as pipeline:
            read = pipeline | sources.ReadUnique([str(tmp_path / "*.jsonl")], raw.iter_documents, range_bytes)
            kept = read["records"] | "Kept" >> beam.Map(lambda d: (d.id, d.text, d.source))
            letters = read["dead_letters"] | beam.Map(lambda d: (d.id, d.reason, d.detail, d.source))
            assert_that(kept, equal_to([(f"d{i}", f"book {i} " + "word " * i, f"{tmp_path}/big.jsonl:{i + 1}")
                                        for i in range(7)]), label="kept")
            expected = [("", "invalid_json", raw.decode_json_line(b"{broken", "").detail, f"{tmp_path}/big.jsonl:12")]
            expected += [(f"d{i % 7}", "duplicate_id", f"id first seen at {tmp_path}/big.jsonl:{i % 7 + 1}",
                          f"{tmp_path}/big.jsonl:{i + 1}") for i in range(7, 30) if i != 11]
            expected += [("d3", "duplicate_id", f"id first seen at {tmp_path}/big.jsonl:4", f"{tmp_path}/small.jsonl:1")]
            assert_that(letters, equal_to(expected), label="letters")
            assert_that(read["input_examples"], equal_to([31]), label="count")

    read(sources.RANGE_BYTES)  # whole files
    big = FileSystems.match([str(tmp_path / "big.jsonl")])[0].metadata_list[0]
    assert len(list(sources.SplitFiles(100).process(big))) > 5
    read(100)  # big.jsonl in ranges of a few lines each
