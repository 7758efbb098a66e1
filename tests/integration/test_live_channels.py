"""SIDECAR_LIVE_READ=channels on one node: the spine's guarantees over pub/sub, a replica that receives only its
clients' channels, and the checks that keep pub/sub's at-most-once from ever being a silent hole."""

from __future__ import annotations

import threading
import time

import pytest
import requests

from sidecar.config import Settings
from sidecar.publish import Publisher
from sidecar.store import Store, connect
from tests.clients import WSClient
from tests.integration import test_relay as spine
from tests.integration.test_metrics import scrape
from tests.integration.test_relay import (  # noqa: F401  (the spine's own tests, run here in channels mode)
    seqs,
    test_client_resumes_on_a_second_sidecar_after_the_first_is_killed,
    test_four_modes_deliver_what_the_protocol_says_for_one_diff,
    test_healthz_is_ready_only_while_redis_answers_and_the_reader_runs,
    test_redis_restart_during_publishing_loses_nothing,
    test_resume_after_trim_sends_snapshot_for_state_channels_and_reset_for_event_channels,
    test_resume_from_another_epoch_is_a_gap,
    test_sse_client_receives_messages_in_order_with_a_cursor,
    test_sse_resume_with_last_event_id_alone_covers_channels_in_three_shards,
    test_subscribing_with_state_yields_a_snapshot_then_every_change,
    test_websocket_resume_with_since_gets_exactly_what_was_missed,
)
from tests.processes import FRONTS

CHANNELS = {"SIDECAR_LIVE_READ": "channels", "SIDECAR_READER_STALL": "1"}
sidecar, pub = spine.sidecar, spine.pub  # the spine's fixtures, by these names


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Every test with a sidecar runs on both fronts (the reader's loops hand the hub its messages through the
    runtime: direct on gevent, call_soon_threadsafe on asyncio)."""
    if "sidecar_process" in metafunc.fixturenames:
        metafunc.parametrize("sidecar_process", FRONTS, indirect=True)


@pytest.fixture
def sidecar_process(sidecar_process):
    """The conftest factory, every sidecar in channels mode with a 1 s position check."""

    def start(redis_url: str, **env: str):
        return sidecar_process(redis_url, **{**CHANNELS, **env})

    return start


def read_count(url: str) -> float:
    return scrape(url)[("sidecar_messages_read_total", ())]


def events(ws: WSClient, channel: str) -> list[int]:
    return [m["data"]["i"] for m in ws.messages() if m["channel"] == channel]


def test_a_replica_decodes_only_the_channels_its_clients_want(redis_server, sidecar_process, pub):
    a, b = sidecar_process(redis_server.url), sidecar_process(redis_server.url)
    wa, wb = WSClient(a.ws_url), WSClient(b.ws_url)
    wa.subscribe("only:a", mode="event")
    wb.subscribe("only:b", mode="event")
    wa.wait(lambda f: wa.of_type("subscribed"))
    wb.wait(lambda f: wb.of_type("subscribed"))
    time.sleep(0.5)  # the subscriptions confirmed and caught up (nothing to catch up: no message yet)
    with pub.batch() as batch:
        for i in range(200):
            batch.event("only:b", "tick", {"i": i})
            batch.event("only:nobody", "tick", {"i": i})
            if i < 20:
                batch.event("only:a", "tick", {"i": i})
    wa.wait(lambda f: len(wa.messages()) == 20)
    wb.wait(lambda f: len(wb.messages()) == 200)
    time.sleep(1.5)  # a position check round: it must not read anything more either
    assert events(wa, "only:a") == list(range(20)) and events(wb, "only:b") == list(range(200))
    # Every replica would have decoded all 420 in shards mode; here each decodes its own (a check that raced a
    # message may read it once more from history: the hub drops it).
    assert 20 <= read_count(a.url) <= 25
    assert 200 <= read_count(b.url) <= 210
    wa.close()
    wb.close()


def test_pubsub_connections_killed_while_publishing_lose_nothing_and_double_nothing(
    redis_server, sidecar_process, redis_client
):
    sidecar = sidecar_process(redis_server.url)
    clients = [WSClient(sidecar.ws_url) for _ in range(2)]
    for ws in clients:
        ws.subscribe("kill:1", mode="event")
        ws.wait(lambda f, ws=ws: ws.of_type("subscribed"))
    stop = threading.Event()

    def publish() -> None:
        with Publisher.from_url(redis_server.url) as p:
            for i in range(400):
                if stop.is_set():
                    return
                p.event("kill:1", "tick", {"i": i})
                time.sleep(0.004)

    thread = threading.Thread(target=publish)
    thread.start()
    killed = 0
    try:
        for _ in range(5):
            time.sleep(0.3)
            killed += int(redis_client.execute_command("CLIENT", "KILL", "TYPE", "pubsub"))
        thread.join(timeout=30)
    finally:
        stop.set()
        thread.join()
    assert killed >= 5
    for ws in clients:
        ws.wait(lambda f, ws=ws: len(ws.messages()) >= 400, timeout=15)
        time.sleep(0.3)
        assert events(ws, "kill:1") == list(range(400))  # every one, in order, none twice
        assert seqs(ws.frames, "kill:1") == list(range(1, 401))
        assert not ws.of_type("reset") and not ws.of_type("snapshot")
        ws.close()


def test_publishes_racing_a_subscribe_are_each_delivered_once_or_covered_by_its_snapshot(
    redis_server, sidecar_process, pub
):
    # No position check within the test (30 s): the catch-up after Redis confirms each SUBSCRIBE must do it.
    ws = WSClient(sidecar_process(redis_server.url, SIDECAR_READER_STALL="30").ws_url)
    channels = [f"race:{i}" for i in range(20)]
    for channel in channels:  # no wait for `subscribed`: the SUBSCRIBE reaches Redis around these publishes
        ws.subscribe(channel, mode="event")
        for i in range(3):
            pub.event(channel, "tick", {"i": i})
    ws.wait(lambda f: len(ws.of_type("subscribed")) == 20)
    start = {f["channel"]: f["seq"] for f in ws.of_type("subscribed")}
    ws.wait(lambda f: all(seqs(ws.frames, c)[-1:] == [3] or start[c] == 3 for c in channels), timeout=10)
    time.sleep(0.3)
    for channel in channels:  # what came after the subscription point, each once, in order, and no reset
        assert seqs(ws.frames, channel) == list(range(start[channel] + 1, 4)), channel
    assert not ws.of_type("reset")
    ws.close()


def publish_without_notification(url: str, channel: str, data: bytes) -> None:
    """A real publish whose PUBLISH reaches no subscriber (an older publisher's script, or a message pub/sub
    dropped): the entry is in the channel's history and meta, and no live message tells anyone."""
    settings = Settings(redis_url=url)
    store = Store(connect(url, settings), settings)
    keys, args = store.publish_args(channel, "event", "tick", data, None, time.time())
    args[-1] = f"{settings.key_prefix}:nowhere"
    store.redis.evalsha(store._publish.sha, len(keys), *keys, *args)


def test_a_last_message_pubsub_never_delivered_is_recovered_by_the_position_check(redis_server, sidecar_process, pub):
    sidecar = sidecar_process(redis_server.url)
    ws = WSClient(sidecar.ws_url)
    ws.subscribe("quiet:1", mode="event")
    ws.wait(lambda f: ws.of_type("subscribed"))
    pub.event("quiet:1", "tick", {"i": 0})
    ws.wait(lambda f: len(ws.messages()) == 1)
    publish_without_notification(redis_server.url, "quiet:1", b'{"i": 1}')
    publish_without_notification(redis_server.url, "quiet:1", b'{"i": 2}')
    ws.wait(lambda f: len(ws.messages()) == 3, timeout=5)  # within a check round (1 s here), no other publish
    assert events(ws, "quiet:1") == [0, 1, 2] and seqs(ws.frames, "quiet:1") == [1, 2, 3]
    assert not ws.of_type("reset")
    ws.close()


def test_a_channel_whose_history_lost_what_was_delivered_is_reset_without_another_publish(
    redis_server, sidecar_process, pub, redis_client
):
    sidecar = sidecar_process(redis_server.url)
    ws = WSClient(sidecar.ws_url)
    ws.subscribe("lossy:1", mode="event")
    ws.wait(lambda f: ws.of_type("subscribed"))
    for i in range(3):
        pub.event("lossy:1", "tick", {"i": i})
    ws.wait(lambda f: len(ws.messages()) == 3)
    # What a promoted replica that lacked the newest entries looks like: the channel is one message back.
    store = Store(connect(redis_server.url, Settings()), Settings())
    keys = store.keys("lossy:1")
    second = redis_client.xrange(keys.history)[1][0]
    redis_client.xtrim(keys.history, maxlen=0)
    redis_client.hset(keys.meta, mapping={"id": second, "seq": 2})
    reset = ws.wait(lambda f: ws.of_type("reset"), timeout=5)[-1]
    assert reset["seq"] == 2 and reset["reason"] == "gap"
    ws.close()


def test_healthz_says_why_while_the_pubsub_connection_is_down(redis_server, sidecar_process):
    sidecar = sidecar_process(redis_server.url)
    redis_server.kill()
    deadline = time.monotonic() + 10
    while (response := requests.get(sidecar.url + "/healthz", timeout=15)).status_code != 503:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    deadline = time.monotonic() + 10
    while "pub/sub" not in response.json().get("reason", ""):
        assert time.monotonic() < deadline, response.json()
        time.sleep(0.1)
        response = requests.get(sidecar.url + "/healthz", timeout=15)
    redis_server.restart()
    deadline = time.monotonic() + 15
    while requests.get(sidecar.url + "/healthz", timeout=15).status_code != 200:
        assert time.monotonic() < deadline, "healthz did not recover with Redis back"
        time.sleep(0.1)


def test_an_unknown_live_read_mode_stops_the_relay_with_a_clear_error():
    from sidecar.relay import Relay

    with pytest.raises(ValueError, match="SIDECAR_LIVE_READ"):
        Relay(Settings(redis_url="redis://127.0.0.1:1/0", live_read="both"))
