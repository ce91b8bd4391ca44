"""The packed-dataset writer's plan: pack groups and shards fixed by a bucket's token total, before packing."""

from hypothesis import given
from hypothesis import strategies as st

from pipelines import packing
from pipelines.buckets import Bucket
from pipelines.dataset import BucketPlan, DatasetSpec
from pipelines.output import OutputConfig


def _spec(**output) -> DatasetSpec:
    return DatasetSpec("books", OutputConfig(output="/tmp/x", buckets=(Bucket(1024),), **output), {}, {})


@given(st.integers(1, 64).flatmap(lambda groups: st.tuples(st.just(groups), st.integers(groups, 200))))
def test_every_group_owns_a_consecutive_run_of_at_least_one_shard(plan):
    groups, shards = plan
    owned = [BucketPlan(groups, shards).shards_of(group) for group in range(groups)]
    assert all(len(run) >= 1 for run in owned)
    assert [shard for run in owned for shard in run] == list(range(shards))


def test_fixed_shard_count_is_kept_and_caps_the_pack_groups():
    tokens = 1024 * packing.SEQUENCES_PER_GROUP * 10  # enough for 10 groups
    assert _spec(num_shards=3).plan(1024, tokens) == BucketPlan(3, 3)
    assert _spec(num_shards=40).plan(1024, tokens) == BucketPlan(10, 40)


def test_shards_follow_the_target_size_with_at_least_one_per_group():
    per_group = 1024 * packing.SEQUENCES_PER_GROUP
    assert _spec(shard_mb=1, pack_groups=2).plan(1024, 20 * per_group) == BucketPlan(2, 3)  # 2.5 MiB at 2 bytes a token
    assert _spec().plan(1024, 3 * per_group) == BucketPlan(3, 3)  # far under 256 MiB: one shard per group
    assert _spec().plan(1024, 100) == BucketPlan(1, 1)
