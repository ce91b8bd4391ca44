"""The Grain loader: manifests refused or accepted, mixing, shuffling, layout, determinism."""

import dataclasses
import shutil

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from pipelines.kit.packed_writer import write_shard
from schemas import manifest, packed
from trainer.training import loader as data
from trainer import ring_layout as layout
from trainer.config import DataConfig, DatasetConfig
from trainer.sharding import MeshConfig, make_mesh

SEQ = 64


def _record(tag: int, seq_len: int = SEQ) -> bytes:
    """A packed record of two segments whose tokens all equal ``tag`` (so a batch row names its record)."""
    segments = [
        {"tokens": np.full(n, tag, np.int32), "vision_mask": np.zeros(n, bool),
         "loss_weights": np.r_[0.0, np.ones(n - 1)].astype(np.float32)}
        for n in (seq_len // 2, seq_len // 4)
    ]
    return packed.encode(**packed.from_segments(segments, seq_len))


def write_dataset(directory, tags, *, seq_len=SEQ, shard_sizes=None, tokenizer_sha="t" * 64, **manifest_fields):
    """A dataset directory with one record per tag, split into shards of ``shard_sizes`` (zeros allowed);
    ``manifest_fields`` override the manifest's (``max_ids``, ``tokenizer`` ...)."""
    directory.mkdir(parents=True)
    shard_sizes = shard_sizes or (len(tags),)
    bounds = np.cumsum((0,) + tuple(shard_sizes))
    shards = tuple(
        write_shard(str(directory / manifest.shard_name("synthetic", i, len(shard_sizes))),
                    [_record(t, seq_len) for t in tags[bounds[i]:bounds[i + 1]]])
        for i in range(len(shard_sizes))
    )
    fields = dict(job="test", name="synthetic", seq_len=seq_len, shards=shards, counts={}, tokens=0, pad_tokens=0,
                  config={}, tokenizer={"path": "tok.model", "sha256": tokenizer_sha})
    manifest.write(str(directory), manifest.Manifest(**{**fields, **manifest_fields}))
    return directory


def _config(*datasets, **overrides):
    fields = dict(seq_len=SEQ, batch_size=4, read_threads=2)
    fields.update(overrides)
    return DataConfig(datasets=tuple(DatasetConfig(str(d), w) for d, w in datasets), **fields)


def _stream(config, count, **kwargs):
    iterator = iter(data.dataset(config, data.read_manifests(config), batch_size=config.batch_size, **kwargs))
    batches = [next(iterator) for _ in range(count)]
    if config.worker_count:
        iterator.close()
    return batches


def _tags(batches):
    return np.concatenate([b["tokens"][:, 0] for b in batches])


@pytest.fixture(scope="module")
def two_datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    first = write_dataset(root / "a", list(range(1, 41)), shard_sizes=(15, 0, 25))
    second = write_dataset(root / "b", list(range(101, 131)), shard_sizes=(30,))
    return first, second


def test_one_epoch_is_a_permutation_of_all_records_and_reshuffled_the_next(two_datasets):
    config = _config((two_datasets[0], 1.0), batch_size=8)
    tags = _tags(_stream(config, 10))
    assert sorted(tags[:40]) == list(range(1, 41))  # the empty middle shard is skipped
    assert sorted(tags[40:80]) == list(range(1, 41))
    assert not np.array_equal(tags[:40], tags[40:80])
    assert not np.array_equal(tags[:40], np.arange(1, 41))


def test_same_seed_same_batches_other_seed_other_order(two_datasets):
    config = _config((two_datasets[0], 1.0))
    assert np.array_equal(_tags(_stream(config, 5)), _tags(_stream(config, 5)))
    other = _config((two_datasets[0], 1.0), seed=1)
    assert not np.array_equal(_tags(_stream(config, 5)), _tags(_stream(other, 5)))


def test_mixture_weights_are_respected_over_many_batches(two_datasets):
    config = _config((two_datasets[0], 3.0), (two_datasets[1], 1.0), batch_size=8)
    tags = _tags(_stream(config, 100))
    share = np.mean(tags < 100)
    assert abs(share - 0.75) < 0.02, share
    assert set(tags[tags > 100]) == set(range(101, 131))  # the smaller dataset repeats, reshuffled


def test_worker_counts_0_and_2_give_the_same_batches(two_datasets):
    config = _config((two_datasets[0], 1.0), (two_datasets[1], 2.0))
    in_process = _stream(config, 12, sp=4)
    workers = _stream(_config((two_datasets[0], 1.0), (two_datasets[1], 2.0), worker_count=2), 12, sp=4)
    for a, b in zip(in_process, workers):
        assert a.keys() == b.keys()
        assert all(np.array_equal(a[k], b[k]) for k in a)


def test_process_shards_together_make_the_single_process_batches(two_datasets):
    config = _config((two_datasets[0], 1.0), (two_datasets[1], 1.0), batch_size=8)
    whole = _tags(_stream(config, 6))
    halves = [_tags(_stream(_config((two_datasets[0], 1.0), (two_datasets[1], 1.0), batch_size=4), 6,
                            num_shards=2, shard_index=i)) for i in range(2)]
    for step in range(6):
        together = np.concatenate([h[4 * step:4 * step + 4] for h in halves])
        assert np.array_equal(together, whole[8 * step:8 * step + 8])


@settings(max_examples=8, deadline=None)
@given(name=st.sampled_from(layout.LAYOUTS), sp=st.sampled_from([1, 2, 4]))
def test_batch_is_in_ring_layout_with_targets_from_natural_order(books_dataset, name, sp):
    config = DataConfig(datasets=(DatasetConfig(str(books_dataset)),), seq_len=512, batch_size=2, layout=name,
                        verify_hashes=False)
    (natural,) = _stream(DataConfig(**{**config.__dict__, "layout": "contiguous"}), 1)
    (laid_out,) = _stream(config, 1, sp=sp, block=16)
    perm = layout.batch_permutation(natural["segment_ids"], sp, name, 16, natural["positions"])
    for key in data.BATCH_KEYS:
        assert np.array_equal(laid_out[key], np.take_along_axis(natural[key], perm, axis=1)), key
    same = (natural["segment_ids"][:, 1:] == natural["segment_ids"][:, :-1]) & (natural["segment_ids"][:, :-1] > 0)
    assert np.array_equal(natural["targets"][:, :-1][same], natural["tokens"][:, 1:][same])
    assert np.all(natural["target_weights"][:, :-1][~same] == 0) and np.all(natural["target_weights"][:, -1] == 0)


def test_loader_gives_global_arrays_sharded_over_batch_and_sequence(two_datasets):
    mesh = make_mesh(MeshConfig(dp=1, fsdp=2, sp=4, tp=1))
    loader = data.Loader(_config((two_datasets[0], 1.0)), mesh)
    batch = next(loader)
    state = loader.iterator.get_state()
    following = next(loader)
    loader.iterator.set_state(state)
    assert np.array_equal(np.asarray(next(loader)["tokens"]), np.asarray(following["tokens"]))
    assert set(batch) == set(data.BATCH_KEYS)
    for array in batch.values():
        assert array.shape == (4, SEQ)
        assert array.sharding.shard_shape(array.shape) == (2, SEQ // 4)
    loader.close()


def test_incomplete_dataset_is_refused(two_datasets, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(two_datasets[0], copy)
    (copy / manifest.MANIFEST_NAME).unlink()
    with pytest.raises(ValueError, match="no manifest.json; the dataset is incomplete"):
        data.read_manifests(_config((copy, 1.0)))


def test_other_sequence_length_is_refused_naming_both(two_datasets, tmp_path):
    longer = write_dataset(tmp_path / "long", [1, 2, 3, 4], seq_len=2 * SEQ)
    with pytest.raises(ValueError, match=f"manifest seq_len is {2 * SEQ}.*data.seq_len is {SEQ}"):
        data.read_manifests(_config((two_datasets[0], 1.0), (longer, 1.0)))


def test_other_tokenizer_is_refused_naming_both_hashes(two_datasets, tmp_path):
    other = write_dataset(tmp_path / "other", [1, 2, 3, 4], tokenizer_sha="u" * 64)
    with pytest.raises(ValueError, match=f"tokenizer sha256 {'u' * 64} differs from {'t' * 64}"):
        data.read_manifests(_config((two_datasets[0], 1.0), (other, 1.0)))


def test_tampered_shard_is_refused_naming_the_shard(two_datasets, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(two_datasets[1], copy)
    shard = next(copy.glob("synthetic.array_record-*"))
    content = bytearray(shard.read_bytes())
    content[-1] ^= 0xFF
    shard.write_bytes(bytes(content))
    with pytest.raises(ValueError, match=f"shard {shard.name} sha256 differs"):
        data.read_manifests(_config((copy, 1.0), verify_hashes=True))
    shard.write_bytes(bytes(content) + b"x")
    with pytest.raises(ValueError, match=f"shard {shard.name} has {len(content) + 1} bytes"):
        data.read_manifests(_config((copy, 1.0)))


def test_empty_stage_and_empty_dataset_are_refused(tmp_path):
    with pytest.raises(ValueError, match="data.datasets is empty"):
        data.read_manifests(DataConfig(seq_len=SEQ))
    empty = write_dataset(tmp_path / "empty", [], shard_sizes=(0,))
    with pytest.raises(ValueError, match="the dataset has no records"):
        data.read_manifests(_config((empty, 1.0)))


def test_record_of_another_length_than_the_manifest_is_refused(tmp_path):
    """An edited manifest (seq_len 64) over records of 128 tokens: refused, not cut into batches."""
    edited = write_dataset(tmp_path / "edited", [1, 2, 3, 4], seq_len=2 * SEQ)
    manifest.write(str(edited), dataclasses.replace(manifest.read(str(edited)), seq_len=SEQ))
    with pytest.raises(ValueError, match=f"sequence length {2 * SEQ}, not the expected seq_len {SEQ}"):
        _stream(_config((edited, 1.0)), 1)
