"""The spine end to end: real redis-server, real sidecar processes, real sockets."""

from __future__ import annotations

import threading
import time

import pytest
import redis
import requests

from sidecar.config import Settings
from sidecar.core.protocol import shard_of
from sidecar.publish import Publisher
from tests.clients import SSEClient, WSClient
from tests.processes import FRONTS

# The spine on both fronts (sidecar/app.py + ws.py on gevent, sidecar/asgi/ on uvicorn): every test here is
# about the protocol a client sees, which both must give alike.
pytestmark = pytest.mark.parametrize("sidecar_process", FRONTS, indirect=True)


def channels_in_distinct_shards(prefix: str, n: int) -> list[str]:
    shards = Settings().shards
    found: dict[int, str] = {}
    i = 0
    while len(found) < n:
        name = f"{prefix}:{i}"
        found.setdefault(shard_of(name, shards), name)
        i += 1
    return sorted(found.values())


def seqs(frames: list[dict], channel: str) -> list[int]:
    return [f["seq"] for f in frames if f["type"] == "message" and f["channel"] == channel]


@pytest.fixture
def sidecar(shared_sidecar):
    return shared_sidecar


@pytest.fixture
def pub(request):
    """A publisher to the shared sidecar's Redis when the test takes `sidecar`, else to its own `redis_server`."""
    if "sidecar" in request.fixturenames:
        return Publisher.from_url(request.getfixturevalue("sidecar").redis_url)
    return Publisher.from_url(request.getfixturevalue("redis_server").url)


def test_sse_client_receives_messages_in_order_with_a_cursor(sidecar, pub):
    client = SSEClient(sidecar.url, ["orders:1"])
    client.wait(lambda f: any(x["_event"] == "ready" for x in f))
    for i in range(5):
        pub.diff("orders:1", "order-updated", {"n": i}, data={"i": i})
    client.wait(lambda f: len(seqs(f, "orders:1")) == 5)
    messages = client.messages("orders:1")
    assert [m["diff"] for m in messages] == [{"n": i} for i in range(5)]
    assert [m["data"] for m in messages] == [{"i": i} for i in range(5)]
    assert messages[-1]["_id"] == f"{messages[-1]['id']}~{messages[-1]['epoch']}"
    assert client.retry is not None and client.retry >= 2000
    client.close()


def sse_resume_by_cursor_alone(sidecar, pub, channels: list[str], missed: int) -> None:
    """Subscribe, take the cursor, leave, miss `missed` messages over `channels`, come back with Last-Event-ID
    alone: exactly the missed ones, each channel in order, none twice, no snapshot or reset."""
    first = SSEClient(sidecar.url, channels)
    first.wait(lambda f: first.last_id is not None)
    for channel in channels:
        pub.diff(channel, "before", {"phase": "before"})
    first.wait(lambda f: len(first.messages()) == len(channels))
    cursor = first.last_id
    first.close()

    for i in range(missed):
        pub.diff(channels[i % len(channels)], "missed", {"i": i})
    second = SSEClient(sidecar.url, channels, last_event_id=cursor)
    second.wait(lambda f: len(second.messages()) >= missed)
    time.sleep(0.3)  # anything extra (a duplicate) would arrive now
    got = second.messages()
    assert len(got) == missed
    assert len({(m["channel"], m["id"]) for m in got}) == missed  # stream ids are unique per channel, not across
    for n, channel in enumerate(channels):
        expected = list(range(n, missed, len(channels)))
        assert seqs(got, channel) == list(range(2, 2 + len(expected)))
        assert [m["diff"]["i"] for m in got if m["channel"] == channel] == expected
    assert not second.of_type("snapshot") and not second.of_type("reset")
    second.close()


def test_sse_resume_with_last_event_id_alone_covers_channels_in_three_shards(sidecar, pub):
    sse_resume_by_cursor_alone(sidecar, pub, channels_in_distinct_shards("resume", 3), 50)


def test_websocket_resume_with_since_gets_exactly_what_was_missed(sidecar, pub):
    channels = channels_in_distinct_shards("wsresume", 3)
    first = WSClient(sidecar.ws_url)
    for channel in channels:
        first.subscribe(channel)
    first.wait(lambda f: len(first.of_type("subscribed")) == 3)
    for channel in channels:
        pub.diff(channel, "before", {"phase": "before"})
    first.wait(lambda f: len(first.messages()) == 3)
    last = {m["channel"]: m for m in first.messages()}
    first.close()

    for i in range(50):
        pub.diff(channels[i % 3], "missed", {"i": i})
    second = WSClient(sidecar.ws_url)
    for channel in channels:
        second.subscribe(channel, since=last[channel]["id"], epoch=last[channel]["epoch"])
    second.wait(lambda f: len(second.messages()) >= 50)
    time.sleep(0.2)
    got = second.messages()
    assert len(got) == 50 and len({(m["channel"], m["id"]) for m in got}) == 50
    for n, channel in enumerate(channels):
        assert [m["diff"]["i"] for m in got if m["channel"] == channel] == list(range(n, 50, 3))
    second.close()


def test_subscribing_with_state_yields_a_snapshot_then_every_change(sidecar, pub):
    pub.state("board:1", "created", {"title": "Board", "cards": {}})
    pub.diff("board:1", "card-added", {"cards": {"c1": {"title": "one"}}})
    ws = WSClient(sidecar.ws_url)
    ws.subscribe("board:1")
    subscribed = ws.wait(lambda f: ws.of_type("subscribed"))[0]
    assert subscribed["state"] == {"title": "Board", "cards": {"c1": {"title": "one"}}}
    assert subscribed["seq"] == 2
    pub.diff("board:1", "card-added", {"cards": {"c2": {"title": "two"}}})
    ws.wait(lambda f: ws.messages())
    assert ws.messages()[0]["seq"] == 3 and ws.messages()[0]["diff"] == {"cards": {"c2": {"title": "two"}}}
    ws.close()


def test_resume_after_trim_sends_snapshot_for_state_channels_and_reset_for_event_channels(
    redis_server, sidecar_process
):
    sidecar = sidecar_process(redis_server.url, SIDECAR_HISTORY_LEN="5")
    pub = Publisher.from_url(redis_server.url, history_len=5)
    state_pos = pub.diff("trim:state", "changed", {"n": 0})
    event_pos = pub.event("trim:events", "happened", {"n": 0})
    for i in range(1, 20):
        pub.diff("trim:state", "changed", {"n": i})
        pub.event("trim:events", "happened", {"n": i})
    ws = WSClient(sidecar.ws_url)
    ws.subscribe("trim:state", since=state_pos.id, epoch=state_pos.epoch)
    ws.subscribe("trim:events", mode="event", since=event_pos.id, epoch=event_pos.epoch)
    ws.wait(lambda f: ws.of_type("snapshot") and ws.of_type("reset"))
    snapshot, reset = ws.of_type("snapshot")[0], ws.of_type("reset")[0]
    assert snapshot["channel"] == "trim:state" and snapshot["state"] == {"n": 19} and snapshot["seq"] == 20
    assert snapshot["reason"] == "gap"
    assert reset["channel"] == "trim:events" and reset["seq"] == 20 and reset["reason"] == "gap"
    assert not ws.messages()

    sse = SSEClient(sidecar.url, ["trim:events", "trim:state"], last_event_id=f"{event_pos.id}~{event_pos.epoch},"
                    f"{state_pos.id}~{state_pos.epoch}")  # fmt: skip
    sse.wait(lambda f: sse.of_type("snapshot") and sse.of_type("reset"))
    assert sse.of_type("snapshot")[0]["state"] == {"n": 19}
    ws.close()
    sse.close()


def test_resume_from_another_epoch_is_a_gap(sidecar, pub):
    pub.diff("epoch:1", "changed", {"n": 1})
    ws = WSClient(sidecar.ws_url)
    ws.subscribe("epoch:1", since="1-0", epoch="deadbeef")
    snapshot = ws.wait(lambda f: ws.of_type("snapshot"))[-1]
    assert snapshot["state"] == {"n": 1} and snapshot["epoch"] != "deadbeef"
    ws.close()


def test_four_modes_deliver_what_the_protocol_says_for_one_diff(sidecar, pub):
    pub.state("modes:1", "created", {"a": 1, "b": {"c": 2}})
    clients = {}
    for mode in ("poke", "state", "event", "diff"):
        clients[mode] = WSClient(sidecar.ws_url)
        clients[mode].subscribe("modes:1", mode=mode)
        clients[mode].wait(lambda f, c=clients[mode]: c.of_type("subscribed"))
    published = pub.diff("modes:1", "b-changed", {"b": {"c": None, "d": 3}}, data={"who": "me"})
    frames = {mode: c.wait(lambda f, c=c: c.messages()) and c.messages()[0] for mode, c in clients.items()}
    common = {"type": "message", "channel": "modes:1", "id": published.id, "seq": 2, "epoch": published.epoch,
              "event": "b-changed"}  # fmt: skip
    for mode, frame in frames.items():
        assert {k: frame[k] for k in common} == common, mode
        assert isinstance(frame["ts"], float)
    assert set(frames["poke"]) == set(common) | {"ts"}
    assert frames["event"]["data"] == {"who": "me"} and "diff" not in frames["event"]
    assert frames["diff"]["data"] == {"who": "me"} and frames["diff"]["diff"] == {"b": {"c": None, "d": 3}}
    assert frames["state"]["state"] == {"a": 1, "b": {"d": 3}} and "diff" not in frames["state"]
    assert clients["state"].of_type("subscribed")[0]["state"] == {"a": 1, "b": {"c": 2}}
    assert "state" not in clients["event"].of_type("subscribed")[0]
    for c in clients.values():
        c.close()


def test_client_resumes_on_a_second_sidecar_after_the_first_is_killed(redis_server, sidecar_process, pub):
    a, b = sidecar_process(redis_server.url), sidecar_process(redis_server.url)
    client = SSEClient(a.url, ["failover:1"])
    client.wait(lambda f: client.last_id is not None)
    for i in range(10):
        pub.diff("failover:1", "tick", {"i": i})
    client.wait(lambda f: len(client.messages()) == 10)
    cursor = client.last_id
    a.kill()
    client.closed.wait(5)
    for i in range(10, 30):
        pub.diff("failover:1", "tick", {"i": i})
    resumed = SSEClient(b.url, ["failover:1"], last_event_id=cursor)
    resumed.wait(lambda f: len(resumed.messages()) >= 20)
    for i in range(30, 35):
        pub.diff("failover:1", "tick", {"i": i})
    resumed.wait(lambda f: len(resumed.messages()) >= 25)
    time.sleep(0.2)
    all_seqs = seqs(client.frames, "failover:1") + seqs(resumed.frames, "failover:1")
    assert all_seqs == list(range(1, 36))
    resumed.close()


def test_redis_restart_during_publishing_loses_nothing(redis_server, sidecar_process):
    redis.Redis.from_url(redis_server.url).config_set("appendfsync", "always")  # an acked write is on disk
    sidecar = sidecar_process(redis_server.url)
    ws = WSClient(sidecar.ws_url)
    ws.subscribe("restart:1", mode="event")
    ws.wait(lambda f: ws.of_type("subscribed"))
    acked: list[int] = []
    stop = threading.Event()

    def publish() -> None:
        pub = Publisher.from_url(redis_server.url, redis_socket_timeout=1.0)
        i = 0
        while not stop.is_set() and i < 400:
            try:
                pub.event("restart:1", "tick", {"i": i})
                acked.append(i)
            except redis.RedisError:
                time.sleep(0.05)  # the same i again: a publish that failed may or may not have landed
                continue
            i += 1
            time.sleep(0.005)

    thread = threading.Thread(target=publish)
    thread.start()
    try:
        ws.wait(lambda f: len(ws.messages()) >= 50, timeout=20)
        redis_server.kill()
        time.sleep(0.5)
        redis_server.restart()
        redis.Redis.from_url(redis_server.url).config_set("appendfsync", "always")
        thread.join(timeout=60)
    finally:
        stop.set()
        thread.join()
    assert len(acked) == 400
    ws.wait(lambda f: {m["data"]["i"] for m in ws.messages()} >= set(acked), timeout=20)
    got = [m["data"]["i"] for m in ws.messages()]
    assert got == sorted(got)  # in order, and no message delivered twice
    assert seqs(ws.frames, "restart:1") == list(range(1, len(got) + 1))  # no hole in seq either
    ws.close()


def test_healthz_is_ready_only_while_redis_answers_and_the_reader_runs(redis_server, sidecar_process):
    sidecar = sidecar_process(redis_server.url)
    assert requests.get(sidecar.url + "/healthz", timeout=5).json()["ok"] is True
    redis_server.kill()
    deadline = time.monotonic() + 15
    while requests.get(sidecar.url + "/healthz", timeout=15).status_code != 503:
        assert time.monotonic() < deadline, "healthz still says ready with Redis gone"
        time.sleep(0.1)
    redis_server.restart()
    deadline = time.monotonic() + 15
    while requests.get(sidecar.url + "/healthz", timeout=15).status_code != 200:
        assert time.monotonic() < deadline, "healthz did not recover with Redis back"
        time.sleep(0.1)
