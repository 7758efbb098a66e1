"""Counters and latency histograms of one sidecar process, its per-second stats record, and `/metrics`.

One background thread (a greenlet under gevent) samples the relay once per ``stats_interval`` and XADDs one
small JSON record to ``<prefix>:stats`` (MAXLEN ~ ``stats_len``). The dashboard reads only that stream, so it
sees every replica and costs the relay nothing. docs/dashboard.md documents the record; in short::

    {"v": 1, "replica": "web-1:4242", "host": "web-1", "pid": 4242, "port": 8000,
     "ts": 1732761000.002, "dt": 1.001, "started": 1732760990.5, "reader": 1,
     "conn": {"sse": 3, "ws": 1}, "slow": 0, "lat": [0, 4, 9, 1, 0, ...],
     "herd": {"pending": 0, "spread": 0.0},
     "ch": {"orders:*": {"pub": 12, "dlv": 36, "subs": 3}, "task:*": {"pub": 4}}}

Counts in a record are what happened during ``dt``, the seconds since the replica's previous record (its start
for the first): rates are count / dt, so a restarted replica can never show a negative rate, and a record that
could not be written (Redis down) is not lost: its counts roll into the next one.

Channels are counted under a label (:class:`Labels`): the configured pattern they match (``task:9f1c...`` ->
``task:*`` when the throttle policy or ``stats_patterns`` names ``task:*``), else ``*``. That bounds cardinality
and keeps ids out of the stream and out of ``/metrics`` (:func:`exposition`, the Prometheus exposition).

Example (the herd control counting what it did)::

    relay.stats.count("coalesced", channel)
    relay.stats.gauge("pokes_pending", len(heap))
"""

from __future__ import annotations

import bisect
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator
from typing import Any

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from sidecar.core.connection import Connection
from sidecar.core.patterns import glob_match
from sidecar.core.throttle import PATTERN_RE
from sidecar.runtime import GeventRuntime

__all__ = ["CONTENT_TYPE_LATEST", "Labels", "Stats", "exposition"]

log = logging.getLogger(__name__)

RECORD_VERSION = 1
RECORD_FIELD = "r"  # the stream entry's one field: the record as JSON
STOP_JOIN = 2.0  # seconds stop() waits for a record being written before it writes the last one
_DIRECT = GeventRuntime()  # for a relay without a runtime (unit tests): calls are direct

# Upper bounds (ms) of the latency buckets: publish call -> frame written to the socket.
LATENCY_BOUNDS_MS = (0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, float("inf"))

# Per-pattern counters: the name callers use -> its key in a record's "ch" entries (zeros are left out).
COUNTERS = {
    "published": "pub",  # messages read from the live streams (every replica reads all of them)
    "delivered": "dlv",  # frames queued to this replica's connections
    "coalesced": "coal",  # messages folded into a later one by the throttle
    "dropped": "drop",  # frames dropped: by the throttle, or for a connection too slow to keep up
    "poke_delayed": "delay",  # pokes the throttle spread out instead of sending at once
    "admitted": "adm",  # connections the admission control let in (counted per channel asked for)
    "rejected": "rej",  # connections it turned away (the same)
    "pulled": "pull",  # GET /channels/<c>/state (the pull of poke/pull)
}
SUBSCRIBERS = "subs"  # a gauge in the same "ch" entries
GAUGES = ("pokes_pending", "poke_spread")  # herd control: pokes waiting to be sent, seconds they are spread over
_INDEX = {name: i for i, name in enumerate(COUNTERS)}

OTHER = "*"  # the label of every channel no configured pattern matches, and of everything past the caps below
MAX_PATTERNS = 500  # patterns counted per process; later ones count as OTHER
RECORD_PATTERNS = 50  # patterns per record, the most active first; the rest are summed into OTHER

LABEL_CACHE = 65_536  # channels whose label is remembered (cleared when full, and when the policy changes)


class Labels:
    """The label a channel is counted under, in the stats record and in ``/metrics``.

    It is the most specific configured pattern that matches the channel (of the throttle policy's patterns and
    ``stats_patterns``: most literal characters, then fewest ``*``, as the policy matches), else :data:`OTHER`.
    Only with ``stats_channel_names`` on is an unmatched channel counted under its own name. So by default
    neither /metrics nor the stats stream carry an id (``user:alice`` counts as ``user:*`` or ``*``), and the
    number of labels is the number of patterns ops configured.
    """

    def __init__(self, patterns: Iterable[str] = (), channel_names: bool = False) -> None:
        self.extra = tuple(patterns)
        for pattern in self.extra:
            if not PATTERN_RE.fullmatch(pattern):
                raise ValueError(f"SIDECAR_STATS_PATTERNS: bad channel pattern {pattern[:50]!r}")
        self.channel_names = channel_names
        self._source: Collection[str] | None = None
        self._ordered: list[str] = []
        self._cache: dict[str, str] = {}

    def of(self, channel: str, policy_patterns: Collection[str] = ()) -> str:
        """``channel``'s label, given the patterns of the policy in force (a pattern is its own label)."""
        if policy_patterns is not self._source:
            self._source = policy_patterns
            self._cache.clear()
            patterns = {*policy_patterns, *self.extra} - {OTHER}
            ordered = sorted(patterns, key=lambda p: (-len(p.replace("*", "")), p.count("*"), p))
            self._ordered = ordered
        label = self._cache.get(channel)
        if label is None:
            if len(self._cache) >= LABEL_CACHE:
                self._cache.clear()
            label = self._cache[channel] = self._find(channel)
        return label

    def _find(self, channel: str) -> str:
        for pattern in self._ordered:
            if glob_match(pattern, channel):  # linear: a regex of .* groups backtracks (core/patterns.py)
                return pattern
        return channel if self.channel_names else OTHER


class Histogram:
    """Cumulative bucket counts (and the sum, for Prometheus) of observed milliseconds."""

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BOUNDS_MS) -> None:
        self.bounds = bounds
        self.counts = [0] * len(bounds)
        self.sum_ms = 0.0

    def observe(self, value: float) -> None:
        value = max(value, 0.0)  # publisher and relay clocks may disagree by a little
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum_ms += value


class Stats:
    """The counters of one relay, and the thread that writes its stats record."""

    def __init__(self, relay: Any, clock: Callable[[], float] = time.time) -> None:
        self.relay = relay
        self.settings = relay.settings
        self.clock = clock
        patterns = (p.strip() for p in self.settings.stats_patterns.split(","))
        self.labels = Labels([p for p in patterns if p], self.settings.stats_channel_names)
        self.latency = Histogram()
        self.counters: dict[str, list[int]] = {}  # pattern -> cumulative counts, in COUNTERS order
        self.gauges: dict[str, float] = dict.fromkeys(GAUGES, 0)
        self.slow_dropped = 0  # frames dropped for slow consumers, ever
        self.records_written = 0
        self.write_errors = 0
        self.started = round(clock(), 3)
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.replica = f"{self.host}:{self.pid}"
        # What the last written record covered: the next one carries the difference.
        self._written_at = self.started
        self._written: dict[str, list[int]] = {}
        self._written_latency = [0] * len(self.latency.counts)
        self._written_slow = 0
        self._seen_dropped: dict[int, int] = {}  # connection id -> its `dropped` when last looked at
        self._failing = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.registry = CollectorRegistry(auto_describe=False)  # per relay: tests run several in one process
        self.registry.register(StatsCollector(self))
        ProcessCollector(registry=self.registry)

    # -- what the relay and the throttle call ---------------------------------------------------------------
    def observe_write(self, conn: Connection) -> None:
        """After a socket write: the age of the oldest frame written (one observation per write)."""
        if conn.batch_ts:
            self.latency.observe(self.clock() * 1000 - conn.batch_ts)

    def count(self, name: str, channel: str, n: int = 1) -> None:
        """Add ``n`` to counter ``name`` (a key of :data:`COUNTERS`) of ``channel``'s pattern (or a pattern)."""
        self._row(channel)[_INDEX[name]] += n

    def gauge(self, name: str, value: float) -> None:
        """Set a herd gauge (one of :data:`GAUGES`)."""
        if name not in self.gauges:
            raise KeyError(name)
        self.gauges[name] = value

    # -- the writer thread ----------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = self._runtime().spawn(self._run, "sidecar-stats")

    def stop(self) -> None:
        """Stop the writer; after a clean stop one last record says ``"stopped": 1`` (the dashboard then shows the
        replica as stopped, not stale)."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(STOP_JOIN)
            self.write(stopped=True)

    def _run(self) -> None:
        interval = max(self.settings.stats_interval, 0.05)
        next_tick = time.monotonic() + interval
        while not self._stop.wait(max(0.0, next_tick - time.monotonic())):
            try:
                self.write()
            except Exception:  # a bug here must not stop the stats, nor anything else
                log.exception("stats record failed")
            next_tick += interval
            if next_tick < time.monotonic():  # fell behind (a Redis stall): skip ticks rather than burst
                next_tick = time.monotonic() + interval

    def _runtime(self) -> Any:
        return getattr(self.relay, "runtime", None) or _DIRECT

    def write(self, stopped: bool = False) -> bool:
        """Sample and XADD one record; False (logged once per outage, never raised) if Redis refused it. The
        sample and its commit touch the hub: they run on its thread (sidecar/runtime.py), the XADD here."""
        record, commit = self._runtime().call(self.sample)
        if stopped:
            record["stopped"] = 1
        store = self.relay.store
        try:
            store.redis.xadd(
                store.stats_key,
                {RECORD_FIELD: orjson.dumps(record)},
                maxlen=self.settings.stats_len,
                approximate=True,
            )
        except Exception as exc:  # Redis down or slow: the counts roll into the next record
            self.write_errors += 1
            if not self._failing:
                log.warning("stats: cannot write the stats record (%s); will retry", type(exc).__name__)
            self._failing = True
            return False
        if self._failing:
            log.info("stats: writing records again")
        self._failing = False
        self.records_written += 1
        self._runtime().call(commit)
        return True

    # -- sampling -------------------------------------------------------------------------------------------
    def collect(self) -> None:
        """Fold what the reader and the hub counted since the last call into the cumulative counters."""
        reader, hub = self.relay.reader, self.relay.hub
        # Swap, then fold: nothing yields in between, so no count is lost under gevent.
        read, reader.read_by_channel = reader.read_by_channel, {}
        delivered, hub.delivered_by_channel = hub.delivered_by_channel, {}
        for channel, n in read.items():
            self._row(channel)[_INDEX["published"]] += n
        for channel, n in delivered.items():
            self._row(channel)[_INDEX["delivered"]] += n
        seen = {}
        for conn in list(hub.connections.values()):
            before = self._seen_dropped.get(conn.id, 0)
            self.slow_dropped += max(conn.dropped - before, 0)
            seen[conn.id] = conn.dropped
        self._seen_dropped = seen

    def transports(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for conn in list(self.relay.hub.connections.values()):
            counts[conn.transport] = counts.get(conn.transport, 0) + 1
        return counts

    def subscribers(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for channel, record in list(self.relay.hub.channels.items()):
            key = self._key(channel)
            counts[key] = counts.get(key, 0) + len(record.subs)
        return counts

    def sample(self) -> tuple[dict[str, Any], Callable[[], None]]:
        """The record for now, and the commit to call once it is written (the next record then starts here)."""
        self.collect()
        # Millisecond times, and dt their exact difference: a record begins where the previous one ended.
        now = round(self.clock(), 3)
        zeros = [0] * len(COUNTERS)
        deltas: dict[str, list[int]] = {}
        for pattern, values in self.counters.items():
            written = self._written.get(pattern, zeros)
            delta = [v - w for v, w in zip(values, written)]
            if any(delta):
                deltas[pattern] = delta
        subs = self.subscribers()
        channels: dict[str, dict[str, int]] = {}
        for pattern in deltas.keys() | subs.keys():
            entry = {key: v for key, v in zip(COUNTERS.values(), deltas.get(pattern, zeros)) if v}
            if subs.get(pattern):
                entry[SUBSCRIBERS] = subs[pattern]
            channels[pattern] = entry
        latency = [c - w for c, w in zip(self.latency.counts, self._written_latency)]
        slow = self.slow_dropped - self._written_slow
        reader = self.relay.reader
        record = {
            "v": RECORD_VERSION,
            "replica": self.replica,
            "host": self.host,
            "pid": self.pid,
            "port": self.settings.port,
            "ts": now,
            "dt": round(max(now - self._written_at, 0.001), 3),
            "started": self.started,
            "reader": int(bool(reader.alive and reader.healthy)),
            "conn": self.transports(),
            "slow": slow,
            "lat": latency,
            "herd": {"pending": self.gauges["pokes_pending"], "spread": self.gauges["poke_spread"]},
            "ch": _top(channels, RECORD_PATTERNS),
        }

        def commit() -> None:
            for pattern, delta in deltas.items():
                written = self._written.setdefault(pattern, list(zeros))
                for i, d in enumerate(delta):
                    written[i] += d
            for i, d in enumerate(latency):
                self._written_latency[i] += d
            self._written_slow += slow
            self._written_at = now

        return record, commit

    def _key(self, channel: str) -> str:
        pattern = self.labels.of(channel, self.relay.throttle.policy.channels)
        if pattern in self.counters or len(self.counters) < MAX_PATTERNS:
            return pattern
        return OTHER

    def _row(self, channel: str) -> list[int]:
        key = self._key(channel)
        row = self.counters.get(key)
        if row is None:
            row = self.counters[key] = [0] * len(COUNTERS)
        return row


def _top(channels: dict[str, dict[str, int]], limit: int) -> dict[str, dict[str, int]]:
    """At most ``limit`` entries: the busiest, and the rest summed into OTHER."""
    if len(channels) <= limit:
        return channels
    ranked = sorted(channels.items(), key=lambda kv: (-sum(kv[1].values()), kv[0]))
    kept = {p: e for p, e in ranked if p != OTHER}
    kept = dict(list(kept.items())[: limit - 1])
    other: dict[str, int] = {}
    for pattern, entry in ranked:
        if pattern not in kept:
            for key, v in entry.items():
                other[key] = other.get(key, 0) + v
    kept[OTHER] = other
    return kept


# -- Prometheus ---------------------------------------------------------------------------------------------
_HELP = {
    "published": "Messages read from the live streams (every replica reads all of them).",
    "delivered": "Frames queued to this replica's connections.",
    "coalesced": "Messages the throttle folded into a later one.",
    "dropped": "Frames dropped by the throttle or for connections too slow to keep up.",
    "poke_delayed": "Pokes the throttle spread out.",
    "admitted": "Connections admitted by the throttle, per channel they asked for.",
    "rejected": "Connections rejected by the throttle, per channel they asked for.",
    "pulled": "Reads of GET /channels/<channel>/state.",
}


class StatsCollector(Collector):
    """The relay's counters as Prometheus metric families, read at each scrape (nothing is kept twice).

    Names (docs/dashboard.md): ``sidecar_<counter>_total{pattern}`` for every key of :data:`COUNTERS`,
    ``sidecar_subscribers{pattern}``, ``sidecar_connections{transport}``, the
    ``sidecar_delivery_latency_seconds`` histogram, and per shard ``sidecar_reader_position_timestamp_seconds``,
    ``sidecar_reader_lag_seconds``, ``sidecar_reader_idle_seconds`` and ``sidecar_reader_stuck``.
    """

    def __init__(self, stats: Stats) -> None:
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        stats = self.stats
        relay, reader, hub = stats.relay, stats.relay.reader, stats.relay.hub
        stats.collect()
        for name, i in _INDEX.items():
            family = CounterMetricFamily(f"sidecar_{name}", _HELP.get(name, f"{name} per channel pattern"),
                                         labels=["pattern"])  # fmt: skip
            for pattern, row in sorted(stats.counters.items()):
                family.add_metric([pattern], row[i])
            yield family
        subs = GaugeMetricFamily("sidecar_subscribers", "Subscriptions on this replica.", labels=["pattern"])
        for pattern, n in sorted(stats.subscribers().items()):
            subs.add_metric([pattern], n)
        yield subs
        conns = GaugeMetricFamily("sidecar_connections", "Open client connections.", labels=["transport"])
        for transport, n in sorted({"sse": 0, "ws": 0, **stats.transports()}.items()):
            conns.add_metric([transport], n)
        yield conns
        counter, gauge = CounterMetricFamily, GaugeMetricFamily
        scalars: list[tuple[Callable[..., Metric], str, str, float]] = [
            (counter, "sidecar_slow_dropped_frames", "Frames dropped because a connection could not keep up (it "
             "was resynchronised).", stats.slow_dropped),
            (counter, "sidecar_stuck_closed", "Connections closed while stuck in one socket write.",
             relay.control.stuck_closed),
            (counter, "sidecar_messages_read", "Messages read from every shard.", reader.messages_read),
            (counter, "sidecar_frames_encoded", "Frames encoded (once per message, mode and transport).",
             hub.frames_encoded),
            (gauge, "sidecar_reader_healthy", "1 while the shard reader reads.", int(reader.alive and reader.healthy)),
            (counter, "sidecar_reader_reconnects", "Reader reconnects to Redis.", reader.reconnects),
            (counter, "sidecar_reader_watchdog_reconnects", "Reader connections the watchdog closed because their "
             "shard's stream moved on while they read nothing.", reader.kicks),
            (counter, "sidecar_reader_lost_tails", "Times a shard's stream lost entries the reader had read (a lossy "
             "failover); its subscribers were resynchronised.", reader.lost_tails),
            (counter, "sidecar_dispatch_errors", "Messages skipped because they could not be dispatched (their "
             "subscribers were resynchronised).", hub.dispatch_errors),
            (gauge, "sidecar_pokes_pending", "Pokes waiting to be sent.", stats.gauges["pokes_pending"]),
            (gauge, "sidecar_poke_spread_seconds", "Seconds pokes are spread over.", stats.gauges["poke_spread"]),
            (counter, "sidecar_stats_write_errors", "Stats records Redis refused.", stats.write_errors),
        ]  # fmt: skip
        for kind, name, help_text, value in scalars:
            yield kind(name, help_text, value=value)
        # Where the reader is in each shard: the time in the id of the last entry it took (0: the shard was empty).
        # Replicas read the same shards, so max - min over replicas is how far the slowest one is behind.
        position = GaugeMetricFamily("sidecar_reader_position_timestamp_seconds", "Unix time of the last entry the "
                                     "reader took from each shard's live stream.", labels=["shard"])  # fmt: skip
        for shard, key in enumerate(relay.store.live_keys()):
            last = reader.last_ids.get(key, "0-0")
            position.add_metric([str(shard)], int(last.partition("-")[0] or 0) / 1000)
        yield position
        lag = GaugeMetricFamily("sidecar_reader_lag_seconds", "Time between the newest entry of each shard's stream "
                                "and the last one the reader took.", labels=["shard"])  # fmt: skip
        idle = GaugeMetricFamily("sidecar_reader_idle_seconds", "Seconds since each shard's reader loop last got a "
                                 "reply from Redis.", labels=["shard"])  # fmt: skip
        stuck = GaugeMetricFamily("sidecar_reader_stuck", "1 while a shard's reader is stuck (/healthz is not ready).",
                                  labels=["shard"])  # fmt: skip
        for g in reader.lags():
            lag.add_metric([str(g.shard)], g.lag_ms / 1000)
            idle.add_metric([str(g.shard)], g.idle)
            stuck.add_metric([str(g.shard)], int(g.stuck))
        yield from (lag, idle, stuck)
        cumulative, buckets = 0, []
        for bound, n in zip(stats.latency.bounds, stats.latency.counts):
            cumulative += n
            buckets.append((floatToGoString(bound / 1000), cumulative))
        yield HistogramMetricFamily(
            "sidecar_delivery_latency_seconds",
            "Publish call to frame written to the socket (the oldest frame of each write).",
            buckets=buckets,
            sum_value=stats.latency.sum_ms / 1000,
        )


def exposition(stats: Stats) -> bytes:
    """The body of ``GET /metrics`` (Prometheus text format, :data:`CONTENT_TYPE_LATEST`): the relay's metrics
    and the process's own (``process_*``: memory, CPU, open files).

    Example::

        return Response(exposition(relay.stats), content_type=CONTENT_TYPE_LATEST)
    """
    return generate_latest(stats.registry)
