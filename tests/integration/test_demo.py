"""`sidecar demo` as a user runs it (a subprocess in its own process group, as a terminal starts it), and a relay
that stops cleanly saying so in its last stats record."""

from __future__ import annotations

import time

import redis

from dashboard.sources import parse_record


def last_record(url: str, replica_pid: int):
    client = redis.Redis.from_url(url)
    try:
        records = [parse_record(i, f) for i, f in client.xrange("rt:stats")]
    finally:
        client.close()
    return [r for r in records if r is not None and r.pid == replica_pid][-1]


def test_a_relay_that_stops_cleanly_says_so_in_its_last_stats_record(redis_server, sidecar_process):
    sidecar = sidecar_process(redis_server.url, SIDECAR_STATS_INTERVAL="0.2")
    time.sleep(0.5)
    assert not last_record(redis_server.url, sidecar.pid).stopped
    sidecar.stop()  # SIGTERM: a clean stop
    last = last_record(redis_server.url, sidecar.pid)
    assert last.stopped
