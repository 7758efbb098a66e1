"""WAIT for replicas after a publish, on a real 3+3 Redis Cluster (tests/cluster.py).

Replication is asynchronous: a master killed right after it acknowledged a publish may take it along. `wait=N`
(and SIDECAR_PUBLISH_WAIT_REPLICAS for the Celery hooks' outcomes) ends the publish with `WAIT N timeout` on the
master that ran it, so an acknowledged publish is on a replica too; a shortfall is reported, never raised.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator

import pytest
from celery import Celery

from sidecar.celery_hooks import task_channel
from sidecar.config import Settings
from sidecar.core.protocol import shard_of
from sidecar.core.slots import balanced_tags, key_slot
from sidecar.publish import Published, Publisher
from sidecar.store import Store, connect
from tests.cluster import ClusterNode, RedisClusterNodes
from tests.processes import EmbeddedRedis, WorkerProcess

pytestmark = pytest.mark.slow

SETTINGS = Settings(publish_wait_timeout_ms=5000)


def master_and_replica(cluster: RedisClusterNodes, channel: str) -> tuple[ClusterNode, ClusterNode]:
    slot = key_slot(f"rt:{{{balanced_tags(SETTINGS.shards)[shard_of(channel, SETTINGS.shards)]}}}:live")
    master = cluster.master_for_slot(slot)
    return master, cluster.replica_of(master)


@pytest.fixture
def publisher(cluster_url: str) -> Iterator[Publisher]:
    pub = Publisher(Store(connect(cluster_url, SETTINGS), SETTINGS))
    yield pub
    pub.close()


def test_with_wait_1_an_acknowledged_publish_survives_a_kill_of_its_master_right_after(
    redis_cluster: RedisClusterNodes, cluster_url: str, publisher: Publisher
) -> None:
    channel = "task:durable"
    publisher.diff(channel, "task-started", {"status": "STARTED"})
    master, replica = master_and_replica(redis_cluster, channel)
    replica.pause()  # replication stalls: without WAIT the publish below would be acknowledged at once
    done: list[Published] = []
    thread = threading.Thread(
        target=lambda: done.append(publisher.diff(channel, "task-succeeded", {"status": "SUCCESS"}, wait=1))
    )
    try:
        thread.start()
        time.sleep(0.5)  # well under the cluster's node timeout (2 s): nobody fails over
        assert not done, "the publish returned before any replica had it"
    finally:
        replica.resume()
    thread.join(10)
    assert done and done[0].replicas == 1 and done[0].seq == 2
    master.kill()  # right after the ack
    redis_cluster.wait_promoted(master)
    after = Store(connect(cluster_url, SETTINGS), SETTINGS)
    try:
        snap = after.snapshot(channel)
        assert snap is not None and snap.state == {"status": "SUCCESS"} and snap.seq == 2
        assert [m.event for m in after.history(channel)] == ["task-started", "task-succeeded"]
    finally:
        after.redis.close()
    assert publisher.store.wait_shortfalls == 0


def test_a_wait_shortfall_is_logged_and_counted_and_the_message_is_still_published(
    redis_cluster: RedisClusterNodes, cluster_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    settings = SETTINGS.replace(publish_wait_timeout_ms=200)
    pub = Publisher(Store(connect(cluster_url, settings), settings))
    channel = "task:hinted"
    pub.event(channel, "first")
    _, replica = master_and_replica(redis_cluster, channel)
    replica.pause()
    try:
        with caplog.at_level(logging.WARNING, logger="sidecar.store"):
            t0 = time.monotonic()
            published = pub.event(channel, "second", wait=1)
            waited = time.monotonic() - t0
    finally:
        replica.resume()
    assert published.replicas == 0 and published.seq == 2  # published all the same: a hint, not a transaction
    assert waited >= 0.2  # WAIT held the reply for its timeout
    assert pub.store.wait_shortfalls == 1
    assert any("WAIT 1: 0 replica(s)" in r.getMessage() and channel in r.getMessage() for r in caplog.records)
    assert [m.event for m in pub.store.history(channel)] == ["first", "second"]
    assert pub.event(channel, "third").replicas is None  # no WAIT asked, none sent
    pub.close()


def test_the_celery_hooks_wait_for_replicas_on_outcomes_when_set(
    redis_cluster: RedisClusterNodes,
    cluster_url: str,
    redis_server: EmbeddedRedis,
    celery_client: Celery,
    celery_worker: Callable[..., WorkerProcess],
) -> None:
    worker = celery_worker(
        cluster_url,
        CELERY_BROKER_URL=redis_server.url,
        SIDECAR_PUBLISH_WAIT_REPLICAS="1",
        SIDECAR_PUBLISH_WAIT_TIMEOUT_MS="300",
    )
    task_id = str(uuid.uuid4())
    _, replica = master_and_replica(redis_cluster, task_channel(task_id))
    store = Store(connect(cluster_url, SETTINGS), SETTINGS)

    def shortfalls() -> list[str]:
        return [line for line in worker.log_text().splitlines() if "WAIT 1: 0 replica(s)" in line]

    replica.pause()  # the outcome's WAIT falls short: logged by the worker, the outcome still published
    try:
        result = celery_client.send_task("tasks.jobs.report", kwargs={"user_id": 3, "steps": 1}, task_id=task_id)
        assert result.get(timeout=20)["rows"] == 100
        # The outcome is visible on the master before its WAIT returns: keep the replica paused until then.
        deadline = time.monotonic() + 10
        while not shortfalls():
            assert time.monotonic() < deadline, worker.log_tail(40)
            time.sleep(0.05)
    finally:
        replica.resume()
    try:
        snap = store.snapshot(task_channel(task_id))
        assert snap is not None and snap.state["status"] == "SUCCESS"  # published all the same
        assert [m.event for m in store.history(task_channel(task_id))][-1] == "task-succeeded"
    finally:
        store.redis.close()
    assert len(shortfalls()) == 1 and task_channel(task_id) in shortfalls()[0]  # the outcome only


def test_on_a_single_redis_without_replicas_wait_times_out_as_a_shortfall(redis_server: EmbeddedRedis) -> None:
    settings = Settings(redis_url=redis_server.url, publish_wait_timeout_ms=50)
    pub = Publisher.from_settings(settings)
    try:
        published = pub.diff("task:alone", "task-succeeded", {"status": "SUCCESS"}, wait=1)
        assert published.replicas == 0 and published.seq == 1  # published: WAIT only hints at durability
        assert pub.store.wait_shortfalls == 1
        assert pub.diff("task:alone", "task-succeeded", {"n": 1}).replicas is None
    finally:
        pub.close()
