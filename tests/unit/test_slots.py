"""sidecar.core.slots: CRC16 key slots (checked against a real cluster in tests/integration) and shard tags."""

from __future__ import annotations

import collections

import pytest

from sidecar.core.slots import SLOTS, balanced_tags, crc16, hash_tag, key_slot, owners, slot_range


def test_crc16_is_the_xmodem_variant_redis_cluster_specifies() -> None:
    assert crc16(b"123456789") == 0x31C3  # the check value in the Redis Cluster specification


@pytest.mark.parametrize(
    ("key", "tag"),
    [("{user1000}.following", "user1000"), ("foo{}{bar}", "foo{}{bar}"), ("foo{{bar}}zap", "{bar"), ("a{b", "a{b")],
)
def test_hash_tag_follows_the_cluster_rules(key: str, tag: str) -> None:
    assert hash_tag(key) == tag


def test_keys_of_one_shard_share_a_slot() -> None:
    tag = balanced_tags(16)[3]
    assert len({key_slot(f"rt:{{{tag}}}:{suffix}") for suffix in ("live", "h:user:1", "m:user:1", "p:x")}) == 1


@pytest.mark.parametrize("shards", [1, 3, 16, 128, 1000])
def test_each_balanced_tag_lies_in_its_own_equal_slot_range(shards: int) -> None:
    tags = balanced_tags(shards)
    assert len(set(tags)) == shards
    assert all(key_slot(t) in slot_range(k, shards) for k, t in enumerate(tags))


def test_balanced_tags_are_stable() -> None:
    assert balanced_tags(16)[:4] == ("0.13", "1.10", "2.3", "3.0")  # keys already in Redis depend on them


def test_balanced_tags_spread_where_bare_tags_do_not() -> None:
    six = [(i * SLOTS // 6, (i + 1) * SLOTS // 6 - 1, f"n{i}") for i in range(6)]
    bare = collections.Counter(owners([key_slot(str(k)) for k in range(128)], six))
    assert sorted(bare.values()) == [15, 16, 22, 23, 25, 27]  # the skew seen in public reports
    balanced = collections.Counter(owners([key_slot(t) for t in balanced_tags(128)], six))
    assert sorted(balanced.values()) == [21, 21, 21, 21, 22, 22]


def test_owners_refuses_an_uncovered_slot() -> None:
    with pytest.raises(ValueError, match="not covered"):
        owners([100], [(0, 99, "a")])
