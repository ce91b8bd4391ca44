"""`lwm data books` end to end: shards, manifests, dead letters, reconciliation, determinism."""

import gzip
import json
import re
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to
import apache_beam as beam

from orchestration import cli
from pipelines import books
from pipelines.kit import inspection
from pipelines.kit import sources
from pipelines.kit.buckets import Bucket
from pipelines.tokens.text_tokenizer import TextTokenizer
from schemas import manifest, raw

SEQ_LENS = (256, 1024)


def _records(directory):
    return inspection.records(str(directory))


@pytest.fixture(scope="module")
def corpus(sample_books, tmp_path_factory):
    """The sample books split over three formats, plus broken inputs of every kind."""
    root = tmp_path_factory.mktemp("corpus")
    lines = sample_books.read_bytes().splitlines()
    (root / "part1.jsonl").write_bytes(b"\n".join(lines[:40]) + b"\n")
    with gzip.open(root / "part2.jsonl.gz", "wb") as f:
        f.write(b"\n".join(lines[40:50]) + b"\n")
    rows = [json.loads(line) for line in lines[50:]]
    pq.write_table(pa.table({"id": [r["id"] for r in rows], "text": [r["text"] for r in rows]}), root / "part3.parquet")
    (root / "loose.txt").write_text(json.loads(lines[0])["text"][:2000])
    (root / "broken.jsonl").write_bytes(
        b'{"id": "e1", "text": ""}\n{oops\n\xff\xfe\n' + lines[3] + b'\n{"text": "no id"}\n'
    )
    (root / "corrupt.jsonl.gz").write_bytes(b"\x1f\x8b\x08\x00garbage")
    (root / "notes.csv").write_text("a,b\n")
    return root


def _run(corpus, output, *extra):
    argv = ["data", "books", "--input", f"{corpus}/*", "--output", str(output), "--tokenizer"]
    return cli.main(argv + list(extra))


@pytest.fixture(scope="module")
def job(corpus, tokenizer_path, tmp_path_factory):
    output = tmp_path_factory.mktemp("out")
    assert _run(corpus, output, tokenizer_path, "--buckets", "256:0-600,1024", "--num-shards", "3") == 0
    return output


def test_each_bucket_is_a_complete_dataset(job):
    for seq_len in SEQ_LENS:
        result = manifest.read(str(job / f"seq{seq_len}"))
        assert result.seq_len == seq_len and result.job == "books"
        assert [s.path for s in result.shards] == [f"books.array_record-{i:05d}-of-00003" for i in range(3)]
        assert result.records == result.counts["packed_examples"] > 0
        assert result.tokens + result.pad_tokens == result.records * seq_len


def test_dead_letters_name_their_reasons(job):
    letters = [json.loads(line) for line in (job / "seq1024" / "dead_letter" / "dead_letter.jsonl").read_text().splitlines()]
    reasons = sorted(d["reason"] for d in letters)
    assert reasons == sorted(
        ["empty_text", "invalid_json", "invalid_utf8", "duplicate_id", "missing_id", "unreadable_file", "unsupported_format"]
    )
    assert all(d["source"] for d in letters)
    assert manifest.read(str(job / "seq1024")).counts["dead_letter"]["duplicate_id"] == 1


def test_counts_reconcile_in_every_bucket(job):
    for seq_len in SEQ_LENS:
        counts = manifest.read(str(job / f"seq{seq_len}")).counts
        accounted = counts["documents"] + counts["too_short"] + counts["too_long"] + sum(counts["dead_letter"].values())
        assert accounted == counts["input_examples"] == 61 + 7  # 60 books + a .txt book, 7 bad inputs
    assert manifest.read(str(job / "seq256")).counts["too_long"] > 0


def test_every_document_token_is_packed_once_per_bucket(job, corpus, tokenizer_path):
    tokenizer = TextTokenizer(tokenizer_path)
    with open(corpus / "part3.parquet", "rb") as stream:
        document = next(raw.iter_documents(stream, "part3.parquet"))
    expected = tokenizer.frame(tokenizer.encode(document.text), books.SpecialTokens())
    records = list(_records(job / "seq1024"))
    total = sum(int(np.count_nonzero(r["segment_ids"])) for r in records)
    assert total == manifest.read(str(job / "seq1024")).tokens
    found = np.concatenate([r["tokens"][r["segment_ids"] > 0] for r in records])
    # The document's pieces appear, in order, inside the packed token stream.
    first = expected[:64]
    assert any(np.array_equal(found[i : i + 64], first) for i in np.flatnonzero(found == first[0]))


def test_rerun_and_multiprocess_run_are_byte_identical(job, corpus, tokenizer_path, tmp_path):
    assert _run(corpus, tmp_path, tokenizer_path, "--buckets", "256:0-600,1024", "--num-shards", "3",
                "--direct_running_mode=multi_processing", "--direct_num_workers=2") == 0
    for seq_len in SEQ_LENS:
        ours, theirs = job / f"seq{seq_len}", tmp_path / f"seq{seq_len}"
        for shard in manifest.read(str(ours)).shards:
            assert (ours / shard.path).read_bytes() == (theirs / shard.path).read_bytes()
        strip = lambda d: {k: v for k, v in json.loads((d / "manifest.json").read_text()).items() if k != "created_at"}
        assert strip(ours) == strip(theirs)
        assert (ours / "dead_letter" / "dead_letter.jsonl").read_bytes() == (theirs / "dead_letter" / "dead_letter.jsonl").read_bytes()


def test_existing_output_needs_overwrite(job, corpus, tokenizer_path, capsys, tmp_path):
    shutil.copytree(job, tmp_path, dirs_exist_ok=True)
    assert _run(corpus, tmp_path, tokenizer_path, "--seq-len", "1024") == 2
    assert "--overwrite" in capsys.readouterr().err
    assert _run(corpus, tmp_path, tokenizer_path, "--seq-len", "1024", "--overwrite") == 0
    assert manifest.read(str(tmp_path / "seq1024")).config["bucket"] == "1024"


def test_pattern_matching_nothing_is_a_clear_error(tokenizer_path, tmp_path, capsys):
    assert cli.main(["data", "books", "--input", str(tmp_path / "none*.jsonl"), "--output", str(tmp_path),
                     "--tokenizer", tokenizer_path, "--seq-len", "64"]) == 2
    assert "matches no file" in capsys.readouterr().err


def test_inspect_shows_summary_and_marked_segments(job, capsys):
    assert cli.main(["data", "inspect", str(job / "seq1024")]) == 0
    out = capsys.readouterr().out
    assert "utilization" in out and "dead      " in out and "segment 1" in out and "[loss 1:" in out
    disk, payload = (float(x) for x in re.search(r"([\d.]+) bytes/token on disk, ([\d.]+) bytes/token of record", out).groups())
    assert 0 < payload < disk  # ArrayRecord adds framing and padding around the records


def test_read_and_dedupe_steps_in_a_test_pipeline(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"id": "x", "text": "first"}\n{"id": "y", "text": "only"}\n')
    (tmp_path / "b.jsonl").write_text('{"id": "x", "text": "second"}\n')
    with BeamTestPipeline() as pipeline:
        read = pipeline | sources.ReadUnique([str(tmp_path / "*.jsonl")], raw.iter_documents)
        kept = read["records"] | "Kept" >> beam.Map(lambda d: (d.id, d.text))
        letters = read["dead_letters"] | beam.Map(lambda d: (d.id, d.reason, d.detail, d.source))
        assert_that(kept, equal_to([("x", "first"), ("y", "only")]), label="kept")
        assert_that(letters, equal_to([("x", "duplicate_id", f"id first seen at {tmp_path}/a.jsonl:1",
                                         f"{tmp_path}/b.jsonl:1")]), label="letters")
        assert_that(read["input_examples"], equal_to([3]), label="count")


def test_bucket_assignment_cuts_and_counts():
    buckets = (Bucket(4, 0, 6), Bucket(8, 6))
    outputs = list(books.assign_buckets(("d", np.arange(10, dtype=np.int32)), buckets, 1.0))
    pieces = [o for o in outputs if not isinstance(o, beam.pvalue.TaggedOutput)]
    counts = [o.value for o in outputs if isinstance(o, beam.pvalue.TaggedOutput)]
    assert [(seq_len, len(p)) for seq_len, p in pieces] == [(8, 8), (8, 2)]
    assert counts == [((4, "too_long"), 1), ((8, "documents"), 1), ((8, "segments"), 2)]


def test_remote_input_and_output_go_through_beam_filesystems(corpus, tokenizer_path, tmp_path, monkeypatch):
    from tests.fake_remote_fs import FakeRemoteFileSystem

    monkeypatch.setattr(FakeRemoteFileSystem, "root", str(tmp_path))
    shutil.copy(corpus / "part1.jsonl", tmp_path / "in.jsonl")
    shutil.copy(tokenizer_path, tmp_path / "tok.model")
    args = ["--input", "fakegcs://in.jsonl", "--output", "fakegcs://out", "--tokenizer", "fakegcs://tok.model"]
    assert cli.main(["data", "books", *args, "--seq-len", "1024", "--num-shards", "2"]) == 0
    result = manifest.read("fakegcs://out/seq1024")
    assert result.counts["documents"] == 40 and len(result.shards) == 2
    assert not list(tmp_path.glob("out/seq1024/*.tmp*"))  # temporary names renamed away
    assert cli.main(["data", "books", *args, "--seq-len", "1024", "--overwrite"]) == 0
    assert len(manifest.read("fakegcs://out/seq1024").shards) == 1
    assert sorted(p.name for p in (tmp_path / "out" / "seq1024").iterdir()) == [
        "books.array_record-00000-of-00001", "dead_letter", "manifest.json"]
    remote = list(inspection.records("fakegcs://out/seq1024"))  # shards read through a local copy
    assert len(remote) == manifest.read("fakegcs://out/seq1024").records > 0
    assert "record 0" in inspection.inspect("fakegcs://out/seq1024")


def test_inspect_counts_records_over_shards_and_refuses_out_of_range(job, capsys):
    total = manifest.read(str(job / "seq1024")).records
    assert cli.main(["data", "inspect", str(job / "seq1024"), "--record", str(total - 1)]) == 0
    assert f"record {total - 1} (record " in capsys.readouterr().out
    for bad in (total, -1):
        assert cli.main(["data", "inspect", str(job / "seq1024"), "--record", str(bad)]) == 2
        assert f"out of range: {job / 'seq1024'} holds {total} records" in capsys.readouterr().err


def test_inspect_finds_the_tokenizer_by_its_absolute_uri_from_anywhere(job, tmp_path, monkeypatch, capsys):
    recorded = json.loads((job / "seq1024" / "manifest.json").read_text())["tokenizer"]
    copy = tmp_path / "moved"
    shutil.copytree(job / "seq1024", copy)
    text = json.loads((copy / "manifest.json").read_text())
    text["tokenizer"]["path"] = "relative/tok.model"  # as typed, elsewhere
    (copy / "manifest.json").write_text(json.dumps(text))
    monkeypatch.chdir(tmp_path)
    assert cli.main(["data", "inspect", str(copy), "--no-verify"]) == 0
    out = capsys.readouterr().out
    assert recorded["uri"] in out and "<s>" in out and "not found" not in out


def test_readers_refuse_records_whose_length_is_not_the_manifests_seq_len(job, tmp_path, capsys):
    copy = tmp_path / "edited"
    shutil.copytree(job / "seq1024", copy)
    text = json.loads((copy / "manifest.json").read_text())
    text["seq_len"] = 512
    (copy / "manifest.json").write_text(json.dumps(text))
    assert cli.main(["data", "inspect", str(copy)]) == 2
    assert "packed record has sequence length 1024, not the expected seq_len 512" in capsys.readouterr().err
    with pytest.raises(ValueError, match="seq_len 512"):
        next(inspection.records(str(copy)))
