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
from prometheus_client.parser import text_string_to_metric_families

from sidecar.config import Settings
from sidecar.core import merge
from sidecar.core.protocol import Position, shard_of
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


def test_subscribers_of_a_channel_trimmed_past_a_stalled_reader_get_its_final_state_at_once(sidecar, pub, redis_client):
    a = "job:final"
    pub.diff(a, "started", {"status": "running"})
    sse = SSEClient(sidecar.url, [a])
    ws = WSClient(sidecar.ws_url)
    ws.subscribe(a)
    events = WSClient(sidecar.ws_url)
    events.subscribe(a, mode="event")
    sse.wait(lambda f: any(x["type"] == "ready" for x in f))
    for client in (ws, events):
        client.wait(lambda f: any(x["type"] == "subscribed" for x in f))

    with stopped(sidecar):
        final = pub.diff(a, "finished", {"status": "done"})
        other = same_shard(a, "noise")
        with pub.batch() as batch:
            for i in range(5 * LIVE_LEN):
                batch.event(other, "tick", {"i": i})
        live = Store(redis_client, Settings()).keys(a).live
        assert redis_client.xrange(live, min=final.id, max=final.id) == []  # the reader can no longer read it

    for client in (sse, ws):  # A's final state, without waiting for A to publish again
        wait_for(client, a, ("snapshot", 2, "gap"))
        snapshot = snapshots(client, a)[-1]
        assert snapshot["state"] == {"status": "done"} and snapshot["id"] == final.id
    wait_for(events, a, ("reset", 2, "gap"))

    pub.diff(a, "archived", {"status": "archived"})
    for client in (sse, ws, events):
        wait_for(client, a, ("message", 3, None))
    assert of(sse, a) == [("snapshot", 1, None), ("snapshot", 2, "gap"), ("message", 3, None)]
    assert of(ws, a) == [("snapshot", 2, "gap"), ("message", 3, None)]  # WS: the first state came in `subscribed`
    assert of(events, a) == [("reset", 2, "gap"), ("message", 3, None)]
    assert "shard" in sidecar.log_text() and "resynchronising" in sidecar.log_text()
    for client in (sse, ws, events):
        client.close()


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


def test_a_message_that_cannot_be_dispatched_costs_no_other_message_of_its_batch(redis_server, sidecar, redis_client):
    poisoned = ["bad:2", same_shard("bad:2", "bad-too")]
    bystander = same_shard(poisoned[0], "bystander")
    publish_raw(redis_server.url, [(c, "", b'{"ok": 1}') for c in poisoned] + [(bystander, "", b'{"n": 0}')])
    watcher = WSClient(sidecar.ws_url)
    for channel in poisoned:
        watcher.subscribe(channel, mode="state")  # the hub keeps these channels' state: it applies each patch
    other = SSEClient(sidecar.url, [bystander])
    watcher.wait(lambda f: len(watcher.of_type("subscribed")) == 2)
    other.wait(lambda f: any(x["type"] == "ready" for x in f))
    deep = orjson.dumps(nested(merge.MAX_DEPTH + 1))
    with stopped(sidecar):  # so that the reader gets all of it in one read
        items = [(bystander, "", b'{"n": 1}')] + [(c, "", deep) for c in poisoned]
        publish_raw(redis_server.url, items + [(bystander, "", b'{"n": %d}' % i) for i in range(2, 16)])
        live = Store(redis_client, Settings()).keys(bystander).live
        redis_client.xadd(live, {"junk": "not a message"})  # a foreign writer's entry
        publish_raw(redis_server.url, [(bystander, "", b'{"n": %d}' % i) for i in range(16, 32)])
    other.wait(lambda f: len(other.messages(bystander)) == 31)
    assert [m["seq"] for m in other.messages(bystander)] == list(range(2, 33))
    for channel in poisoned:  # they did not get the message: they are told so, with the state as Redis folds it
        wait_for(watcher, channel, ("snapshot", 2, "gap"))
        assert watcher.messages(channel) == [] and [f["state"] for f in snapshots(watcher, channel)] == [{"ok": 1}]
    metrics = text_string_to_metric_families(requests.get(sidecar.url + "/metrics", timeout=5).text)
    errors = next(f for f in metrics if f.name == "sidecar_dispatch_errors")
    assert [s.value for s in errors.samples if s.name.endswith("_total")] == [3]
    log = sidecar.log_text()
    assert log.count("MergeError") == 1 and log.count("KeyError") == 1  # once per cause, however many
    watcher.close()
    other.close()


def test_resuming_from_the_newest_trimmed_position_is_no_gap_when_the_rest_is_in_history(redis_server):
    settings = Settings(redis_url=redis_server.url, history_len=5)
    with Publisher.from_settings(settings) as pub:
        published = [pub.diff("short:1", "e", {"n": i}) for i in range(1, 11)]  # history keeps seq 6 to 10
        store = pub.store
        newest_trimmed = Position(published[4].id, published[4].epoch)
        caught = store.catch_up("short:1", newest_trimmed)
        assert not caught.gap and [m.seq for m in caught.messages] == [6, 7, 8, 9, 10]
        caught = store.catch_up("short:1", Position(published[4].id, ""))  # no epoch given: no epoch check
        assert not caught.gap and [m.seq for m in caught.messages] == [6, 7, 8, 9, 10]
        lost_one = store.catch_up("short:1", Position(published[3].id, published[3].epoch))  # seq 5 is gone
        assert lost_one.gap and lost_one.messages == []
