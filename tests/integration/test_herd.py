"""Herd control end to end: real redis-server, real sidecar processes, real sockets on loopback.

Herds are made of many raw sockets on one selector in this process (tests/swarm.py), not of processes.
"""

from __future__ import annotations

import json
import random
import re
import socket
import threading
import time
from typing import Any

import psutil
import pytest
import redis
import requests

from sidecar.core import merge
from sidecar.publish import Publisher
from tests.clients import SSEClient, WSClient
from tests.processes import FRONTS
from tests.swarm import SSEParser, Swarm, busiest, per_window
from tests.tokens import mint

# Herd control on both fronts: admission, the throttle's timers, slow and stuck consumers and the state cache
# run on the runtime seam (sidecar/runtime.py), which each front drives its own way.
pytestmark = pytest.mark.parametrize("sidecar_process", FRONTS, indirect=True)

ADMIN_KEY = "test-admin-key-0123456789"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
SECRET = "herd-secret-" + "x" * 40


@pytest.fixture
def pub(redis_server):
    return Publisher.from_url(redis_server.url)


@pytest.fixture
def raw_sse():
    """Factory: ``raw_sse(port, channels, rcvbuf=...)`` opens a :class:`RawSSE`, closed at teardown."""
    opened: list[RawSSE] = []

    def open_(port: int, channels: list[str], rcvbuf: int | None = 4096) -> RawSSE:
        opened.append(RawSSE(port, channels, rcvbuf))
        return opened[-1]

    yield open_
    for client in opened:
        client.close()


def lrange_calls(client: redis.Redis) -> int:
    """LRANGE runs only in a state read (snapshot) here: the count of reads the pull endpoint made."""
    return int(client.info("commandstats").get("cmdstat_lrange", {}).get("calls", 0))


def seq_ranges_are_contiguous(frames: list[dict], first: int = 1) -> int:
    """Assert the frames cover seq first.. with no hole and nothing twice; return the next seq expected."""
    expected = first
    for f in frames:
        start = f.get("seq_from", f["seq"])
        assert start == expected, [(g.get("seq_from"), g["seq"]) for g in frames]
        expected = f["seq"] + 1
    return expected


# -- coalescing ---------------------------------------------------------------------------------------------
def test_a_100_ms_window_holds_a_1000_per_second_channel_to_about_10_frames_a_second(
    redis_server, sidecar_process, pub
):
    sidecar = sidecar_process(redis_server.url, SIDECAR_THROTTLE=json.dumps({"channels": {"burst:*": {"window": 0.1}}}))
    pub.state("burst:1", "created", {})
    client = SSEClient(sidecar.url, ["burst:1"])
    client.wait(lambda f: client.of_type("snapshot"))
    rng = random.Random(42)
    truth: Any = {}
    started = time.monotonic()
    for tick in range(100):  # 1,000 merge patches over about a second, in random bursts of 10
        with pub.batch() as batch:
            for _ in range(10):
                # A schema's patches (a member keeps its type) always fold into one; the unit tests cover the
                # ones RFC 7386 cannot fold, which cut a window into more frames.
                patch = {
                    rng.choice("abc"): rng.choice([None, rng.randint(0, 9)]),
                    rng.choice("def"): {rng.choice("xyz"): rng.choice([None, rng.randint(0, 9)])},
                }
                truth = merge.apply(truth, patch)
                batch.diff("burst:1", "changed", patch)
        time.sleep(max(0.0, started + (tick + 1) / 100 - time.monotonic()))
    elapsed = time.monotonic() - started
    client.wait(lambda f: client.messages() and client.messages()[-1]["seq"] == 1001, timeout=15)
    frames = client.messages()
    state: Any = client.of_type("snapshot")[0]["state"]
    for f in frames:
        state = merge.apply(state, f["diff"])
    assert state == truth
    assert seq_ranges_are_contiguous(frames, first=2) == 1002
    assert len(frames) <= elapsed / 0.1 + 3  # one frame per window, the first at once
    client.close()


# -- poke herd ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_1000_poke_subscribers_pull_at_the_cap_and_cost_a_handful_of_reads(redis_server, sidecar_process, pub):
    policy = {"channels": {"herd:*": {"poke_rate": 200}}}
    sidecar = sidecar_process(redis_server.url, SIDECAR_THROTTLE=json.dumps(policy), SIDECAR_ADMIN_KEY=ADMIN_KEY)
    pub.state("herd:1", "created", {"rev": 0})
    counter = redis.Redis.from_url(redis_server.url)
    with Swarm("127.0.0.1", sidecar.port, 1000, lambda i: ["herd:1"], mode="poke", pull=True) as swarm:
        swarm.wait(lambda s: s.connected() == 1000, 30)
        reads_before = lrange_calls(counter)
        pub.diff("herd:1", "changed", {"rev": 1})
        swarm.wait(lambda s: sum(1 for p in s.pulls if p.done) == 1000, 30)
        capped = [p.sent for p in swarm.pulls]
        assert all(p.status == 200 for p in swarm.pulls)
        assert all(len(swarm.messages(c)) == 1 for c in swarm.clients)  # every client poked, once
        assert max(per_window(capped)) <= 200 * 1.2, per_window(capped)
        assert max(capped) - min(capped) >= 4.0  # 1,000 pulls at 200/s: spread, not dropped
        assert lrange_calls(counter) - reads_before <= 5  # one version: a handful of reads, not 1,000

        # The same herd with the cap off (a live policy change): the pulls come all at once.
        requests.put(f"{sidecar.url}/admin/throttle", json={"channels": {}}, headers=ADMIN, timeout=5)
        pub.diff("herd:1", "changed", {"rev": 2})
        swarm.wait(lambda s: sum(1 for p in s.pulls if p.done) == 2000, 30)
        herd = [p.sent for p in swarm.pulls[1000:]]
        assert busiest(herd, 1.0) > 200 * 1.2
        assert lrange_calls(counter) - reads_before <= 10


# -- slow and stuck consumers -------------------------------------------------------------------------------
class RawSSE:
    """An SSE client on a plain blocking socket that reads only when told to: a consumer that stops reading.
    A small receive buffer keeps the kernel from absorbing what the sidecar sends while it does not read."""

    def __init__(self, port: int, channels: list[str], rcvbuf: int | None = 4096) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.connect(("127.0.0.1", port))
        query = "&".join(f"channel={c}" for c in channels)
        self.sock.sendall(f"GET /sse?{query}&mode=diff HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n".encode())
        self.parser = SSEParser()
        self.head = b""
        self.events: list[dict] = []
        self.ended = False

    def read_until(self, predicate: Any, timeout: float = 20.0) -> list[dict]:
        deadline = time.monotonic() + timeout
        while not predicate(self.events):
            if self.ended or time.monotonic() > deadline:
                last = [e.get("seq") for e in self.events[-3:]]
                raise AssertionError(f"ended={self.ended}; {len(self.events)} events; last seqs: {last}")
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = self.sock.recv(65536)
            except (TimeoutError, ConnectionResetError):
                data = b""
            if not data:
                self.ended = True
                continue
            if self.head is not None:
                self.head += data
                if b"\r\n\r\n" not in self.head:
                    continue
                data = self.head.partition(b"\r\n\r\n")[2]
                self.head = None
            self.events.extend(self.parser.feed(data, time.monotonic()))
        return self.events

    def read_in_background(self, last_seq: int, timeout: float = 60.0) -> threading.Thread:
        """A consumer that reads as fast as it can, until `last_seq`."""
        thread = threading.Thread(
            target=self.read_until, args=(lambda events: bool(events) and events[-1].get("seq") == last_seq, timeout)
        )
        thread.start()
        return thread

    def close(self) -> None:
        self.sock.close()


def replay(events: list[dict]) -> tuple[Any, int, int]:
    """Apply what a client received as the protocol says; assert no hole and nothing twice.
    Returns (state, last seq, snapshots after the first)."""
    state: Any = None
    expected, resyncs = None, 0
    for e in events:
        if e.get("type") == "snapshot":
            resyncs += expected is not None
            state, expected = e["state"], e["seq"] + 1
        elif e.get("type") == "message":
            assert expected is not None and e.get("seq_from", e["seq"]) == expected, (expected, e["seq"])
            state = merge.apply(state, e["diff"]) if "diff" in e else e.get("state", state)
            expected = e["seq"] + 1
    return state, (expected or 1) - 1, resyncs


def publish_padded(pub: Publisher, channel: str, count: int, pad: int = 4000, first: int = 1) -> Any:
    """`count` diffs carrying `pad` bytes each, numbered from `first`; returns the state they lead to."""
    filler = "x" * pad
    for start in range(first, first + count, 100):
        with pub.batch() as batch:
            for n in range(start, min(start + 100, first + count)):
                batch.diff(channel, "changed", {"n": n, "pad": filler})
    return {"n": first + count - 1, "pad": filler}


@pytest.mark.slow
def test_a_consumer_that_stops_reading_stays_bounded_slows_no_one_and_is_resynchronised(
    redis_server, sidecar_process, pub, raw_sse
):
    # A budget the reader in this (busy, GIL-sharing) test process always keeps within: 4 MB.
    sidecar = sidecar_process(redis_server.url, SIDECAR_QUEUE_BYTES=str(4 * 2**20), SIDECAR_QUEUE_FRAMES="20000")
    pub.state("slow:1", "created", {"n": 0})
    fast, slow = raw_sse(sidecar.port, ["slow:1"], rcvbuf=None), raw_sse(sidecar.port, ["slow:1"])
    for client in (fast, slow):
        client.read_until(lambda events: any(e.get("type") == "snapshot" for e in events))
    sidecar_memory = psutil.Process(sidecar.pid)

    # 2 x 10 MB through each connection; the kernel takes ~3 MB of the stalled one's, the budget 4 MB. After
    # the first half, whatever the process holds for the stalled consumer would keep growing in the second.
    reader = fast.read_in_background(10_001)
    truth = publish_padded(pub, "slow:1", 10_000, pad=1000)
    reader.join()
    rss = sidecar_memory.memory_info().rss
    reader = fast.read_in_background(20_001)
    truth = publish_padded(pub, "slow:1", 10_000, pad=1000, first=10_001)
    reader.join()  # the one that reads is not held back...
    grown = sidecar_memory.memory_info().rss - rss
    assert grown < 8 * 2**20, f"the sidecar grew by {grown / 2**20:.1f} MB for 10 MB more to a stalled peer"
    fast_state, fast_last, fast_resyncs = replay(fast.events)
    assert fast_state == truth and fast_last == 20_001 and fast_resyncs == 0  # ...and loses nothing

    events = slow.read_until(lambda events: bool(events) and events[-1].get("seq") == 20_001, timeout=60)
    state, last, resyncs = replay(events)
    assert state == truth and last == 20_001
    assert resyncs >= 1  # its backlog was dropped and replaced by a snapshot: no silent hole


@pytest.mark.slow
def test_a_consumer_stuck_past_the_timeout_is_closed_and_resumes_from_its_cursor(
    redis_server, sidecar_process, pub, raw_sse
):
    sidecar = sidecar_process(redis_server.url, SIDECAR_STUCK_TIMEOUT="1", SIDECAR_QUEUE_FRAMES="100")
    pub.state("stuck:1", "created", {"n": 0})
    stuck = raw_sse(sidecar.port, ["stuck:1"])
    stuck.read_until(lambda events: any(e.get("type") == "snapshot" for e in events))
    truth = publish_padded(pub, "stuck:1", 3000)

    def connections() -> int:
        return requests.get(f"{sidecar.url}/healthz", timeout=5).json()["connections"]

    deadline = time.monotonic() + 20
    while connections() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert connections() == 0
    assert "stuck in a socket write" in sidecar.log_text()

    # Reading again, it gets what was sent, then the end of the stream; it resumes from its cursor.
    with pytest.raises(AssertionError, match="ended=True"):
        stuck.read_until(lambda events: False, timeout=20)
    resumed = SSEClient(sidecar.url, ["stuck:1"], last_event_id=stuck.parser.last_id)
    resumed.wait(lambda f: any(x.get("seq") == 3001 for x in f), timeout=30)
    state, last, _ = replay(stuck.events + [f for f in resumed.frames if f.get("type") in ("snapshot", "message")])
    assert state == truth and last == 3001
    resumed.close()


# -- reconnect storm and admission --------------------------------------------------------------------------
@pytest.mark.slow
def test_1000_clients_reconnecting_at_once_are_admitted_at_the_rate_and_resume_with_nothing_lost(
    redis_server, sidecar_process, pub
):
    first = sidecar_process(redis_server.url)
    second = sidecar_process(redis_server.url, SIDECAR_ADMIT_RATE="200", SIDECAR_ADMIT_BURST="100")
    channels = [f"storm:{k}" for k in range(10)]
    with Swarm("127.0.0.1", first.port, 1000, lambda i: [channels[i % 10]], mode="event") as swarm:
        swarm.wait(lambda s: s.connected() == 1000, 30)
        for n in range(3):
            with pub.batch() as batch:
                for channel in channels:
                    batch.event(channel, "tick", {"n": n})
        swarm.wait(lambda s: all(len(s.messages(c)) == 3 for c in s.clients), 20)
        first.kill()  # a replica dies: all of its clients come back at once, to the other one
        swarm.wait(lambda s: s.connected() == 0, 10)
        for n in range(3, 6):  # missed while away
            with pub.batch() as batch:
                for channel in channels:
                    batch.event(channel, "tick", {"n": n})

        health: list[tuple[float, int]] = []
        stop = threading.Event()

        def probe() -> None:
            # Over one kept-alive connection: this measures the app. New connections also wait in the kernel's
            # listen queue, which a storm of 1,000 connects at once overflows (SYNs are retried after 1 s).
            with requests.Session() as session:
                while not stop.is_set():
                    started = time.monotonic()
                    try:
                        status = session.get(f"{second.url}/healthz", timeout=2).status_code
                    except requests.RequestException:
                        status = 0
                    health.append((time.monotonic() - started, status))
                    time.sleep(0.05)

        prober = threading.Thread(target=probe)
        prober.start()
        try:
            storm = time.monotonic()
            swarm.concurrency = 1000  # all at once
            swarm.connect_all(port=second.port)
            swarm.wait(lambda s: s.connected() == 1000, 60)
            took = time.monotonic() - storm
        finally:
            stop.set()
            prober.join()
        with pub.batch() as batch:
            for channel in channels:
                batch.event(channel, "tick", {"n": 6})
        swarm.wait(lambda s: all(len(s.messages(c)) == 7 for c in s.clients), 20)

        for client in swarm.clients:
            assert [m["data"]["n"] for m in swarm.messages(client)] == list(range(7))  # resumed: none lost, none twice
            assert not [e for e in client.events if e.get("type") in ("snapshot", "reset")]
        rejected = sum(c.rejected for c in swarm.clients)
        assert rejected > 0 and took > (1000 - 100) / 200 * 0.8  # the admission rate held the storm back
        hints = [h for c in swarm.clients for h in c.retry_hints]
        assert len({round(h, 2) for h in hints}) > len(hints) / 4  # jittered: not one moment for all
        assert health and all(status == 200 for _, status in health)  # /healthz answered throughout


def test_refused_connections_get_503_or_1013_with_a_jittered_retry_hint(redis_server, sidecar_process):
    sidecar = sidecar_process(redis_server.url, SIDECAR_MAX_CONNECTIONS="1")
    holder = SSEClient(sidecar.url, ["cap:1"])
    holder.wait(lambda f: holder.of_type("ready") or any(x.get("_event") == "ready" for x in f))
    refused = [requests.get(f"{sidecar.url}/sse?channel=cap:1", timeout=5) for _ in range(5)]
    assert {r.status_code for r in refused} == {503}
    assert all(int(r.headers["Retry-After"]) >= 1 for r in refused)
    assert len({r.json()["retry_ms"] for r in refused}) > 1  # jittered
    ws = WSClient(sidecar.ws_url)
    ws.closed.wait(5)
    assert ws.close_code == 1013 and int(re.search(r"retry in (\d+) ms", ws.close_reason)[1]) > 0
    ws.close()
    ws.ws.shutdown()  # websocket-client's close() leaves the socket open once the server has closed
    holder.close()


def wait_for(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_a_flood_of_sockets_without_a_token_is_bounded_and_locks_no_token_holder_out(
    redis_server, sidecar_process, pub
):
    # The report: 20 WebSockets without a token filled max_connections; SSE then got 503, WS 1013, for everyone.
    sidecar = sidecar_process(redis_server.url, SIDECAR_DEV="0", SIDECAR_JWT_SECRET=SECRET, SIDECAR_AUTH_TIMEOUT="3",
                              SIDECAR_MAX_CONNECTIONS="5", SIDECAR_MAX_UNAUTHENTICATED="4")  # fmt: skip
    token = mint(SECRET, ["flood:*"])
    held = [SSEClient(sidecar.url, ["flood:1"], token=token) for _ in range(2)]
    assert [c.status for c in held] == [200, 200]
    flood = [WSClient(sidecar.ws_url) for _ in range(20)]
    wait_for(lambda: sum(ws.closed.is_set() for ws in flood) >= 16)
    time.sleep(0.5)
    waiting = [ws for ws in flood if not ws.closed.is_set()]
    turned_away = [ws for ws in flood if ws.closed.is_set()]
    assert len(waiting) == 4  # the budget of those yet to authenticate, not a place among the connections
    assert all(ws.close_code == 1013 and re.search(r"retry in \d+ ms", ws.close_reason) for ws in turned_away)
    # Token holders are let in during the flood, on both transports.
    sse = SSEClient(sidecar.url, ["flood:1"], token=token)
    ws = WSClient(sidecar.ws_url, token=token)
    ws.subscribe("flood:1")
    ws.wait(lambda f: ws.of_type("subscribed"))
    assert sse.status == 200
    # A waiting socket counts once its token comes: the fifth connection gets in, the sixth waits its turn.
    first, second = waiting[0], waiting[1]
    first.send(op="auth", token=token)
    first.wait(lambda f: first.of_type("authorized"))
    second.send(op="auth", token=token)
    assert second.closed.wait(5) and second.close_code == 1013
    full = requests.get(f"{sidecar.url}/sse", params={"channel": "flood:1", "token": token}, timeout=5)
    assert full.status_code == 503  # the cap holds for the authorised
    pub.event("flood:1", "went", {"n": 1})
    for client in (*held, sse, ws):
        client.wait(lambda f, client=client: client.messages())
    # The rest are closed at the auth deadline, and their places are free again.
    for squatter in waiting[2:]:
        assert squatter.closed.wait(10) and squatter.close_code == 3000
    late = WSClient(sidecar.ws_url)
    assert not late.closed.wait(1)
    for client in (*held, sse, ws, late, *flood):
        client.close()


# -- ops ----------------------------------------------------------------------------------------------------
def test_a_policy_put_on_one_replica_changes_another_within_a_second_and_a_bad_value_is_refused(
    redis_server, sidecar_process, pub
):
    a = sidecar_process(redis_server.url, SIDECAR_ADMIN_KEY=ADMIN_KEY)
    b = sidecar_process(redis_server.url, SIDECAR_ADMIN_KEY=ADMIN_KEY)
    before = requests.get(f"{b.url}/admin/throttle", headers=ADMIN, timeout=5).json()
    assert before["source"] == "settings" and before["policy"]["channels"] == {"*": {"window": 0.0, "poke_rate": 0.0,
                                                                                       "poke_floor": 0.0}}  # fmt: skip
    assert requests.get(f"{b.url}/admin/throttle", timeout=5).status_code == 401
    pub.state("ops:1", "created", {})
    ws = WSClient(b.ws_url)
    ws.subscribe("ops:1")
    ws.wait(lambda f: ws.of_type("subscribed"))

    put = requests.put(f"{a.url}/admin/throttle", json={"channels": {"ops:*": {"window": 0.5}}}, headers=ADMIN,
                       timeout=5)  # fmt: skip
    assert put.status_code == 200 and put.json()["source"] == "redis"
    changed = time.monotonic()
    while requests.get(f"{b.url}/admin/throttle", headers=ADMIN, timeout=5).json()["source"] != "redis":
        assert time.monotonic() - changed < 1.0, "replica b did not apply the policy within a second"
        time.sleep(0.02)
    with pub.batch() as batch:
        for n in range(20):
            batch.diff("ops:1", "changed", {"n": n})
    ws.wait(lambda f: ws.messages() and ws.messages()[-1]["seq"] == 21)
    assert len(ws.messages()) < 20 and ws.messages()[-1]["seq_from"] > 2  # coalesced on b
    assert ws.messages()[-1]["diff"] == {"n": 19}

    bad = requests.put(f"{a.url}/admin/throttle", json={"channels": {"ops:*": {"window": -1}}}, headers=ADMIN,
                       timeout=5)  # fmt: skip
    assert bad.status_code == 400 and "window must be between 0 and 10" in bad.json()["message"]
    assert requests.put(f"{a.url}/admin/throttle", data=b"{", headers=ADMIN, timeout=5).status_code == 400
    time.sleep(0.6)
    after = requests.get(f"{b.url}/admin/throttle", headers=ADMIN, timeout=5).json()
    assert after["policy"]["channels"]["ops:*"]["window"] == 0.5 and after["version"] == put.json()["version"]
    ws.close()


def test_the_state_endpoint_honours_if_none_match_and_reads_once_per_version(
    redis_server, sidecar_process, pub, redis_client
):
    sidecar = sidecar_process(redis_server.url)
    pub.state("pull:1", "created", {"v": 1})
    poked = WSClient(sidecar.ws_url)  # a local subscriber: the replica then knows the channel's version
    poked.subscribe("pull:1", mode="poke")
    poked.wait(lambda f: poked.of_type("subscribed"))
    reads = lrange_calls(redis_client)
    first = requests.get(f"{sidecar.url}/channels/pull:1/state", timeout=5)
    etag = first.headers["ETag"]
    assert first.json()["state"] == {"v": 1}
    for _ in range(20):
        again = requests.get(f"{sidecar.url}/channels/pull:1/state", headers={"If-None-Match": etag}, timeout=5)
        assert again.status_code == 304 and again.headers["ETag"] == etag
    assert lrange_calls(redis_client) - reads == 1
    pub.diff("pull:1", "changed", {"v": 2})
    poked.wait(lambda f: poked.messages())
    fresh = requests.get(f"{sidecar.url}/channels/pull:1/state", headers={"If-None-Match": etag}, timeout=5)
    assert fresh.status_code == 200 and fresh.json()["state"] == {"v": 2} and fresh.headers["ETag"] != etag
    assert requests.get(f"{sidecar.url}/channels/nothing:1/state", timeout=5).status_code == 404
    poked.close()
