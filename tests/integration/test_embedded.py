"""The embedded redis-server: AOF survives a crash, stop() leaves no process, ports don't collide."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import redis

from sidecar.embedded import EmbeddedRedis


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_killed_server_restarts_with_its_data_and_stop_leaves_no_process(redis_server: EmbeddedRedis) -> None:
    with redis.Redis.from_url(redis_server.url) as client:
        client.set("greeting", "hello")
    first_pid = redis_server.pid
    assert first_pid is not None

    redis_server.kill()
    assert not _alive(first_pid)

    redis_server.restart()
    assert redis_server.pid != first_pid
    with redis.Redis.from_url(redis_server.url) as client:
        assert client.get("greeting") == b"hello"

    pid = redis_server.pid
    assert pid is not None
    redis_server.stop()
    redis_server.stop()  # idempotent
    assert not redis_server.running
    assert not _alive(pid)


def test_two_servers_get_different_ports(tmp_path: Path) -> None:
    with EmbeddedRedis(tmp_path / "a") as a, EmbeddedRedis(tmp_path / "b") as b:
        assert a.port != b.port
        assert a.url != b.url
        for server in (a, b):
            with redis.Redis.from_url(server.url) as client:
                assert client.ping()


def test_start_on_a_taken_port_fails_with_the_log_tail(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        server = EmbeddedRedis(tmp_path / "redis", port=taken.getsockname()[1])
        with pytest.raises(RuntimeError, match="redis-server exited"):
            server.start()
    assert not server.running
