"""The packed-dataset writer's plan: which hash groups pack alone and which shards each unit writes, fixed
by the groups' token totals before packing."""

from hypothesis import given
from hypothesis import strategies as st

from pipelines.kit import packing
from pipelines.kit.buckets import Bucket
from pipelines.kit.packed_writer import LEFTOVERS, BucketPlan, DatasetSpec
from pipelines.kit.output import OutputConfig

LARGE = 1024 * packing.SEQUENCES_PER_GROUP * 16  # tokens for 16 groups to pack alone at L = 1024


def _spec(**output) -> DatasetSpec:
    return DatasetSpec("books", OutputConfig(output="/tmp/x", buckets=(Bucket(1024),), **output), {}, {})


def test_a_small_bucket_is_one_unit_with_one_shard():
    assert _spec().plan(1024, {0: 100, 7: 5_000}) == BucketPlan(16, {LEFTOVERS: range(0, 1)})


def test_a_large_buckets_groups_each_write_a_run_and_the_leftovers_come_last():
    plan = _spec().plan(1024, {group: LARGE // 16 for group in range(16)})
    assert list(plan.runs) == [*range(16), LEFTOVERS]
    assert all(len(run) == 1 for run in plan.runs.values()) and plan.shards == 17  # far under 256 MiB each


def test_shards_follow_the_target_size_per_unit():
    plan = _spec(shard_mb=1, pack_groups=2).plan(1024, {0: 1_500_000, 1: 500_000})  # 2.9 and 1 MiB at 2 bytes a token
    assert plan.runs == {0: range(0, 3), 1: range(3, 4), LEFTOVERS: range(4, 5)}


def test_a_fixed_shard_count_leaves_one_shard_for_the_leftovers_and_caps_the_groups():
    assert _spec(num_shards=1).hash_groups == 1 and _spec(num_shards=2).hash_groups == 1
    assert _spec(num_shards=3).hash_groups == 2 and _spec(num_shards=40).hash_groups == 16
    assert _spec(num_shards=1).plan(1024, {0: LARGE}) == BucketPlan(1, {0: range(0, 1)})  # one group: no leftovers
    assert _spec(num_shards=3).plan(1024, {0: LARGE, 1: LARGE}).runs == {0: range(0, 1), 1: range(1, 2),
                                                                         LEFTOVERS: range(2, 3)}


@given(st.integers(1, 64), st.integers(1, 32), st.lists(st.integers(0, 10**7), min_size=1, max_size=32))
def test_a_fixed_shard_count_is_shared_out_whole_in_consecutive_runs_of_at_least_one(num_shards, pack_groups, tokens):
    spec = _spec(num_shards=num_shards, pack_groups=pack_groups)
    totals = {group: n for group, n in enumerate(tokens[:spec.hash_groups]) if n}
    plan = spec.plan(1024, totals or {0: 1})
    assert [shard for run in plan.runs.values() for shard in run] == list(range(num_shards))
    assert all(len(run) >= 1 for run in plan.runs.values())
