"""Fixtures for tests against a real Redis (the process fixtures are in ``tests/conftest.py``)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from celery import Celery

from tests.cluster import RedisClusterNodes
from tests.processes import EmbeddedRedis


@pytest.fixture
def redis_client(redis_server: EmbeddedRedis) -> Iterator[redis.Redis]:
    """A client of ``redis_server`` (bytes replies), closed at teardown."""
    client = redis.Redis.from_url(redis_server.url)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def celery_client(redis_server: EmbeddedRedis) -> Iterator[Celery]:
    """A Celery app that sends tasks to (and reads results from) ``redis_server``: pair it with ``celery_worker``."""
    client = Celery("tests-client", broker=redis_server.url, backend=redis_server.url, set_as_current=False)
    client.conf.update(task_serializer="json", result_serializer="json", accept_content=["json"])
    try:
        yield client
    finally:
        client.close()


def cluster_layout(nodes: RedisClusterNodes) -> tuple[object, ...] | None:
    """What a test could have changed in a cluster but its data: the slot ranges and their masters, each node's
    role and configuration; None if a node is down, paused (it does not answer), failing or not yet linked."""
    if not all(n.server.running for n in nodes.nodes):
        return None
    try:
        nodes.wait_ok(1.0)
        flags = [str(n.command("CLUSTER", "NODES")) for n in nodes.nodes]
        if any("fail" in f for f in flags):
            return None
        roles = tuple(n.role() for n in nodes.nodes)
        config = tuple(tuple(sorted(n.client().config_get("*").items())) for n in nodes.nodes)
        return tuple(nodes.slot_ranges()), roles, config
    except (RuntimeError, redis.RedisError):
        return None


SPARE_CLUSTERS: list[tuple[RedisClusterNodes, tuple[object, ...]]] = []


@pytest.fixture(scope="session")
def _spare_clusters() -> Iterator[list[tuple[RedisClusterNodes, tuple[object, ...]]]]:
    yield SPARE_CLUSTERS
    while SPARE_CLUSTERS:
        SPARE_CLUSTERS.pop()[0].stop()


@pytest.fixture
def redis_cluster(tmp_path: Path, _spare_clusters: list) -> Iterator[RedisClusterNodes]:
    """A real Redis Cluster (tests/cluster.py): 3 masters with a replica each, every node stopped by its pid.

    Empty and as started, but not always new: a cluster that a test left as it found it (no node killed,
    paused or failed over, no slot moved, no setting changed; its data aside) is emptied (FLUSHALL, replicated
    with WAIT; CONFIG RESETSTAT) and handed to the next test, saving a cluster start (~2.5 s)."""
    if _spare_clusters:
        nodes, layout = _spare_clusters.pop()
    else:
        nodes = RedisClusterNodes(tmp_path / "cluster").start()
        layout = cluster_layout(nodes)
    try:
        yield nodes
    finally:
        if layout is not None and cluster_layout(nodes) == layout and _emptied(nodes):
            _spare_clusters.append((nodes, layout))
        else:
            nodes.stop()


def _emptied(nodes: RedisClusterNodes) -> bool:
    try:
        for master in nodes.masters():
            with master.client(timeout=5.0) as client:
                client.flushall()
                client.script_flush()
                if client.execute_command("WAIT", 1, 5000) != 1:
                    return False
        for node in nodes.nodes:
            node.command("CONFIG", "RESETSTAT")
        return all(n.command("DBSIZE") == 0 for n in nodes.nodes)
    except redis.RedisError:
        return False


@pytest.fixture
def cluster_url(redis_cluster: RedisClusterNodes) -> str:
    """``redis+cluster://`` with the masters as seed nodes: what a deployment sets REDIS_URL to."""
    return "redis+cluster://" + ",".join(n.addr for n in redis_cluster.masters())
