"""SIDECAR_READ_LINGER_MS: fewer, fuller XREAD calls, and still every message once, in order."""

from __future__ import annotations

import time

import redis

from sidecar.publish import Publisher
from tests.clients import SSEClient


def xread_calls(client: redis.Redis) -> int:
    return int(client.info("commandstats").get("cmdstat_xread", {}).get("calls", 0))


def test_a_read_linger_gathers_publishes_into_fewer_reads_and_loses_nothing(redis_server, sidecar_process):
    sidecar = sidecar_process(redis_server.url, SIDECAR_READ_LINGER_MS="50")
    client = SSEClient(sidecar.url, ["linger:1"])
    client.wait(lambda f: client.last_id is not None)
    stats = redis.Redis.from_url(redis_server.url)
    pub = Publisher.from_url(redis_server.url)
    before = xread_calls(stats)
    for n in range(100):  # one publish every ~3 ms: without a linger, about one read per publish
        pub.event("linger:1", "tick", {"n": n})
        time.sleep(0.003)
    client.wait(lambda f: len(client.messages()) == 100)
    calls = xread_calls(stats) - before
    assert [m["data"]["n"] for m in client.messages()] == list(range(100))
    assert calls < 40, calls  # ~0.4 s of publishing in reads of 50 ms: about 8 (plus the stats and policy reads)
    client.close()
    stats.close()
