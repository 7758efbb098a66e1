"""The stats record and /metrics of one relay, sampled by hand with a fake clock (no Redis: writing is
tests/integration/test_stats.py)."""

from __future__ import annotations

from types import SimpleNamespace

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from sidecar.config import Settings
from sidecar.core.connection import SSE, WS, Connection
from sidecar.core.hub import Hub, Sync
from sidecar.core.protocol import Message, Position
from sidecar.core.throttle import Policy, Throttle
from sidecar.reader import Lag
from sidecar.stats import (
    CONTENT_TYPE_LATEST,
    LATENCY_BOUNDS_MS,
    MAX_PATTERNS,
    OTHER,
    RECORD_PATTERNS,
    Labels,
    Stats,
    exposition,
)

T0 = 1_800_000_000.0


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


PATTERNS = "orders:*,task:*,sprint:*,a:b"  # SIDECAR_STATS_PATTERNS of the relay below
SHARDS = ["rt:{0}:live", "rt:{1}:live"]


def fake_relay(settings: Settings) -> SimpleNamespace:
    reader = SimpleNamespace(read_by_channel={}, messages_read=0, alive=True, healthy=True, reconnects=0,
                             last_ids=dict.fromkeys(SHARDS, "0-0"), kicks=0, lost_tails=0, lags=list)  # fmt: skip
    store, control = SimpleNamespace(live_keys=lambda: SHARDS), SimpleNamespace(stuck_closed=0)
    throttle = Throttle(Policy(), lambda: T0)
    return SimpleNamespace(settings=settings, hub=Hub(), reader=reader, throttle=throttle, store=store, control=control)


@pytest.fixture
def relay() -> SimpleNamespace:
    return fake_relay(Settings(port=8123, stats_patterns=PATTERNS))


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
    "channel, label",
    [
        ("task:9f1c2e4a-0b7d-4c1e-8f00-123456789abc", "task:*"),
        ("user:alice", "user:*"),  # a name, no digit: still counted by its pattern
        ("user:42:inbox", "user:*:inbox"),  # the most specific pattern wins
        ("user:42:inboxes", "user:*"),
        ("demo:board", "demo:board"),  # a pattern without * names one channel
        ("demo:board2", OTHER),
        ("alice", OTHER),  # no configured pattern: never the channel's own name
        ("bob:secret:x", OTHER),
        ("task:*", "task:*"),  # a pattern is its own label
        (OTHER, OTHER),
    ],
)
def test_a_channel_is_labelled_by_the_most_specific_configured_pattern_else_other(channel, label):
    labels = Labels(["user:*", "user:*:inbox", "demo:board"])
    assert labels.of(channel, {"task:*": None, "*": None}) == label


def test_labels_follow_the_policy_in_force_and_name_channels_only_when_asked():
    labels = Labels()
    assert labels.of("sprint:7", Policy().channels) == OTHER
    policy = Policy.from_json({"channels": {"sprint:*": {"window": 0.1}}})
    assert labels.of("sprint:7", policy.channels) == "sprint:*"  # ops' PUT /admin/throttle takes effect
    named = Labels(["sprint:*"], channel_names=True)
    assert (named.of("sprint:7"), named.of("user:alice")) == ("sprint:*", "user:alice")
    with pytest.raises(ValueError, match="SIDECAR_STATS_PATTERNS"):
        Labels(["no spaces:*"])


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


def test_a_record_keeps_the_busiest_patterns_and_sums_the_rest(clock):
    stats = Stats(fake_relay(Settings(stats_channel_names=True)), clock)
    for i in range(RECORD_PATTERNS + 10):
        stats.count("coalesced", f"p{i:03d}:x", i + 1)
    ch = stats.sample()[0]["ch"]
    assert len(ch) == RECORD_PATTERNS
    assert ch["p059:x"] == {"coal": 60}
    assert ch[OTHER] == {"coal": sum(range(1, 12))}  # the 11 quietest


def test_patterns_past_the_cap_count_as_other(clock):
    stats = Stats(fake_relay(Settings(stats_channel_names=True)), clock)
    for i in range(MAX_PATTERNS + 5):
        stats.count("published", f"ns{i}")
    assert len(stats.counters) == MAX_PATTERNS + 1 and stats.counters[OTHER][0] == 5


def test_a_channel_name_reaches_neither_the_record_nor_the_metrics(relay, stats):
    subscribe(relay.hub, SSE, "user:alice")
    read(relay, message("user:alice", 1))
    assert stats.sample()[0]["ch"] == {OTHER: {"pub": 1, "dlv": 1, "subs": 1}}
    text = exposition(stats).decode()
    assert 'sidecar_published_total{pattern="*"} 1.0' in text.splitlines()
    assert "alice" not in text


def families(stats: Stats) -> dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]:
    """The exposition as the Prometheus parser reads it: family -> {(sample name, labels): value}."""
    return {
        f.name: {(s.name, tuple(sorted(s.labels.items()))): s.value for s in f.samples}
        for f in text_string_to_metric_families(exposition(stats).decode())
    }


def test_the_exposition_parses_with_counters_gauges_and_a_cumulative_histogram(relay, stats, clock):
    conn = subscribe(relay.hub, SSE, "orders:1")
    read(relay, message("orders:1", 1), message("orders:2", 2))
    conn.batch_ts = T0 * 1000 - 1.5
    stats.observe_write(conn)
    conn.batch_ts = T0 * 1000 - 300
    stats.observe_write(conn)
    stats.count("rejected", "task:9")
    relay.reader.last_ids[SHARDS[1]] = "1800000000123-4"
    relay.reader.reconnects = 2
    relay.reader.kicks = 1
    relay.reader.lags = lambda: [Lag(0, 0, 0.5, False), Lag(1, 1500, 6.25, True)]
    got = families(stats)
    pattern = (("pattern", "orders:*"),)
    assert got["sidecar_published"][("sidecar_published_total", pattern)] == 2
    assert got["sidecar_delivered"][("sidecar_delivered_total", pattern)] == 1
    assert got["sidecar_rejected"] == {  # every label counted so far has a series of every counter
        ("sidecar_rejected_total", (("pattern", "task:*"),)): 1,
        ("sidecar_rejected_total", pattern): 0,
    }
    assert got["sidecar_subscribers"] == {("sidecar_subscribers", pattern): 1}
    assert got["sidecar_connections"] == {
        ("sidecar_connections", (("transport", "sse"),)): 1,
        ("sidecar_connections", (("transport", "ws"),)): 0,
    }
    assert got["sidecar_messages_read"] == {("sidecar_messages_read_total", ()): 2}
    assert got["sidecar_reader_reconnects"] == {("sidecar_reader_reconnects_total", ()): 2}
    assert got["sidecar_reader_position_timestamp_seconds"] == {
        ("sidecar_reader_position_timestamp_seconds", (("shard", "0"),)): 0,
        ("sidecar_reader_position_timestamp_seconds", (("shard", "1"),)): 1_800_000_000.123,
    }
    assert got["sidecar_reader_watchdog_reconnects"] == {("sidecar_reader_watchdog_reconnects_total", ()): 1}
    assert got["sidecar_reader_lag_seconds"] == {
        ("sidecar_reader_lag_seconds", (("shard", "0"),)): 0,
        ("sidecar_reader_lag_seconds", (("shard", "1"),)): 1.5,
    }
    assert got["sidecar_reader_idle_seconds"][("sidecar_reader_idle_seconds", (("shard", "1"),))] == 6.25
    assert got["sidecar_reader_stuck"] == {
        ("sidecar_reader_stuck", (("shard", "0"),)): 0,
        ("sidecar_reader_stuck", (("shard", "1"),)): 1,
    }
    latency = got["sidecar_delivery_latency_seconds"]
    buckets = {dict(labels)["le"]: v for (name, labels), v in latency.items() if name.endswith("_bucket")}
    assert (buckets["0.001"], buckets["0.002"], buckets["0.2"], buckets["0.5"], buckets["+Inf"]) == (0, 1, 1, 2, 2)
    assert len(buckets) == len(LATENCY_BOUNDS_MS)
    assert latency[("sidecar_delivery_latency_seconds_count", ())] == 2
    assert latency[("sidecar_delivery_latency_seconds_sum", ())] == pytest.approx(0.3015)
    assert "process_resident_memory_bytes" in got  # and the process's own metrics
    assert CONTENT_TYPE_LATEST.startswith("text/plain; version=")


def test_a_many_star_pattern_labels_a_long_channel_without_backtracking() -> None:
    # A regex of `.*` groups tried every split of the channel (issue 10, item 13): this took ages.
    labels = Labels(["*:" * 20 + "x"])
    assert labels.of("a:" * 100 + "y") == "*"
    assert labels.of("a:" * 100 + "x") == "*:" * 20 + "x"
