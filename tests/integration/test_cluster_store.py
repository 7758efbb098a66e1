"""The store and the publisher on a real Redis Cluster (3 masters + 3 replicas): the same reads and writes as on
one node, batches split per master, a master's failover and a slot's migration while publishing.

The relay's reader is not cluster-aware yet, so no sidecar process runs here: these tests drive the store and
the publisher (and a real Celery worker) directly.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import threading
import time
from collections.abc import Callable, Iterator

import orjson
import pytest
import redis
from celery import Celery

from dashboard.feed import DashboardConfig, StatsFeed, redis_client
from sidecar.celery_hooks import task_channel
from sidecar.config import Settings
from sidecar.core.protocol import Position, shard_of
from sidecar.core.slots import balanced_tags, key_slot
from sidecar.publish import Publisher
from sidecar.stats import RECORD_FIELD
from sidecar.store import PublishNotConfirmed, Store, connect
from tests.cluster import ClusterNode, RedisClusterNodes
from tests.processes import EmbeddedRedis, WorkerProcess, free_port

pytestmark = pytest.mark.slow

SETTINGS = Settings()


def channel_in_shard(shard: int, prefix: str = "ch") -> str:
    i = 0
    while shard_of(f"{prefix}:{i}", SETTINGS.shards) != shard:
        i += 1
    return f"{prefix}:{i}"


def slot_of_shard(shard: int) -> int:
    return key_slot(f"rt:{{{balanced_tags(SETTINGS.shards)[shard]}}}:live")


@pytest.fixture(scope="module")
def shared_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterNodes]:
    nodes = RedisClusterNodes(tmp_path_factory.mktemp("cluster"))
    try:
        yield nodes.start()
    finally:
        nodes.stop()


@pytest.fixture
def intact_cluster(shared_cluster: RedisClusterNodes) -> RedisClusterNodes:
    """The module's one cluster, emptied, for a test that leaves its nodes and slots as it found them (kills,
    pauses and migrates nothing): one cluster start for all of those. A test that changes the topology takes
    its own `redis_cluster`."""
    shared_cluster.wait_ok(10)  # as the previous test left it: every node up, every replica linked
    for master in shared_cluster.masters():
        master.command("FLUSHALL")
    return shared_cluster


@pytest.fixture
def cluster_url(request: pytest.FixtureRequest) -> str:
    """The masters of `intact_cluster` when the test takes it, else of its own `redis_cluster`."""
    name = "intact_cluster" if "intact_cluster" in request.fixturenames else "redis_cluster"
    cluster: RedisClusterNodes = request.getfixturevalue(name)
    return "redis+cluster://" + ",".join(n.addr for n in cluster.masters())


@pytest.fixture
def store(cluster_url: str) -> Iterator[Store]:
    client = connect(cluster_url, SETTINGS)
    try:
        yield Store(client, SETTINGS)
    finally:
        client.close()


@pytest.fixture
def publisher(store: Store) -> Publisher:
    return Publisher(store)


def evalsha_calls(node: ClusterNode) -> int:
    with node.client() as c:
        return int(c.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0))


def test_a_cluster_url_and_a_plain_url_of_a_cluster_node_both_give_a_cluster_client(
    intact_cluster: RedisClusterNodes, cluster_url: str, redis_server: EmbeddedRedis
) -> None:
    for url in (cluster_url, intact_cluster.url):
        client = connect(url, SETTINGS)
        assert isinstance(client, redis.RedisCluster)
        assert {n.name for n in client.get_primaries()} == {m.addr for m in intact_cluster.masters()}
        client.close()
    single = connect(redis_server.url, SETTINGS)
    assert type(single) is redis.Redis
    single.close()
    down = connect(f"redis://127.0.0.1:{free_port()}/0", SETTINGS)  # a relay may start before its Redis
    assert type(down) is redis.Redis
    down.close()


def test_publishes_on_every_shard_read_back_as_on_one_node(
    intact_cluster: RedisClusterNodes, store: Store, publisher: Publisher
) -> None:
    redis_cluster = intact_cluster
    masters_used = set()
    for shard in range(SETTINGS.shards):
        channel = channel_in_shard(shard)
        first = publisher.diff(channel, "created", {"a": 1, "tags": []})
        publisher.diff(channel, "edited", {"b": {"c": 2}})
        last = publisher.event(channel, "viewed", {"by": "x"})
        assert (first.seq, last.seq) == (1, 3)
        snap = store.snapshot(channel)
        assert snap is not None
        assert (snap.id, snap.seq, snap.epoch) == (last.id, 3, first.epoch)
        assert snap.state == {"a": 1, "tags": [], "b": {"c": 2}}
        history = store.history(channel)
        assert [(m.seq, m.event) for m in history] == [(1, "created"), (2, "edited"), (3, "viewed")]
        assert history[0].id == first.id and history[-1].id == last.id
        whole = store.catch_up(channel, Position("0-0", ""))
        assert not whole.gap and [m.seq for m in whole.messages] == [1, 2, 3]
        rest = store.catch_up(channel, Position(first.id, first.epoch))
        assert not rest.gap and [m.seq for m in rest.messages] == [2, 3]
        assert store.catch_up(channel, Position(last.id, last.epoch)) == whole.__class__([], False, snap)
        assert store.catch_up(channel, Position(first.id, "other")).gap
        # The keys are where the slot map says: on the master owning the shard's balanced slot.
        owner = redis_cluster.master_for_slot(slot_of_shard(shard))
        with owner.client() as direct:
            keys = dataclasses.astuple(store.keys(channel))  # live, history, meta, patches, the shard's counter
            assert direct.exists(*keys) == len(keys) == 5
        masters_used.add(owner.addr)
    assert masters_used == {m.addr for m in redis_cluster.masters()}


def test_compaction_state_channels_and_policy_work_on_a_cluster(
    intact_cluster: RedisClusterNodes, store: Store, publisher: Publisher
) -> None:
    channel = channel_in_shard(3, "doc")
    for i in range(SETTINGS.compact_after + 5):
        publisher.diff(channel, "set", {f"k{i}": i})
    publisher.state(channel, "replaced", {"whole": True})
    publisher.diff(channel, "set", {"more": 1})
    snap = store.snapshot(channel)
    assert snap is not None and snap.state == {"whole": True, "more": 1}
    assert snap.seq == SETTINGS.compact_after + 7
    store.compact(channel)
    assert store.snapshot(channel) == snap
    assert store.write_policy(b'{"coalesce_window": 1}', 12.5) == 1
    assert store.write_policy(None, 13.0) == 2
    assert store.read_policy() == (2, None, 13.0)


def test_the_dashboard_reads_the_stats_stream_from_the_cluster(
    intact_cluster: RedisClusterNodes, cluster_url: str, store: Store
) -> None:
    now = time.time()
    record = {"v": 1, "replica": "r1", "ts": now, "dt": 1.0}
    store.redis.xadd(store.stats_key, {RECORD_FIELD: orjson.dumps(record)})
    config = DashboardConfig.from_env({"REDIS_URL": cluster_url})
    client = redis_client(config)
    assert isinstance(client, redis.RedisCluster)
    feed = StatsFeed(client, config.stats_key)
    assert feed.poll(now) == 1 and feed.error is None
    client.close()


def test_a_batch_across_shards_reaches_all_three_masters_in_one_pipeline_each(
    intact_cluster: RedisClusterNodes, store: Store, publisher: Publisher
) -> None:
    redis_cluster = intact_cluster
    channels = [channel_in_shard(shard, "batch") for shard in range(SETTINGS.shards)]
    publisher.event("warm-up", "warm-up")  # loads the script on its master; the others load theirs below
    masters = redis_cluster.masters()
    per_master = collections.Counter(redis_cluster.master_for_slot(slot_of_shard(s)).addr for s in range(16))
    assert len(per_master) == 3
    with publisher.batch() as batch:
        for round_ in range(2):
            for channel in channels:
                batch.diff(channel, "row", {f"r{round_}": round_})
    before = {m.addr: evalsha_calls(m) for m in masters}
    with publisher.batch() as batch:
        for channel in channels:
            batch.diff(channel, "row", {"r2": 2})
    results = batch.results
    after = {m.addr: evalsha_calls(m) for m in masters}
    # Every item ran once, on its own master, and nothing was redirected or sent twice.
    assert {addr: after[addr] - before[addr] for addr in after} == dict(per_master)
    assert [r.channel for r in results] == channels and all(r.seq == 3 for r in results)
    for channel in channels:
        assert [m.seq for m in store.history(channel)] == [1, 2, 3]
        assert store.snapshot(channel).state == {"r0": 0, "r1": 1, "r2": 2}  # type: ignore[union-attr]


def test_a_celery_task_lifecycle_publishes_to_the_cluster(
    intact_cluster: RedisClusterNodes,
    cluster_url: str,
    store: Store,
    redis_server: EmbeddedRedis,
    celery_client: Celery,
    celery_worker: Callable[..., WorkerProcess],
) -> None:
    celery_worker(cluster_url, CELERY_BROKER_URL=redis_server.url)  # the broker stays a plain Redis
    result = celery_client.send_task("tasks.jobs.report", kwargs={"user_id": 7, "steps": 2, "delay": 0.01})
    assert result.get(timeout=20)["rows"] == 200
    channel = task_channel(result.id)
    deadline = time.monotonic() + 10
    while (snap := store.snapshot(channel)) is None or snap.state.get("status") != "SUCCESS":
        assert time.monotonic() < deadline, snap
        time.sleep(0.05)
    assert snap.state["result"]["rows"] == 200 and snap.state["progress"]["current"] == 2
    history = store.history(channel)
    assert [m.event for m in history] == ["task-started", "task-progress", "task-progress", "task-succeeded"]
    assert [m.seq for m in history] == [1, 2, 3, 4]
    # The task's realtime_channels: published after the task channel's last (it may land a moment later).
    while not store.history("user:7"):
        assert time.monotonic() < deadline, "no job-finished on user:7"
        time.sleep(0.05)
    assert [m.event for m in store.history("user:7")] == ["job-finished"]


def wait_forgotten(cluster: RedisClusterNodes, old: ClusterNode, timeout: float = 15.0) -> None:
    """Until no live node's CLUSTER SLOTS names `old`: a promotion reaches the nodes by gossip, one at a time,
    and a client refreshing its slot map may ask any of them."""

    def named() -> bool:
        ranges = [r for n in cluster.live_nodes() for r in n.command("CLUSTER", "SLOTS")]  # type: ignore[union-attr]
        return any(r[2][1] == old.port for r in ranges)

    deadline = time.monotonic() + timeout
    while named():
        assert time.monotonic() < deadline, f"some node still names {old} as a master after {timeout} s"
        time.sleep(0.05)


def test_publishing_through_a_master_failover_fails_clearly_then_works_without_a_restart(
    redis_cluster: RedisClusterNodes, cluster_url: str, store: Store, publisher: Publisher
) -> None:
    victim_shard = 0
    victim = redis_cluster.master_for_slot(slot_of_shard(victim_shard))
    other_shard = next(s for s in range(16) if redis_cluster.master_for_slot(slot_of_shard(s)) is not victim)
    hit, spared = channel_in_shard(victim_shard, "fo"), channel_in_shard(other_shard, "fo")
    for i in range(5):
        publisher.event(hit, "before", {"i": i})
    reads = Store(connect(cluster_url, SETTINGS), SETTINGS)  # another process's client, which publishes nothing
    assert reads.snapshot(hit).seq == 5  # type: ignore[union-attr]
    with victim.client() as direct:
        assert direct.wait(1, 2000) == 1  # the replica has every acknowledged publish: a lossless failover
    victim.kill()
    with pytest.raises(PublishNotConfirmed) as failed, publisher.batch() as batch:
        batch.event(hit, "during")
        batch.event(spared, "during")
    assert failed.value.not_sent == [hit] and failed.value.unknown == []
    assert "nothing was sent" in str(failed.value)
    assert [m.event for m in store.history(spared)] == ["during"]  # the other master took its part
    redis_cluster.wait_promoted(victim)
    wait_forgotten(redis_cluster, victim)
    published = publisher.event(hit, "after")  # the same publisher: its slot map is refreshed on the way
    assert published.seq == 6
    assert [(m.seq, m.event) for m in store.history(hit)] == [(i + 1, "before") for i in range(5)] + [(6, "after")]
    # A read that meets the dead master fails once (503 in the relay) and finds the new one on the next try.
    snaps = []
    for _ in range(2):
        with contextlib.suppress(redis.ConnectionError):
            snaps.append(reads.snapshot(hit))
    assert snaps and snaps[-1].seq == 6  # type: ignore[union-attr]
    reads.redis.close()


def test_a_publish_whose_reply_is_lost_is_reported_unknown_and_never_sent_twice(
    redis_cluster: RedisClusterNodes, cluster_url: str
) -> None:
    settings = SETTINGS.replace(redis_socket_timeout=0.5)
    store = Store(connect(cluster_url, settings), settings)
    publisher = Publisher(store)
    channel = channel_in_shard(2, "stuck")
    publisher.event(channel, "first")
    stuck = redis_cluster.master_for_slot(slot_of_shard(2))
    stuck.pause()  # SIGSTOP: the socket stays open, the script is sent, no reply comes (well under the failover)
    try:
        with pytest.raises(PublishNotConfirmed) as failed:
            publisher.event(channel, "second")
    finally:
        stuck.resume()
    assert failed.value.unknown == [channel] and failed.value.not_sent == []
    assert "may or may not be published" in str(failed.value)
    # The paused node ran what it had received once it woke up: the publish happened, once.
    assert publisher.event(channel, "third").seq == 3
    assert [(m.seq, m.event) for m in store.history(channel)] == [(1, "first"), (2, "second"), (3, "third")]
    store.redis.close()


def migrate_slot(cluster: RedisClusterNodes, slot: int, target: ClusterNode, pause: float) -> int:
    """Move `slot` to `target` as redis-cli --cluster reshard does, one key at a time with `pause` between keys."""
    source = cluster.master_for_slot(slot)
    target.command("CLUSTER", "SETSLOT", slot, "IMPORTING", source.node_id)
    source.command("CLUSTER", "SETSLOT", slot, "MIGRATING", target.node_id)
    moved = 0
    while keys := source.command("CLUSTER", "GETKEYSINSLOT", slot, 1):
        source.command("MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "KEYS", *keys)
        moved += 1
        time.sleep(pause)
    for node in [target, source, *(m for m in cluster.masters() if m.addr not in (target.addr, source.addr))]:
        node.command("CLUSTER", "SETSLOT", slot, "NODE", target.node_id)  # the importing node first
    return moved


def test_a_shard_slot_migrating_to_another_master_while_publishing_loses_and_doubles_nothing(
    redis_cluster: RedisClusterNodes, cluster_url: str
) -> None:
    settings = SETTINGS.replace(compact_after=2)  # compactions (multi-key scripts too) all through the migration
    store = Store(connect(cluster_url, settings), settings)
    publisher = Publisher(store)
    shard = 5
    slot = slot_of_shard(shard)
    source = redis_cluster.master_for_slot(slot)
    target = next(m for m in redis_cluster.masters() if m is not source)
    channels = [channel_in_shard(shard, f"mig{i}") for i in range(8)]
    acked: dict[str, list[int]] = {c: [] for c in channels}
    errors: list[Exception] = []
    stop = threading.Event()

    def publish() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            try:
                with publisher.batch() as batch:
                    for i, channel in enumerate(channels):
                        if i % 2:
                            batch.diff(channel, "n", {"n": n})
                        else:
                            batch.event(channel, "n", {"n": n})
                for result in batch.results:
                    acked[result.channel].append(result.seq)
            except Exception as exc:  # recorded: the test fails on any
                errors.append(exc)
                return

    for channel in channels:
        publisher.diff(channel, "start", {"n": 0})
        acked[channel].append(1)
    thread = threading.Thread(target=publish)
    thread.start()
    time.sleep(0.3)
    moved = migrate_slot(redis_cluster, slot, target, pause=0.02)
    time.sleep(0.3)
    stop.set()
    thread.join(30)
    assert not errors, errors
    assert moved >= 2 * len(channels) + 1  # history and meta of every channel, the patches of half, the live stream
    assert redis_cluster.master_for_slot(slot).addr == target.addr
    for channel in channels:
        seqs = [m.seq for m in store.history(channel)]
        assert seqs == list(range(1, len(seqs) + 1)), channel  # in order, no hole, nothing doubled
        assert acked[channel] == seqs, channel  # every acknowledged publish is there exactly once
        assert len(seqs) > 10
    with target.client() as direct:
        assert direct.exists(store.live_key(shard)) == 1
    for i, channel in enumerate(channels):  # and the states, folded by compactions on both sides of the move
        last = len(acked[channel]) - 1 if i % 2 else 0
        assert store.snapshot(channel).state == {"n": last}  # type: ignore[union-attr]
    store.redis.close()


def test_bare_shard_tags_keep_an_old_single_node_layout(redis_server: EmbeddedRedis) -> None:
    settings = Settings(shard_tags="bare")
    client = connect(redis_server.url, settings)
    old = Store(client, settings)
    channel = channel_in_shard(3, "old")
    old.publish_many([Publisher(old).item(channel, "diff", "set", None, {"a": 1})])
    assert client.exists(f"rt:{{3}}:m:{channel}", "rt:{3}:live") == 2
    new = Store(client, Settings())
    assert new.live_key(3) == f"rt:{{{balanced_tags(16)[3]}}}:live" != old.live_key(3)
    assert new.snapshot(channel) is None  # the balanced layout does not see the old keys: a new epoch
    with pytest.raises(ValueError, match="SIDECAR_SHARD_TAGS"):
        Store(client, Settings(shard_tags="even"))
    client.close()
