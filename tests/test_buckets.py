"""Length buckets: spec parsing, presets and placement."""

import pytest

from pipelines.kit.buckets import PRESETS, Bucket, Count, parse


def test_spec_parses_ranges_open_ends_and_bare_lengths():
    assert parse("32768:10000-100000,131072:100000-200000") == (
        Bucket(32768, 10000, 100000),
        Bucket(131072, 100000, 200000),
    )
    assert parse("1048576:1000000-") == (Bucket(1048576, 1000000, None),)
    assert parse("2048") == (Bucket(2048),)


def test_paper_preset_has_the_five_text_stages():
    buckets = parse("lwm-text")
    assert [b.seq_len for b in buckets] == [2**15, 2**17, 2**18, 2**19, 2**20]
    assert buckets == PRESETS["lwm-text"]
    assert buckets[0].outside(9_999) == Count.TOO_SHORT and buckets[0].outside(10_000) is None


def test_ranges_are_half_open_so_adjacent_buckets_share_no_document():
    low, high = parse("32768:10000-100000,131072:100000-200000")
    assert (low.outside(100_000), high.outside(100_000)) == (Count.TOO_LONG, None)


@pytest.mark.parametrize("spec", ["", "abc", "1024:5", "1024:50-10", "1024,1024:0-5", "0"])
def test_bad_specs_raise_clear_errors(spec):
    with pytest.raises(ValueError):
        parse(spec)


def test_spec_round_trips():
    for bucket in parse("lwm-text") + parse("512"):
        assert parse(bucket.spec()) == (bucket,)
