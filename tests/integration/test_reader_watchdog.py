"""The reader's watchdog on one Redis node: a reader whose connection goes deaf is found and reconnected, and a
Redis that lost what the reader read has the shard's clients resynchronised at once.

A deaf connection is made for real: the sidecar reaches Redis through a loopback TCP relay that, once told to,
stops passing replies to the connections whose last command was a blocking XREAD (the reader's), while every
other connection (the watchdog's, the publishers') goes on. The read then never returns by itself before its
socket timeout (set far away here), as on a paused master or a silently broken network path.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest
import requests

from sidecar.core.protocol import shard_of
from sidecar.publish import Publisher
from tests.clients import WSClient
from tests.processes import EmbeddedRedis


class DeafeningRelay:
    """A TCP relay to `port`; `deafen()` holds the replies to the connections blocked in XREAD at that moment."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.states: list[dict[str, bool]] = []
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def deafen(self) -> None:
        for state in self.states:
            state["deaf"] = state["xread"]

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            self.sockets += [client, upstream]
            state = {"xread": False, "deaf": False}
            self.states.append(state)
            threading.Thread(target=self._pump, args=(client, upstream, state, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, state, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, state: dict[str, bool], requests_: bool) -> None:
        try:
            while data := src.recv(65536):
                if requests_:
                    state["xread"] = b"XREAD" in data.upper()
                elif state["deaf"]:
                    return  # swallow this reply and every later one: the connection stays open, and silent
                dst.sendall(data)
        except OSError:
            pass

    def close(self) -> None:
        self.server.close()
        for sock in self.sockets:
            sock.close()


@pytest.fixture
def relay_to(redis_server: EmbeddedRedis) -> Iterator[DeafeningRelay]:
    assert redis_server.port is not None
    relay = DeafeningRelay(redis_server.port)
    try:
        yield relay
    finally:
        relay.close()


def health(url: str) -> tuple[int, dict]:
    answer = requests.get(url + "/healthz", timeout=5)
    return answer.status_code, answer.json()


def test_a_deaf_reader_turns_healthz_unready_within_the_stall_bound_and_recovers_by_itself(
    redis_server, relay_to, sidecar_process
):
    stall = 2.0
    # A socket timeout far beyond the test: only the watchdog can end the deaf read.
    sidecar = sidecar_process(relay_to.url, SIDECAR_READER_STALL=str(stall), SIDECAR_REDIS_SOCKET_TIMEOUT="60")
    pub = Publisher.from_url(redis_server.url)
    ws = WSClient(sidecar.ws_url)
    ws.subscribe("deaf:1", mode="event")
    ws.wait(lambda f: ws.of_type("subscribed"))
    pub.event("deaf:1", "tick", {"i": 0})
    ws.wait(lambda f: len(ws.messages()) == 1)
    status, body = health(sidecar.url)
    assert status == 200 and body["stuck"] == [] and len(body["shards"]) == 16

    relay_to.deafen()
    time.sleep(1.5)  # the read in flight (SIDECAR_READ_BLOCK_MS) ends; the next one goes deaf
    deafened = time.monotonic()
    for i in range(1, 4):
        pub.event("deaf:1", "tick", {"i": i})
    unready_after, seen_stuck = None, None
    while time.monotonic() - deafened < stall + 8:
        status, body = health(sidecar.url)
        if status == 503:
            unready_after, seen_stuck = time.monotonic() - deafened, body
            break
        time.sleep(0.1)
    assert unready_after is not None, "healthz stayed ready with a deaf reader"
    assert unready_after <= stall + 2 * 1.0 + 1.5  # the stall, two watchdog rounds, slack for a loaded machine
    shard = shard_of("deaf:1", 16)
    assert seen_stuck["ok"] is False and seen_stuck["reader"] is False and seen_stuck["stuck"] == [shard]
    assert [s["shard"] for s in seen_stuck["shards"] if s["stuck"]] == [shard]

    # The watchdog closed the deaf connection; the reader reconnected (new connections are not deafened).
    ws.wait(lambda f: len(ws.messages()) == 4, timeout=10)
    assert [m["data"]["i"] for m in ws.messages()] == [0, 1, 2, 3]
    deadline = time.monotonic() + 10
    while health(sidecar.url)[0] != 200:
        assert time.monotonic() < deadline, "healthz did not recover"
        time.sleep(0.1)
    metrics = requests.get(sidecar.url + "/metrics", timeout=5).text
    assert "sidecar_reader_watchdog_reconnects_total 1.0" in metrics.splitlines()
    pub.close()
    ws.close()


def test_a_redis_that_lost_its_data_resyncs_live_clients_without_waiting_for_a_publish(redis_server, sidecar_process):
    sidecar = sidecar_process(redis_server.url)
    pub = Publisher.from_url(redis_server.url)
    ws = WSClient(sidecar.ws_url)
    ws.subscribe("lost:1")
    ws.wait(lambda f: ws.of_type("subscribed"))
    for i in range(3):
        pub.diff("lost:1", "tick", {"i": i})
    ws.wait(lambda f: len(ws.messages()) == 3)
    redis_server.kill()
    for path in redis_server.data_dir.iterdir():  # its AOF and snapshot: the restarted Redis is empty
        if path.is_file() and (path.suffix in (".aof", ".rdb") or path.name.startswith("appendonly")):
            path.unlink()
    redis_server.start()
    # The stream's head is now behind what the reader read: the watchdog resyncs the shard's subscribers.
    ws.wait(lambda f: ws.of_type("reset"), timeout=15)
    reset = ws.of_type("reset")[0]
    assert (reset["channel"], reset["seq"], reset["reason"]) == ("lost:1", 0, "gap")
    pub.diff("lost:1", "tick", {"i": 3})
    ws.wait(lambda f: ws.messages()[-1]["diff"] == {"i": 3})
    assert ws.messages()[-1]["seq"] == 1 and len(ws.of_type("reset")) + len(ws.of_type("snapshot")) == 1
    pub.close()
    ws.close()
