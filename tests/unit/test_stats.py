"""The stats record and /metrics of one relay, sampled by hand with a fake clock (no Redis: writing is
tests/integration/test_stats.py)."""

from __future__ import annotations

from types import SimpleNamespace

import orjson
import pytest

from sidecar.config import Settings
from sidecar.core.connection import SSE, WS, Connection
from sidecar.core.hub import Hub, Sync
from sidecar.core.protocol import Message, Position
from sidecar.stats import LATENCY_BOUNDS_MS, MAX_PATTERNS, OTHER, RECORD_PATTERNS, Stats, pattern_of, prometheus_text

T0 = 1_800_000_000.0


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def relay() -> SimpleNamespace:
    reader = SimpleNamespace(read_by_channel={}, messages_read=0, alive=True, healthy=True, reconnects=0)
    return SimpleNamespace(settings=Settings(port=8123), hub=Hub(), reader=reader)


@pytest.fixture
def stats(relay, clock) -> Stats:
    return Stats(relay, clock)


def message(channel: str, seq: int, ts: float = T0 * 1000) -> Message:
    fields = {b"c": channel.encode(), b"s": str(seq).encode(), b"ep": b"e1", b"e": b"changed", b"t": repr(ts).encode(),
              b"k": b"event"}  # fmt: skip
    return Message.from_fields(f"{int(T0 * 1000)}-{seq}", fields)


def subscribe(hub: Hub, transport: str, *channels: str) -> Connection:
    conn = hub.connect(Connection(transport, lambda: None))
    for channel in channels:
        hub.start(hub.subscribe(conn, channel, "event"), Sync(Position(), 0))
    return conn


def read(relay, *messages: Message) -> None:
    """What the reader loop does: count per channel, then dispatch."""
    for msg in messages:
        relay.reader.read_by_channel[msg.channel] = relay.reader.read_by_channel.get(msg.channel, 0) + 1
        relay.reader.messages_read += 1
    relay.hub.dispatch(messages)


@pytest.mark.parametrize(
    "channel, pattern",
    [
        ("task:9f1c2e4a-0b7d-4c1e-8f00-123456789abc", "task:*"),
        ("sprint:7", "sprint:*"),
        ("user:42:inbox", "user:*:inbox"),
        ("user:ann@example.com", "user:*"),
        ("demo:board", "demo:board"),
        ("news", "news"),
        ("v2:orders", "v2:orders"),  # the first segment is the namespace: kept
        ("import:" + "x" * 40, "import:*"),
        ("task:*", "task:*"),
    ],
)
def test_pattern_of_replaces_id_like_segments(channel, pattern):
    assert pattern_of(channel) == pattern
    assert pattern_of(pattern) == pattern


def test_a_record_counts_what_happened_since_the_last_one(relay, stats, clock):
    sse = subscribe(relay.hub, SSE, "orders:1", "orders:2")
    subscribe(relay.hub, WS, "orders:1")
    read(relay, message("orders:1", 1), message("orders:2", 1), message("task:abc1", 1))
    clock.now += 1.0
    record, commit = stats.sample()
    assert record["v"] == 1 and record["replica"] == stats.replica and record["port"] == 8123
    assert (record["ts"], record["dt"], record["started"]) == (T0 + 1, 1.0, T0)
    assert record["conn"] == {"sse": 1, "ws": 1} and record["reader"] == 1
    assert record["ch"] == {"orders:*": {"pub": 2, "dlv": 3, "subs": 3}, "task:*": {"pub": 1}}
    commit()
    sse.batch_ts = clock.now * 1000 - 3  # written 3 ms after publish
    stats.observe_write(sse)
    clock.now += 1.0
    record, commit = stats.sample()
    assert record["dt"] == 1.0
    assert record["ch"] == {"orders:*": {"subs": 3}}  # subscribers stay; the counts start again
    assert record["lat"][LATENCY_BOUNDS_MS.index(5)] == 1 and sum(record["lat"]) == 1
    assert len(orjson.dumps(record)) < 400


def test_counts_of_a_record_that_was_not_written_roll_into_the_next(relay, stats, clock):
    subscribe(relay.hub, SSE, "a:b")
    read(relay, message("a:b", 1))
    clock.now += 1.0
    stats.sample()  # Redis refused it: no commit
    read(relay, message("a:b", 2))
    clock.now += 1.0
    record, commit = stats.sample()
    assert record["dt"] == 2.0 and record["ch"]["a:b"] == {"pub": 2, "dlv": 2, "subs": 1}
    commit()
    clock.now += 1.0
    assert stats.sample()[0]["ch"]["a:b"] == {"subs": 1}


def test_throttle_counters_and_herd_gauges_are_in_the_record(stats, clock):
    stats.count("coalesced", "task:1", 4)
    stats.count("poke_delayed", "task:*")
    stats.count("dropped", "task:2")
    stats.count("pulled", "sprint:7", 2)
    stats.gauge("pokes_pending", 12)
    stats.gauge("poke_spread", 2.5)
    with pytest.raises(KeyError):
        stats.count("typo", "x")
    with pytest.raises(KeyError):
        stats.gauge("typo", 1)
    record = stats.sample()[0]
    assert record["ch"] == {"task:*": {"coal": 4, "delay": 1, "drop": 1}, "sprint:*": {"pull": 2}}
    assert record["herd"] == {"pending": 12, "spread": 2.5}


def test_frames_dropped_for_slow_consumers_are_counted_once(relay, stats):
    conn = subscribe(relay.hub, SSE, "a:b")
    conn.max_frames = 2
    read(relay, *(message("a:b", i) for i in range(1, 4)))  # the third overflows: the backlog is dropped
    assert conn.dropped == 3
    first, commit = stats.sample()
    commit()
    second, _ = stats.sample()
    assert (first["slow"], second["slow"]) == (3, 0)


def test_a_record_keeps_the_busiest_patterns_and_sums_the_rest(stats):
    for i in range(RECORD_PATTERNS + 10):
        stats.count("coalesced", f"p{i:03d}:x", i + 1)
    ch = stats.sample()[0]["ch"]
    assert len(ch) == RECORD_PATTERNS
    assert ch["p059:x"] == {"coal": 60}
    assert ch[OTHER] == {"coal": sum(range(1, 12))}  # the 11 quietest


def test_patterns_past_the_cap_count_as_other(stats):
    for i in range(MAX_PATTERNS + 5):
        stats.count("published", f"ns{i}")
    assert len(stats.counters) == MAX_PATTERNS + 1 and stats.counters[OTHER][0] == 5


def test_prometheus_text_has_counters_gauges_and_a_cumulative_histogram(relay, stats, clock):
    conn = subscribe(relay.hub, SSE, 'odd"name:x')
    read(relay, message('odd"name:x', 1), message('odd"name:x', 2))
    conn.batch_ts = T0 * 1000 - 1.5
    stats.observe_write(conn)
    conn.batch_ts = T0 * 1000 - 300
    stats.observe_write(conn)
    text = prometheus_text(stats)
    lines = text.splitlines()
    assert text.endswith("\n")
    assert 'sidecar_published_total{pattern="odd\\"name:x"} 2' in lines
    assert 'sidecar_delivered_total{pattern="odd\\"name:x"} 2' in lines
    assert 'sidecar_subscribers{pattern="odd\\"name:x"} 1' in lines
    assert 'sidecar_connections{transport="sse"} 1' in lines and 'sidecar_connections{transport="ws"} 0' in lines
    assert "# TYPE sidecar_delivery_latency_seconds histogram" in lines
    assert 'sidecar_delivery_latency_seconds_bucket{le="0.002"} 1' in lines
    assert 'sidecar_delivery_latency_seconds_bucket{le="0.5"} 2' in lines
    assert 'sidecar_delivery_latency_seconds_bucket{le="+Inf"} 2' in lines
    assert "sidecar_delivery_latency_seconds_count 2" in lines
    assert "sidecar_delivery_latency_seconds_sum 0.3015" in lines
    assert "sidecar_messages_read_total 2" in lines
    for line in lines:  # every sample line is `name{labels} number`
        if not line.startswith("#"):
            float(line.rsplit(" ", 1)[1])
