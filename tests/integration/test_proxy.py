"""Three sidecar replicas behind Debian's nginx, running the config the project ships (deploy/nginx/nginx.conf).

No stickiness: a client whose replica dies reconnects through the proxy, lands on another replica and resumes
from its position, with nothing lost and nothing doubled.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from sidecar.config import Settings
from sidecar.publish import Publisher
from tests.clients import SSEClient, WSClient
from tests.nginx import SHIPPED_CONF, NginxProcess

pytestmark = pytest.mark.slow


@pytest.fixture
def nginx(tmp_path: Path) -> Iterator[object]:
    started: list[NginxProcess] = []

    def start(backends: list[int]) -> NginxProcess:
        proc = NginxProcess(backends, tmp_path)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()


class Resuming:
    """A client that reconnects whenever its stream ends, from where it was (`connect()` says how), and keeps
    every frame of every connection."""

    def __init__(self) -> None:
        self.frames: list[dict] = []
        self.connects = 0
        self.running = True
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def connect(self) -> SSEClient | WSClient | None:
        raise NotImplementedError

    def _run(self) -> None:
        while self.running:
            try:
                client = self.connect()
            except Exception:  # refused while nginx notices the dead replica
                client = None
            if client is None:
                time.sleep(0.1)
                continue
            self.connects += 1
            seen = 0
            while self.running and not client.closed.wait(0.05):
                self.frames.extend(client.frames[seen:])
                seen = len(client.frames)
            self.frames.extend(client.frames[seen:])
            self.ended(client)
            client.close()

    def ended(self, client: SSEClient | WSClient) -> None:
        pass

    def stop(self) -> None:
        self.running = False
        self.thread.join(10)


class ResumingSSE(Resuming):
    """Resumes with its last `id:` as Last-Event-ID."""

    def __init__(self, base: str, channels: list[str]) -> None:
        self.base, self.channels, self.cursor = base, channels, None
        super().__init__()

    def connect(self) -> SSEClient | None:
        client = SSEClient(self.base, self.channels, last_event_id=self.cursor)
        if client.status != 200:
            client.response.close()
            return None
        return client

    def ended(self, client: SSEClient | WSClient) -> None:
        self.cursor = getattr(client, "last_id", None) or self.cursor


class ResumingWS(Resuming):
    """Resumes by subscribing with `since`/`epoch` of the last message it got."""

    def __init__(self, base: str, channel: str) -> None:
        self.base, self.channel = base, channel
        super().__init__()

    def connect(self) -> WSClient:
        client = WSClient(self.base)
        messages = [f for f in self.frames if f["type"] == "message"]
        extra = {"since": messages[-1]["id"], "epoch": messages[-1]["epoch"]} if messages else {}
        client.subscribe(self.channel, **extra)
        return client


def seqs(frames: list[dict], channel: str) -> list[int]:
    return [f["seq"] for f in frames if f["type"] == "message" and f["channel"] == channel]


def connections(replica: object) -> int:
    return int(requests.get(replica.url + "/healthz", timeout=2).json()["connections"])  # type: ignore[attr-defined]


def test_sse_and_websocket_pass_through_the_shipped_nginx_config(redis_server, sidecar_process, nginx):
    replica = sidecar_process(redis_server.url)
    proxy = nginx([replica.port])
    pub = Publisher.from_url(redis_server.url)
    sse = SSEClient(proxy.url, ["proxy:1"])
    ws = WSClient(proxy.ws_url)
    ws.subscribe("proxy:1")
    sse.wait(lambda f: sse.last_id is not None)
    ws.wait(lambda f: ws.of_type("subscribed"))
    pub.diff("proxy:1", "tick", {"n": 1})
    # One small frame must arrive while the stream stays open: a buffering proxy would hold it back.
    sse.wait(lambda f: sse.messages())
    ws.wait(lambda f: ws.messages())
    assert sse.messages()[0]["diff"] == ws.messages()[0]["diff"] == {"n": 1}
    assert requests.get(proxy.url + "/healthz", timeout=5).status_code == 200
    sse.close()
    ws.close()


def test_clients_of_a_killed_replica_resume_on_the_others_through_the_proxy(redis_server, sidecar_process, nginx):
    replicas = [sidecar_process(redis_server.url) for _ in range(3)]
    proxy = nginx([r.port for r in replicas])
    pub = Publisher.from_url(redis_server.url)
    channels = ["fleet:a", "fleet:b"]
    sse = [ResumingSSE(proxy.url, channels) for _ in range(6)]
    ws = [ResumingWS(proxy.ws_url, channels[i % 2]) for i in range(6)]
    deadline = time.monotonic() + 20
    while sum(connections(r) for r in replicas) < 12 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert sum(connections(r) for r in replicas) == 12
    victim = max(replicas, key=connections)
    on_victim = connections(victim)
    assert on_victim >= 2  # round robin put clients on it

    total = 120
    for n in range(total // 2):
        pub.diff(channels[n % 2], "tick", {"n": n})
        time.sleep(0.005)
    victim.kill()
    victim.allow_tracebacks = True
    for n in range(total // 2, total):
        pub.diff(channels[n % 2], "tick", {"n": n})
        time.sleep(0.005)

    per_channel = total // 2
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        done_sse = all(len(seqs(c.frames, ch)) >= per_channel for c in sse for ch in channels)
        done_ws = all(len(seqs(c.frames, c.channel)) >= per_channel for c in ws)
        if done_sse and done_ws:
            break
        time.sleep(0.1)
    time.sleep(0.3)  # a duplicate would arrive now
    for client in sse + ws:
        client.stop()
    for client in sse:
        for channel in channels:
            assert seqs(client.frames, channel) == list(range(1, per_channel + 1))
    for client in ws:
        assert seqs(client.frames, client.channel) == list(range(1, per_channel + 1))
    reconnected = sum(c.connects - 1 for c in sse + ws)
    assert reconnected >= on_victim  # the killed replica's clients came back through the proxy


def test_the_shipped_proxy_timeouts_outlast_the_keepalive():
    text = SHIPPED_CONF.read_text()
    hours = [int(h) for h in re.findall(r"proxy_read_timeout (\d+)h;", text)]
    assert len(hours) == 2 and min(hours) * 3600 > 2 * Settings().keepalive  # /sse and /ws
