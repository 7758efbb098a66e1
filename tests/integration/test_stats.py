"""The stats record end to end: real sidecar processes write it to a real Redis; the dashboard's sources read it."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator

import orjson
import pytest
import requests

from dashboard.feed import read_records
from dashboard.sources import Record, Window
from sidecar.publish import Publisher
from sidecar.stats import LATENCY_BOUNDS_MS
from tests.clients import close_stream
from tests.processes import FRONTS

STATS_KEY = "rt:stats"


class Subscriber:
    """A plain streaming GET /sse in a thread, counting the `message` events it reads."""

    def __init__(self, url: str, channel: str) -> None:
        self.messages = 0
        self.ready = threading.Event()
        self._response = requests.get(f"{url}/sse?channel={channel}&mode=event", stream=True, timeout=10)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        assert self.ready.wait(5), "no ready event"

    def _read(self) -> None:
        try:
            for line in self._response.iter_lines():
                if line == b"event: ready":
                    self.ready.set()
                elif line == b"event: message":
                    self.messages += 1
        except (requests.RequestException, AttributeError):
            pass  # closed by the test

    def close(self) -> None:
        close_stream(self._response)


@pytest.fixture
def subscribers() -> Iterator[Callable[[str, str], Subscriber]]:
    made: list[Subscriber] = []

    def make(url: str, channel: str) -> Subscriber:
        made.append(Subscriber(url, channel))
        return made[-1]

    yield make
    for sub in made:
        sub.close()


def wait_for(check: Callable[[], bool], timeout: float = 8.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def records(redis_client) -> list[Record]:
    return read_records(redis_client, STATS_KEY)


def test_two_replicas_write_records_that_add_up_to_the_traffic(
    redis_server, redis_client, sidecar_process, subscribers
):
    # A short keepalive lets the sidecars see the test's subscribers leave, so they stop at once.
    env = {"SIDECAR_STATS_INTERVAL": "0.5", "SIDECAR_KEEPALIVE": "0.5", "SIDECAR_STATS_PATTERNS": "stats:alpha,task:*"}
    a = sidecar_process(redis_server.url, **env)
    b = sidecar_process(redis_server.url, **env)
    on_a = [subscribers(a.url, "stats:alpha"), subscribers(a.url, "stats:alpha")]
    on_b = subscribers(b.url, "stats:alpha")
    pub = Publisher.from_url(redis_server.url)
    for i in range(30):
        pub.event("stats:alpha", "tick", {"i": i})
        pub.event(f"task:{i:04x}", "tick")
    wait_for(lambda: all(s.messages == 30 for s in [*on_a, on_b]))
    done = time.time()
    window = Window(stale_after=5)

    def settled_past_the_traffic() -> bool:
        window.add(records(redis_client))
        return window.settled(time.time()) >= math.ceil(done) + 1

    # Every replica has reported past the last delivery, and past the end of the records that counted it.
    wait_for(settled_past_the_traffic)
    recs = [r for rows in window.records.values() for r in rows]
    assert len(window.records) == 2
    for mine in window.records.values():
        assert sum(r.counts("stats:alpha")["pub"] for r in mine) == 30  # every replica reads every message
        assert sum(r.counts("task:*")["pub"] for r in mine) == 30  # 30 task channels, one pattern
    end = window.settled(time.time())
    points = window.series(math.floor(window.oldest() or 0), end)
    assert sum(p.published for p in points) == pytest.approx(60)  # the mean of the replicas, not the sum
    assert sum(p.delivered for p in points) == pytest.approx(90)  # 3 subscribers, 30 each
    (alpha,) = [c for c in window.top_channels(end, 10, time.time()) if c.pattern == "stats:alpha"]
    assert alpha.subscribers == 3
    latest = {r.replica: r for r in recs}
    assert sorted(r.conn.get("sse", 0) for r in latest.values()) == [1, 2]
    assert sum(sum(r.lat) for r in recs) >= 2  # at least one socket write per connection, each observed
    assert all(len(r.lat) == len(LATENCY_BOUNDS_MS) and r.reader_ok for r in recs)
    raw = redis_client.xrevrange(STATS_KEY, count=1)[0][1][b"r"]
    assert len(raw) < 1000  # small: one record per second per replica
    assert redis_client.xlen(STATS_KEY) <= 3_600 + 200  # MAXLEN ~ stats_len


def test_records_count_channels_by_configured_pattern_and_by_name_only_when_asked(
    redis_server, redis_client, sidecar_process, subscribers
):
    plain = sidecar_process(redis_server.url, SIDECAR_STATS_INTERVAL="0.2")
    named = sidecar_process(redis_server.url, SIDECAR_STATS_INTERVAL="0.2", SIDECAR_STATS_CHANNEL_NAMES="1")
    on_plain, on_named = subscribers(plain.url, "user:alice"), subscribers(named.url, "user:alice")
    pub = Publisher.from_url(redis_server.url)

    sent = 0

    def labels_after(n: int) -> dict[str, set[str]]:
        """Publish `n` on user:alice; per replica, the patterns its records count them under, as the dashboard
        reads the records."""
        nonlocal sent
        since = time.time()
        for _ in range(n):
            pub.event("user:alice", "tick")
        sent += n
        wait_for(lambda: on_plain.messages == on_named.messages == sent)
        delivered = time.time()
        wait_for(lambda: len({r.replica for r in records(redis_client) if r.ts > delivered}) == 2)
        labels: dict[str, set[str]] = {}
        for r in records(redis_client):
            if r.ts > since:
                labels.setdefault(r.replica, set()).update(p for p, entry in r.channels.items() if entry.get("pub"))
        return labels

    by_replica = labels_after(3)
    assert sorted(map(sorted, by_replica.values())) == [["*"], ["user:alice"]]
    plain_records = [f[b"r"] for _, f in redis_client.xrange(STATS_KEY) if orjson.loads(f[b"r"])["pid"] == plain.pid]
    assert plain_records and not any(b"alice" in r for r in plain_records)  # not even in the subscriber gauge
    # Ops name the pattern in the throttle policy: every replica counts by it from then on.
    policy = {"channels": {"user:*": {}}}
    put = requests.put(f"{plain.url}/admin/throttle", json=policy, timeout=5)
    assert put.status_code == 200

    def applied(replica) -> bool:
        return requests.get(f"{replica.url}/admin/throttle", timeout=5).json()["version"] == put.json()["version"]

    wait_for(lambda: applied(plain) and applied(named))  # each replica polls the policy every 0.5 s
    assert sorted(map(sorted, labels_after(4).values())) == [["user:*"], ["user:*"]]
    window = Window(stale_after=5)
    window.add(records(redis_client))
    now = time.time()
    assert "user:*" in {row.pattern for row in window.top_channels(window.settled(now), 30, now)}  # the table


def test_the_stream_is_trimmed_to_stats_len(redis_server, redis_client, sidecar_process):
    sidecar_process(redis_server.url, SIDECAR_STATS_INTERVAL="0.05", SIDECAR_STATS_LEN="10")
    wait_for(lambda: redis_client.xlen(STATS_KEY) >= 10)
    time.sleep(1.5)  # ~30 more records
    assert redis_client.xlen(STATS_KEY) < 30  # MAXLEN ~: Redis trims whole nodes (100 entries) at most


def test_the_relay_outlives_redis_going_away_and_the_records_resume(
    redis_server, redis_client, sidecar_process, subscribers
):
    sidecar = sidecar_process(redis_server.url, SIDECAR_STATS_INTERVAL="0.5")
    wait_for(lambda: len(records(redis_client)) >= 1)
    redis_server.kill()
    time.sleep(2.0)  # ~4 records cannot be written
    assert requests.get(sidecar.url + "/healthz", timeout=5).status_code == 503
    redis_server.restart()
    wait_for(lambda: requests.get(sidecar.url + "/healthz", timeout=5).status_code == 200)
    before = time.time()
    wait_for(lambda: any(r.ts > before for r in records(redis_client)))
    recs = records(redis_client)
    assert max(r.dt for r in recs) >= 1.5  # the first record after the outage covers it: nothing is lost
    assert "cannot write the stats record" in sidecar.log_text()
    sidecar.allow_tracebacks = False  # the outage is logged as a warning, never as a traceback


def raw_records(redis_client, since: float) -> list[dict]:
    """The records written after unix time `since`, as JSON (relay records only)."""
    docs = [orjson.loads(f[b"r"]) for _, f in redis_client.xrange(STATS_KEY, min=f"{int(since * 1000)}-0")]
    return [d for d in docs if d.get("kind", "relay") == "relay"]


@pytest.mark.parametrize("sidecar_process", FRONTS, indirect=True)
def test_v2_records_show_held_frames_coalesced_messages_and_an_admission_storm(
    redis_server, redis_client, sidecar_process, subscribers, request
):
    policy = {"channels": {"burst:*": {"window": 0.5}}, "admit_rate": 2, "admit_burst": 4}
    sidecar = sidecar_process(redis_server.url, SIDECAR_STATS_INTERVAL="0.5", SIDECAR_KEEPALIVE="0.5",
                              SIDECAR_THROTTLE=orjson.dumps(policy).decode())  # fmt: skip
    start = time.time()
    sub = subscribers(sidecar.url, "burst:1")  # admitted: one token
    statuses = []
    for _ in range(12):  # the storm: 3 more get a token, the rest are told to come back
        response = requests.get(f"{sidecar.url}/sse?channel=burst:2", stream=True, timeout=5)
        statuses.append(response.status_code)
        response.close()
    pub = Publisher.from_url(redis_server.url)
    with pub.batch() as batch:
        for i in range(10):  # a burst inside one window: the first goes at once, 9 wait for the window's end
            batch.event("burst:1", "tick", {"i": i})
    wait_for(lambda: sub.messages == 10)  # event-mode subscribers get every message, the 9 in one write
    done = time.time()
    wait_for(lambda: any(r["ts"] > done + 1 for r in raw_records(redis_client, start)))
    recs = raw_records(redis_client, start)
    front = {"gevent": "gevent", "asgi": "asyncio"}[request.node.callspec.params["sidecar_process"]]
    assert {(r["v"], r["front"], r["version"]) for r in recs} == {(2, front, "0.1.0")}
    held = [sum(n) for n in zip(*(r["stage"]["held"] for r in recs))]
    assert sum(held) == 1 and held[LATENCY_BOUNDS_MS.index(500)] + held[LATENCY_BOUNDS_MS.index(1000)] == 1
    burst = [r["ch"].get("burst:*", {}) for r in recs]
    assert sum(e.get("coal", 0) for e in burst) == 9 and sum(e.get("pub", 0) for e in burst) == 10
    assert any(e.get("modes") == {"event": 1} for e in burst) and sum(sum(e.get("lat", ())) for e in burst) >= 2
    assert sum(sum(r["stage"]["read"]) for r in recs) == 10  # one observation per message read
    assert sum(sum(r["stage"]["queue"]) for r in recs) >= 2  # one per socket write of a message
    admitted, deferred = statuses.count(200), statuses.count(503)
    assert admitted + deferred == 12 and deferred >= 7
    adm = {key: sum(r["adm"][key] for r in recs) for key in ("ok", "defer", "rej", "tries")}
    assert adm == {"ok": 1 + admitted, "defer": deferred, "rej": 0, "tries": 13}
    last = recs[-1]
    assert (last["adm"]["rate"], last["adm"]["burst"]) == (2, 4) and 0 <= last["adm"]["level"] <= 4
    assert len(last["shards"]) == 16 and all(s["reconn"] == 0 for s in last["shards"].values())
    assert sum(last["qd"]) == sum(last["conn"].values()) and last["stuck"] == 0
    assert all(len(r["qd"]) == 12 and len(r["slowest"]) <= 5 for r in recs)
    assert max(len(orjson.dumps(r)) for r in recs) < 2000  # 16 shards, 2 patterns


def pub_records(redis_client, since: float) -> list[dict]:
    docs = [orjson.loads(f[b"r"]) for _, f in redis_client.xrange(STATS_KEY, min=f"{int(since * 1000)}-0")]
    return [d for d in docs if d.get("kind") == "pub"]


def test_publishers_write_one_ack_record_a_second_from_workers_and_post_publish(
    redis_server, redis_client, sidecar_process
):
    start = time.time()
    sidecar = sidecar_process(redis_server.url)
    pub = Publisher.from_url(redis_server.url)
    for i in range(25):  # 2.5 s of publishing from this process
        pub.event("pubstats:1", "tick", {"i": i})
        time.sleep(0.1)
    body = {"messages": [{"channel": "pubstats:2", "event": "tick"}] * 3}
    assert requests.post(f"{sidecar.url}/publish", json=body, timeout=5).status_code == 200
    mine = f"{pub.stats.host}:{pub.stats.pid}"
    wait_for(lambda: sum(r["n"] for r in pub_records(redis_client, start) if r["replica"] == mine) == 25)
    wait_for(lambda: any(r["pid"] == sidecar.pid for r in pub_records(redis_client, start)))
    recs = pub_records(redis_client, start)
    ours = [r for r in recs if r["replica"] == mine]
    assert 2 <= len(ours) <= 4  # at most one a second, only while publishing
    assert all(b["ts"] - a["ts"] >= 0.9 for a, b in zip(ours, ours[1:]))
    assert sum(sum(r["ack"]) for r in ours) == 25 and all(len(r["ack"]) == len(LATENCY_BOUNDS_MS) for r in ours)
    assert {(r["v"], r["kind"]) for r in recs} == {(2, "pub")}
    (served,) = [r for r in recs if r["pid"] == sidecar.pid]
    assert served["n"] == 3 and sum(served["ack"]) == 3  # POST /publish's batch
    time.sleep(1.5)
    assert len(pub_records(redis_client, start)) == len(recs)  # nothing published: no record
    pub.close()


def test_a_publisher_record_that_cannot_be_written_is_dropped_and_counted_never_in_a_publishs_way(
    redis_server, redis_client
):
    pub = Publisher.from_url(redis_server.url, redis_socket_timeout=0.5)
    pub.event("pubstats:3", "tick")
    wait_for(lambda: pub.stats.written == 1)
    pub.event("pubstats:3", "tick")  # counted; its record is due within a second
    redis_server.pause()  # a hung Redis: the record's write waits for the socket timeout, on its own thread
    try:
        wait_for(lambda: pub.stats.dropped == 1, timeout=5)
    finally:
        redis_server.resume()
    before = time.time()
    started = time.monotonic()
    pub.event("pubstats:3", "tick")  # publishing goes on at once
    assert time.monotonic() - started < 0.5
    wait_for(lambda: pub.stats.written == 2)
    # (Redis may still apply the timed-out write once it runs again: the client gave up on it, not Redis.)
    assert pub_records(redis_client, before)[-1]["n"] == 1  # the dropped record's count was not carried over
    pub.close()


ANNA_KEY, BO_KEY, ADMIN_KEY = "anna-" + "k" * 20, "bo-" + "k" * 20, "plain-" + "k" * 20


def test_policy_changes_are_logged_with_who_what_and_when_and_read_back_newest_first(
    redis_server, redis_client, sidecar_process
):
    sidecar = sidecar_process(redis_server.url, SIDECAR_ADMIN_KEYS=f"ops-anna:{ANNA_KEY},ops-bo:{BO_KEY}",
                              SIDECAR_ADMIN_KEY=ADMIN_KEY)  # fmt: skip
    url = f"{sidecar.url}/admin/throttle"

    def as_(key: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {key}"}

    before = time.time()
    policy = {"channels": {"orders:*": {"window": 0.5}}}
    assert requests.put(url, json=policy, headers=as_(ANNA_KEY), timeout=5).status_code == 200
    after = time.time()
    assert requests.put(url, json={**policy, "admit_rate": 50}, headers=as_(BO_KEY), timeout=5).status_code == 200
    assert requests.put(url, json={"channels": "no"}, headers=as_(BO_KEY), timeout=5).status_code == 400  # no entry
    assert requests.delete(url, headers=as_(ADMIN_KEY), timeout=5).status_code == 200
    got = requests.get(f"{url}/log?n=50", headers=as_(ANNA_KEY), timeout=5)
    assert got.status_code == 200
    changes = got.json()["changes"]
    assert [(c["who"], c["what"]) for c in changes] == [
        ("admin", "back to the settings' policy: orders:* window 0.5 -> 0 s (removed); admit_rate 50 -> 0/s"),
        ("ops-bo", "admit_rate 0 -> 50/s"),
        ("ops-anna", "orders:* window 0 -> 0.5 s (new)"),
    ]
    anna = changes[-1]
    assert before <= anna["at"] <= after and anna["policy"]["channels"]["orders:*"]["window"] == 0.5
    assert changes[0]["policy"] is None  # DELETE: back to the settings'
    raw = redis_client.xrevrange("rt:policy:log", count=1)[0][1]
    assert raw[b"who"] == b"admin" and raw[b"policy"] == b""  # what the dashboard reads
    one = requests.get(f"{url}/log?n=1", headers=as_(ADMIN_KEY), timeout=5).json()["changes"]
    assert [c["who"] for c in one] == ["admin"]
    for bad in ("0", "1001", "abc", "-1", "1.5", ""):
        response = requests.get(f"{url}/log?n={bad}", headers=as_(ADMIN_KEY), timeout=5)
        assert response.status_code == 400 and response.json()["error"] == "bad-request"
    for headers in ({"Authorization": "Bearer wrong-key-wrong-key"}, {}):
        for method in ("GET", "PUT", "DELETE"):
            target = f"{url}/log" if method == "GET" else url
            refused = requests.request(method, target, json=policy, headers=headers, timeout=5)
            assert refused.status_code == 401 and "anna" not in refused.text and "admin" not in refused.text
    assert redis_client.xlen("rt:policy:log") == 3  # the refused changed nothing
    stream = b"".join(v for _, f in redis_client.xrange("rt:policy:log") for v in f.values())
    for key in (ANNA_KEY, BO_KEY, ADMIN_KEY):
        assert key not in sidecar.log_text() and key.encode() not in stream
