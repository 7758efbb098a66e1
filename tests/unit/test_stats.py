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
    QUEUE_BOUNDS,
    RECORD_PATTERNS,
    SLOWEST,
    Labels,
    Stats,
    exposition,
    package_version,
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


def fake_relay(settings: Settings, clock: Clock | None = None, policy: Policy | None = None) -> SimpleNamespace:
    """A relay of real hub and throttle (on `clock`, as the relay's run on time.monotonic), and a reader,
    store and control reduced to what the stats read."""
    reader = SimpleNamespace(read_by_channel={}, messages_read=0, alive=True, healthy=True, reconnects=0,
                             last_ids=dict.fromkeys(SHARDS, "0-0"), kicks=0, lost_tails=0, lags=list)  # fmt: skip
    store, control = SimpleNamespace(live_keys=lambda: SHARDS), SimpleNamespace(stuck_closed=0)
    throttle = Throttle(policy or Policy(), clock or (lambda: T0))
    hub = Hub(throttle)
    reader.on_messages = hub.dispatch
    return SimpleNamespace(settings=settings, hub=hub, reader=reader, throttle=throttle, store=store, control=control)


@pytest.fixture
def relay(clock) -> SimpleNamespace:
    return fake_relay(Settings(port=8123, stats_patterns=PATTERNS), clock)


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
    """What the reader loop does: count per channel, then hand them on (to the stats, then the hub)."""
    for msg in messages:
        relay.reader.read_by_channel[msg.channel] = relay.reader.read_by_channel.get(msg.channel, 0) + 1
        relay.reader.messages_read += 1
    relay.reader.on_messages(list(messages))


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
    assert record["v"] == 2 and record["replica"] == stats.replica and record["port"] == 8123
    assert (record["ts"], record["dt"], record["started"]) == (T0 + 1, 1.0, T0)
    assert record["conn"] == {"sse": 1, "ws": 1} and record["reader"] == 1
    assert record["ch"] == {"orders:*": {"pub": 2, "dlv": 3, "subs": 3, "modes": {"event": 3}}, "task:*": {"pub": 1}}
    commit()
    sse.drain()
    sse.batch_ts = clock.now * 1000 - 3  # written 3 ms after publish
    stats.observe_write(sse)
    clock.now += 1.0
    record, commit = stats.sample()
    assert record["dt"] == 1.0
    five = [0] * len(LATENCY_BOUNDS_MS)
    five[LATENCY_BOUNDS_MS.index(5)] = 1
    # subscribers stay; the counts start again
    assert record["ch"] == {"orders:*": {"subs": 3, "modes": {"event": 3}, "lat": five}}
    assert record["lat"] == five


def test_counts_of_a_record_that_was_not_written_roll_into_the_next(relay, stats, clock):
    subscribe(relay.hub, SSE, "a:b")
    read(relay, message("a:b", 1))
    clock.now += 1.0
    stats.sample()  # Redis refused it: no commit
    read(relay, message("a:b", 2))
    clock.now += 1.0
    record, commit = stats.sample()
    assert record["dt"] == 2.0 and record["ch"]["a:b"] == {"pub": 2, "dlv": 2, "subs": 1, "modes": {"event": 1}}
    assert sum(record["stage"]["read"]) == 2  # histograms roll over too
    commit()
    clock.now += 1.0
    record = stats.sample()[0]
    assert record["ch"]["a:b"] == {"subs": 1, "modes": {"event": 1}} and sum(record["stage"]["read"]) == 0


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
    assert stats.sample()[0]["ch"] == {OTHER: {"pub": 1, "dlv": 1, "subs": 1, "modes": {"event": 1}}}
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


def bucket(ms: float) -> int:
    """The index of the latency bucket `ms` falls in."""
    return next(i for i, bound in enumerate(LATENCY_BOUNDS_MS) if ms <= bound)


def hist(*ms: float) -> list[int]:
    counts = [0] * len(LATENCY_BOUNDS_MS)
    for value in ms:
        counts[bucket(value)] += 1
    return counts


def test_a_v2_record_says_its_front_and_version(stats):
    record = stats.sample()[0]
    assert (record["v"], record["front"], record["version"]) == (2, "gevent", package_version())
    assert package_version() == "0.1.0"  # the package is installed in the test environment (pyproject.toml)


def test_the_read_stage_is_publish_to_the_reader_handing_messages_on(relay, stats, clock):
    subscribe(relay.hub, SSE, "orders:1")
    read(relay, message("orders:1", 1, ts=T0 * 1000 - 3), message("orders:1", 2, ts=T0 * 1000 - 40))
    record = stats.sample()[0]
    assert record["stage"]["read"] == hist(3, 40)
    assert relay.hub.delivered == 2  # and the hub still got them


def test_the_queue_stage_is_queued_to_written_for_the_oldest_frame_of_each_write(relay, stats, clock):
    conn = subscribe(relay.hub, WS, "orders:1", "task:1")
    read(relay, message("task:1", 1, ts=T0 * 1000 - 1))
    clock.now += 0.004
    read(relay, message("orders:1", 1))
    clock.now += 0.003
    conn.drain()
    stats.observe_write(conn)  # the oldest frame (task:1) was queued 7 ms ago, published 8 ms ago
    record = stats.sample()[0]
    assert record["stage"]["queue"] == hist(7)
    assert record["lat"] == hist(8) and record["ch"]["task:*"]["lat"] == hist(8)
    assert "lat" not in record["ch"]["orders:*"]  # only patterns whose frames led a write


def test_a_write_pass_is_one_observation_per_connection_written(relay, stats, clock):
    """The writers' pass hands over every connection it wrote at once: still one observation per socket write,
    each of its oldest frame, whichever connections share one."""
    first = subscribe(relay.hub, SSE, "orders:1")
    read(relay, message("orders:1", 1, ts=T0 * 1000 - 9))
    shared = [subscribe(relay.hub, WS, "orders:2") for _ in range(3)]
    clock.now += 0.002
    read(relay, message("orders:2", 1, ts=T0 * 1000 - 4))
    idle = subscribe(relay.hub, WS, "task:1")
    clock.now += 0.001
    for conn in [first, *shared, idle]:
        conn.drain()
    stats.observe_write([first, *shared, idle])  # `idle` wrote no frame (a keepalive): not observed
    record = stats.sample()[0]
    assert record["lat"] == hist(12, 7, 7, 7) and record["ch"]["orders:*"]["lat"] == hist(12, 7, 7, 7)
    assert record["stage"]["queue"] == hist(3, 1, 1, 1)
    assert sum(stats.latency.counts) == 4 and stats.latency.sum_ms == pytest.approx(12 + 3 * 7)


def test_a_coalescing_window_puts_its_held_frames_in_the_held_stage(clock):
    policy = Policy.from_json({"channels": {"orders:*": {"window": 0.5}}})
    relay = fake_relay(Settings(stats_patterns="orders:*"), clock, policy)
    stats = Stats(relay, clock)
    conn = relay.hub.connect(Connection(SSE, lambda: None))
    relay.hub.start(relay.hub.subscribe(conn, "orders:1", "diff"), Sync(Position(), 0))
    read(relay, *(message("orders:1", i) for i in range(1, 11)))  # a burst: the first goes, 9 wait
    clock.now += 0.5
    relay.hub.flush()
    for (name, channel), n in relay.hub.take_counts().items():  # what control.housekeep does once a second
        stats.count(name, channel, n)
    record = stats.sample()[0]
    assert record["stage"]["held"] == hist(500)  # one delivery, held for the window
    assert record["ch"]["orders:*"]["coal"] == 9 and record["ch"]["orders:*"]["dlv"] == 2


def test_a_record_counts_the_windows_sent_per_pattern_and_frames_out_are_pub_less_coal_plus_win(clock):
    policy = Policy.from_json({"channels": {"orders:*": {"window": 0.5}, "task:*": {"window": 0.5}}})
    relay = fake_relay(Settings(), clock, policy)
    stats = Stats(relay, clock)
    conn = relay.hub.connect(Connection(SSE, lambda: None))
    for channel in ("orders:1", "orders:2", "task:1"):
        relay.hub.start(relay.hub.subscribe(conn, channel, "diff"), Sync(Position(), 0))
    read(relay, *(message(c, i) for i in range(1, 4) for c in ("orders:1", "orders:2")))  # 2 go, 4 wait
    read(relay, message("task:1", 1), message("task:1", 2))  # 1 goes, 1 waits
    clock.now += 0.5
    relay.hub.flush()  # 3 windows end: 3 frames out
    clock.now += 0.6  # task:1's next window ends with nothing held; orders:1's is overdue when a message comes
    read(relay, message("orders:1", 4))
    clock.now += 0.1
    read(relay, message("orders:1", 5))  # held
    clock.now += 0.5
    read(relay, message("orders:1", 6))  # the scheduler is late: this one closes the window, and goes out in it
    relay.hub.flush()
    for (name, channel), n in relay.hub.take_counts().items():
        stats.count(name, channel, n)
    ch = stats.sample()[0]["ch"]
    # orders:* frames out: 3 sent at once (the first two, #4), 3 windows (2 that ended, 1 closed late): 9 - 6 + 3.
    assert (ch["orders:*"]["pub"], ch["orders:*"]["coal"], ch["orders:*"]["win"]) == (9, 6, 3)
    assert (ch["task:*"]["pub"], ch["task:*"]["coal"], ch["task:*"]["win"]) == (2, 1, 1)
    assert conn.queue and 'sidecar_flushed_total{pattern="orders:*"} 3.0' in exposition(stats).decode()


def test_spread_pokes_are_held_from_the_change_to_their_slot(clock):
    policy = Policy.from_json({"channels": {"orders:*": {"poke_rate": 100 / 3, "poke_floor": 0}}})
    relay = fake_relay(Settings(stats_patterns="orders:*"), clock, policy)
    stats = Stats(relay, clock)
    for _ in range(4):
        conn = relay.hub.connect(Connection(SSE, lambda: None))
        relay.hub.start(relay.hub.subscribe(conn, "orders:1", "poke"), Sync(Position(), 0))
    read(relay, message("orders:1", 1))  # 4 pokes at 33/s: slots at 0, 30, 60 and 90 ms
    for _ in range(4):
        relay.hub.flush()
        clock.now += 0.03
    record = stats.sample()[0]
    assert record["stage"]["held"] == hist(0, 30, 60, 90)
    assert record["ch"]["orders:*"]["modes"] == {"poke": 4}


def test_admission_counts_the_storm_and_shows_the_bucket(clock):
    relay = fake_relay(Settings(), clock, Policy(admit_rate=10, admit_burst=5, max_connections=12))
    stats = Stats(relay, clock)
    hints = [relay.throttle.admit(0) for _ in range(8)]  # a storm of 8: 5 in, 3 told to come back
    assert hints.count(None) == 5
    relay.throttle.admit(12)  # over the connection cap
    relay.throttle.admit_unauthenticated(3, 3)  # over the budget of sockets waiting for their token
    record, commit = stats.sample()
    assert record["adm"] == {"ok": 5, "defer": 3, "rej": 2, "tries": 10, "level": 0.0, "rate": 10.0, "burst": 5}
    commit()
    clock.now += 0.25  # 2.5 tokens back
    assert stats.sample()[0]["adm"] == {"ok": 0, "defer": 0, "rej": 0, "tries": 0, "level": 2.5, "rate": 10.0,
                                        "burst": 5}  # fmt: skip


def test_unlimited_admission_has_no_bucket_level(stats):
    adm = stats.sample()[0]["adm"]
    assert (adm["level"], adm["rate"], adm["burst"]) == (None, 0.0, 0)


def test_queue_depths_and_the_slowest_connections_carry_no_identifiers(relay, stats, clock):
    conns = [subscribe(relay.hub, SSE if i % 2 else WS, f"user:secret{i}") for i in range(8)]
    for conn in conns:
        conn.drain()  # a WebSocket's `subscribed`
    stats.collect()  # first seen now: ages count from here (within a record's interval)
    clock.now += 10
    late = subscribe(relay.hub, SSE, "user:secret9", "orders:1")
    stats.collect()
    for n, conn in zip([0, 1, 3, 7, 20, 0, 2, 600], conns, strict=True):
        for _ in range(n):
            conn.push(b"x" * 10)
    late.drain()
    late.push(b"y" * 5000)
    clock.now += 2.5
    record = stats.sample()[0]
    depths = [0] * len(QUEUE_BOUNDS)
    for n in [0, 1, 3, 7, 20, 0, 2, 600, 1]:
        depths[next(i for i, bound in enumerate(QUEUE_BOUNDS) if n <= bound)] += 1
    assert record["qd"] == depths and sum(record["qd"]) == 9
    assert len(record["slowest"]) == SLOWEST
    assert record["slowest"][:2] == [
        {"t": "sse", "ch": 1, "qb": 6000, "qf": 600, "age": 12.5},
        {"t": "sse", "ch": 2, "qb": 5000, "qf": 1, "age": 2.5},
    ]
    assert [row["qb"] for row in record["slowest"]] == [6000, 5000, 200, 70, 30]
    assert b"secret" not in orjson.dumps(record)


def test_stuck_closes_and_shard_reconnects_are_counts_lag_is_null_until_known(relay, stats):
    loop = SimpleNamespace(reconnects=0)
    relay.reader.shards = {key: shard for shard, key in enumerate(SHARDS)}
    relay.reader.loop_of = dict.fromkeys(SHARDS, loop)  # one node: one loop reads every shard
    relay.reader.heads = {SHARDS[1]: "1800000000123-0"}
    relay.reader.lags = lambda: [Lag(0, 0, 0.1, False), Lag(1, 250, 0.1, False)]
    loop.reconnects, relay.control.stuck_closed = 2, 1
    record, commit = stats.sample()
    assert record["shards"] == {"0": {"lag": None, "reconn": 2}, "1": {"lag": 250, "reconn": 2}}
    assert record["stuck"] == 1
    commit()
    loop.reconnects += 1
    record = stats.sample()[0]
    assert record["shards"]["1"] == {"lag": 250, "reconn": 1} and record["stuck"] == 0


def test_patterns_past_the_record_cap_sum_their_histograms_and_modes_into_other(clock):
    stats = Stats(fake_relay(Settings(stats_channel_names=True), clock), clock)
    hub = stats.relay.hub
    for i in range(RECORD_PATTERNS + 2):
        conn = subscribe(hub, WS, f"p{i:03d}:x")
        read(stats.relay, message(f"p{i:03d}:x", 1, ts=T0 * 1000 - 3))
        conn.drain()
        stats.observe_write(conn)
    ch = stats.sample()[0]["ch"]
    assert len(ch) == RECORD_PATTERNS
    assert ch[OTHER]["lat"] == hist(3, 3, 3) and ch[OTHER]["modes"] == {"event": 3} and ch[OTHER]["subs"] == 3


def test_a_record_with_ten_patterns_stays_small(clock):
    relay = fake_relay(Settings(stats_patterns=",".join(f"pattern{i}:*" for i in range(10))), clock)
    relay.reader.shards = {f"rt:{{{i}}}:live": i for i in range(16)}
    relay.reader.heads = dict.fromkeys(relay.reader.shards, "0-0")
    relay.reader.lags = lambda: [Lag(i, 0, 0.1, False) for i in range(16)]
    stats = Stats(relay, clock)
    for i in range(10):
        for mode in ("event", "poke"):
            conn = relay.hub.connect(Connection(SSE, lambda: None))
            relay.hub.start(relay.hub.subscribe(conn, f"pattern{i}:1", mode), Sync(Position(), 0))
        read(relay, message(f"pattern{i}:1", 1, ts=T0 * 1000 - 2))
        conn.drain()
        stats.observe_write(conn)
    size = len(orjson.dumps(stats.sample()[0]))
    assert size < 2600, size  # docs/dashboard.md says the size


def test_the_exposition_has_the_v2_figures_with_bounded_labels(clock):
    policy = Policy(admit_rate=10, admit_burst=5)
    relay = fake_relay(Settings(stats_patterns="orders:*"), clock, policy)
    relay.reader.shards = {key: shard for shard, key in enumerate(SHARDS)}
    relay.reader.loop_of = dict.fromkeys(SHARDS, SimpleNamespace(reconnects=3))
    stats = Stats(relay, clock)
    conn = subscribe(relay.hub, SSE, "orders:42")
    read(relay, message("orders:42", 1, ts=T0 * 1000 - 3))
    for _ in range(7):
        relay.throttle.admit(0)
    got = families(stats)
    assert got["sidecar_info"] == {("sidecar_info", (("front", "gevent"), ("version", package_version()))): 1}
    read_stage = {dict(labels).get("le"): v for (name, labels), v in got["sidecar_stage_latency_seconds"].items()
                  if name.endswith("_bucket") and ("stage", "read") in labels}  # fmt: skip
    assert (read_stage["0.002"], read_stage["0.005"]) == (0, 1)
    assert got["sidecar_admissions"] == {
        ("sidecar_admissions_total", (("outcome", "ok"),)): 5,
        ("sidecar_admissions_total", (("outcome", "defer"),)): 2,
        ("sidecar_admissions_total", (("outcome", "rej"),)): 0,
    }
    assert got["sidecar_admission_tokens"] == {("sidecar_admission_tokens", ()): 0}
    assert got["sidecar_reader_shard_reconnects"][("sidecar_reader_shard_reconnects_total", (("shard", "1"),))] == 3
    depth = got["sidecar_connection_queue_frames"]
    assert depth[("sidecar_connection_queue_frames_bucket", (("le", "+Inf"),))] == 1
    assert got["sidecar_connection_queue_frames_gsum"] == {("sidecar_connection_queue_frames_gsum", ()): 1}  # waits
    conn.drain()
    stats.observe_write(conn)
    latency = families(stats)["sidecar_pattern_latency_seconds"]
    assert {dict(labels).get("pattern") for _, labels in latency} == {"orders:*"}  # by pattern, never the channel


def test_a_publisher_record_has_its_publishes_and_their_ack_times_since_the_last(clock):
    from sidecar.pubstats import PublishStats

    pub = PublishStats(None, clock, interval=3600)  # its writer thread waits an hour: take() by hand
    try:
        assert pub.take() is None  # nothing published: no record
        pub.observe([T0 * 1000 - 3, T0 * 1000 - 40])
        clock.now += 1.0
        pub.observe([clock.now * 1000 - 0.2])
        record = pub.take()
        assert record is not None
        assert record == {"v": 2, "kind": "pub", "replica": f"{pub.host}:{pub.pid}", "host": pub.host,
                          "pid": pub.pid, "ts": T0 + 1, "dt": 1.0, "n": 3, "ack": hist(3, 40, 0.2)}  # fmt: skip
        assert pub.take() is None
        pub.observe([clock.now * 1000])
        pub.pid = -1  # as in a forked child: the parent's counts and lock are not its own
        pub.observe([clock.now * 1000 - 7])
        assert pub.take()["ack"] == hist(7)
    finally:
        pub.close()
