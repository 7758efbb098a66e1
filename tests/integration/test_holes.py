"""Never a silent hole: messages lost before the relay saw them, and messages it cannot dispatch, end up as a
snapshot/reset for their channel's subscribers; nothing else is lost with them. Real Redis, real sidecars."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import orjson
import pytest
import redis
import requests

from sidecar.config import Settings
from sidecar.core import merge
from sidecar.core.protocol import shard_of
from sidecar.publish import Publisher, PublishError
from sidecar.store import Store
from tests.clients import Recorder, SSEClient, WSClient
from tests.processes import SidecarProcess

LIVE_LEN = 100
BLOCK_MS = 200


def same_shard(channel: str, prefix: str) -> str:
    shards = Settings().shards
    shard = shard_of(channel, shards)
    return next(f"{prefix}:{i}" for i in range(10_000) if shard_of(f"{prefix}:{i}", shards) == shard)


def nested(depth: int) -> Any:
    """An object `depth` objects deep."""
    value: Any = 1
    for _ in range(depth):
        value = {"a": value}
    return value


def of(client: Recorder, channel: str) -> list[tuple[str, int, Any]]:
    """(type, seq, reason) of every message/snapshot/reset frame of `channel`."""
    kinds = ("message", "snapshot", "reset")
    frames = [f for f in client.frames if f["type"] in kinds and f["channel"] == channel]
    return [(f["type"], f["seq"], f.get("reason")) for f in frames]


def wait_for(client: Recorder, channel: str, frame: tuple[str, int, Any]) -> None:
    client.wait(lambda _: frame in of(client, channel))


def snapshots(client: Recorder, channel: str) -> list[dict]:
    return [f for f in client.frames if f["type"] == "snapshot" and f["channel"] == channel]


@contextmanager
def stopped(sidecar: SidecarProcess) -> Iterator[None]:
    """The sidecar frozen (SIGSTOP) for the block: its pending blocking read times out first, so whatever is
    published meanwhile waits in Redis for its next read."""
    os.kill(sidecar.pid, signal.SIGSTOP)
    try:
        time.sleep(3 * BLOCK_MS / 1000)
        yield
    finally:
        os.kill(sidecar.pid, signal.SIGCONT)


@pytest.fixture
def sidecar(redis_server, sidecar_process) -> SidecarProcess:
    return sidecar_process(redis_server.url, SIDECAR_LIVE_LEN=str(LIVE_LEN), SIDECAR_READ_BLOCK_MS=str(BLOCK_MS))


@pytest.fixture
def pub(redis_server) -> Iterator[Publisher]:
    with Publisher.from_url(redis_server.url, live_len=LIVE_LEN) as publisher:
        yield publisher


def test_a_diff_nested_deeper_than_the_merge_allows_is_refused_at_publish(sidecar, pub):
    too_deep = {"channel": "deep:1", "event": "e", "changes": nested(merge.MAX_DEPTH + 1)}
    response = requests.post(sidecar.url + "/publish", json=too_deep, timeout=5)
    assert response.status_code == 400
    assert response.json() == {"error": "bad-change", "message": "changes nest more than 64 levels deep"}
    batch = {"messages": [{"channel": "deep:1", "event": "e", "changes": {"ok": 1}}, too_deep]}
    assert requests.post(sidecar.url + "/publish", json=batch, timeout=5).json()["message"].startswith("message 1: ")
    with pytest.raises(PublishError, match="levels deep"):
        pub.diff("deep:1", "e", nested(merge.MAX_DEPTH + 1))  # what Celery tasks call
    assert pub.snapshot("deep:1") is None  # nothing was published
    ok = requests.post(sidecar.url + "/publish", json={**too_deep, "changes": nested(merge.MAX_DEPTH)}, timeout=5)
    assert ok.status_code == 200


def publish_raw(redis_url: str, items: list[tuple[str, str, bytes]]) -> None:
    """Publish the way a publisher from before the depth check did: the store's script, unvalidated."""
    store = Store(redis.Redis.from_url(redis_url), Settings(live_len=LIVE_LEN))
    try:
        store.publish_many([(channel, "diff", "e", None, change, time.time() * 1000) for channel, _, change in items])
    finally:
        store.redis.close()


def test_state_reads_of_a_channel_holding_an_over_deep_patch_skip_that_patch(redis_server, sidecar):
    deep = orjson.dumps(nested(merge.MAX_DEPTH + 1))
    publish_raw(redis_server.url, [("bad:1", "", b'{"ok": 1}'), ("bad:1", "", deep), ("bad:1", "", b'{"after": 2}')])
    state = requests.get(sidecar.url + "/channels/bad:1/state", timeout=5)
    assert state.status_code == 200 and state.json()["state"] == {"ok": 1, "after": 2} and state.json()["seq"] == 3
    sse = SSEClient(sidecar.url, ["bad:1"])
    assert sse.status == 200
    sse.wait(lambda f: any(x["type"] == "ready" for x in f))
    assert [f["state"] for f in snapshots(sse, "bad:1")] == [{"ok": 1, "after": 2}]
    ws = WSClient(sidecar.ws_url)
    ws.subscribe("fine:1", mode="event")
    ws.subscribe("bad:1")
    ws.wait(lambda f: len(ws.of_type("subscribed")) == 2)
    assert ws.of_type("subscribed")[1]["state"] == {"ok": 1, "after": 2}
    requests.post(sidecar.url + "/publish", json={"channel": "fine:1", "event": "still-here"}, timeout=5)
    ws.wait(lambda f: len(ws.messages("fine:1")) == 1)  # the socket's other subscription lives on
    assert sidecar.log_text().count("bad:1: skipped a pending patch") == 1
    sse.close()
    ws.close()
