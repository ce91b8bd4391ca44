"""The manifest reader refuses incomplete or tampered datasets."""

import json
import shutil

import pytest

from schemas import manifest


def test_complete_dataset_reads(books_dataset):
    result = manifest.read(str(books_dataset))
    assert result.seq_len == 512 and result.records > 0 and len(result.shards) == 2


def test_directory_without_manifest_is_refused(books_dataset, tmp_path):
    copy = shutil.copytree(books_dataset, tmp_path / "d")
    (copy / "manifest.json").unlink()
    with pytest.raises(ValueError, match="incomplete"):
        manifest.read(str(copy))


def test_shard_of_another_size_is_refused(books_dataset, tmp_path):
    copy = shutil.copytree(books_dataset, tmp_path / "d")
    shard = copy / manifest.read(str(copy)).shards[0].path
    shard.write_bytes(shard.read_bytes() + b"x")
    with pytest.raises(ValueError, match="bytes"):
        manifest.read(str(copy))


def test_shard_with_another_hash_is_refused(books_dataset, tmp_path):
    copy = shutil.copytree(books_dataset, tmp_path / "d")
    shard = copy / manifest.read(str(copy)).shards[0].path
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256"):
        manifest.read(str(copy))
    manifest.read(str(copy), verify_hashes=False)  # size still matches


def test_missing_shard_and_unknown_version_are_refused(books_dataset, tmp_path):
    copy = shutil.copytree(books_dataset, tmp_path / "d")
    fields = json.loads((copy / "manifest.json").read_text())
    (copy / fields["shards"][0]["path"]).unlink()
    with pytest.raises(ValueError, match="missing"):
        manifest.read(str(copy))
    fields["format_version"] = 99
    (copy / "manifest.json").write_text(json.dumps(fields))
    with pytest.raises(ValueError, match="format_version"):
        manifest.read(str(copy))


def test_manifest_json_round_trips(books_dataset):
    result = manifest.read(str(books_dataset))
    assert manifest.Manifest.from_json(result.to_json()) == result
