"""Fixtures for tests against a real Redis (the process fixtures are in ``tests/conftest.py``)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from tests.processes import EmbeddedRedis


@pytest.fixture
def redis_client(redis_server: EmbeddedRedis) -> Iterator[redis.Redis]:
    """A client of ``redis_server`` (bytes replies), closed at teardown."""
    client = redis.Redis.from_url(redis_server.url)
    try:
        yield client
    finally:
        client.close()
