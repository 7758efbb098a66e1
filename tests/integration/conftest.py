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


@pytest.fixture
def redis_cluster(tmp_path: Path) -> Iterator[RedisClusterNodes]:
    """A real Redis Cluster (tests/cluster.py): 3 masters with a replica each, every node stopped by its pid."""
    nodes = RedisClusterNodes(tmp_path / "cluster")
    try:
        yield nodes.start()
    finally:
        nodes.stop()


@pytest.fixture
def cluster_url(redis_cluster: RedisClusterNodes) -> str:
    """``redis+cluster://`` with the masters as seed nodes: what a deployment sets REDIS_URL to."""
    return "redis+cluster://" + ",".join(n.addr for n in redis_cluster.masters())
