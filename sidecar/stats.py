"""Counters and latency histograms of one sidecar process, its per-second stats record, and `/metrics`.

One background thread (a greenlet under gevent) samples the relay once per ``stats_interval`` and XADDs one
small JSON record to ``<prefix>:stats`` (MAXLEN ~ ``stats_len``). The dashboard reads only that stream, so it
sees every replica and costs the relay nothing. docs/dashboard.md documents the record; in short::

    {"v": 2, "replica": "web-1:4242", "host": "web-1", "pid": 4242, "port": 8000, "front": "gevent",
     "version": "0.1.0", "ts": 1732761000.002, "dt": 1.001, "started": 1732760990.5, "reader": 1,
     "conn": {"sse": 3, "ws": 1}, "slow": 0, "stuck": 0, "lat": [0, 4, 9, 1, 0, ...],
     "stage": {"read": [...], "held": [...], "queue": [...]}, "shards": {"0": {"lag": 0, "reconn": 0}, ...},
     "adm": {"ok": 2, "defer": 5, "rej": 0, "tries": 7, "level": 0.4, "rate": 20.0, "burst": 100},
     "qd": [3, 1, 0, ...], "slowest": [{"t": "ws", "ch": 2, "qb": 1830, "qf": 1, "age": 41.5}],
     "herd": {"pending": 0, "spread": 0.0},
     "ch": {"orders:*": {"pub": 12, "dlv": 36, "subs": 3, "modes": {"diff": 3}, "lat": [...]}, "task:*": {"pub": 4}}}

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
import heapq
import importlib.metadata
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import repeat
from typing import Any

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeHistogramMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from sidecar.core.connection import Connection
from sidecar.core.patterns import glob_match
from sidecar.core.protocol import Message
from sidecar.core.throttle import PATTERN_RE
from sidecar.runtime import GeventRuntime

__all__ = ["CONTENT_TYPE_LATEST", "Labels", "Stats", "exposition"]

log = logging.getLogger(__name__)

RECORD_VERSION = 2
RECORD_FIELD = "r"  # the stream entry's one field: the record as JSON
STOP_JOIN = 2.0  # seconds stop() waits for a record being written before it writes the last one
_DIRECT = GeventRuntime()  # for a relay without a runtime (unit tests): calls are direct

# Upper bounds (ms) of the latency buckets: publish call -> frame written to the socket (and of every stage).
LATENCY_BOUNDS_MS = (0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, float("inf"))
# Upper bounds of the per-connection queue depth buckets (frames queued at sample time).
QUEUE_BOUNDS = (0, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, float("inf"))
# Where the time goes: publish -> this replica's reader; held by the throttle; queued -> written to the socket.
STAGES = ("read", "held", "queue")
ADMISSION = ("ok", "defer", "rej")  # admitted; refused by the token bucket (told when to retry); over a cap
SLOWEST = 5  # connections listed in a record's "slowest"

# Per-pattern counters: the name callers use -> its key in a record's "ch" entries (zeros are left out).
COUNTERS = {
    "published": "pub",  # messages read from the live streams (every replica reads all of them)
    "delivered": "dlv",  # frames queued to this replica's connections
    "coalesced": "coal",  # messages the throttle held for a window (not sent at once)
    "dropped": "drop",  # frames dropped: by the throttle, or for a connection too slow to keep up
    "poke_delayed": "delay",  # pokes the throttle spread out instead of sending at once
    "admitted": "adm",  # connections the admission control let in (counted per channel asked for)
    "rejected": "rej",  # connections it turned away (the same)
    "pulled": "pull",  # GET /channels/<c>/state (the pull of poke/pull)
    "flushed": "win",  # coalescing windows the throttle sent (one frame out each: frames out = pub - coal + win)
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


def package_version() -> str:
    try:
        return importlib.metadata.version("celery-realtime-sidecar")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout that was never installed
        return "0+unknown"


class Histogram:
    """Cumulative bucket counts (and the sum, for Prometheus) of observed milliseconds."""

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BOUNDS_MS) -> None:
        self.bounds = bounds
        self.counts = [0] * len(bounds)
        self.sum_ms = 0.0

    def observe(self, value: float, n: int = 1) -> None:
        """`n` observations of `value`."""
        value = max(value, 0.0)  # publisher and relay clocks may disagree by a little
        self.counts[bisect.bisect_left(self.bounds, value)] += n
        self.sum_ms += value * n


@dataclass(slots=True)
class Census:
    """What :meth:`Stats.collect` found in its one pass over the connections (and the channels' subscriptions)."""

    transports: dict[str, int]  # transport -> open connections
    modes: dict[str, dict[str, int]]  # pattern -> mode -> subscriptions (modes without any left out)
    depths: list[int]  # connections per queue depth bucket (QUEUE_BOUNDS)
    behind: list[Connection]  # connections with bytes queued or in a socket write

    def subscribers(self) -> dict[str, int]:
        return {pattern: sum(by_mode.values()) for pattern, by_mode in self.modes.items()}


class Stats:
    """The counters of one relay, and the thread that writes its stats record."""

    def __init__(self, relay: Any, clock: Callable[[], float] = time.time) -> None:
        self.relay = relay
        self.settings = relay.settings
        self.clock = clock
        patterns = (p.strip() for p in self.settings.stats_patterns.split(","))
        self.labels = Labels([p for p in patterns if p], self.settings.stats_channel_names)
        self.latency = Histogram()
        self.stages = {name: Histogram() for name in STAGES}
        self.pattern_latency: dict[str, Histogram] = {}  # pattern -> publish to socket write, like `latency`
        self.counters: dict[str, list[int]] = {}  # pattern -> cumulative counts, in COUNTERS order
        self.gauges: dict[str, float] = dict.fromkeys(GAUGES, 0)
        self.slow_dropped = 0  # frames dropped for slow consumers, ever
        self.records_written = 0
        self.write_errors = 0
        self.started = round(clock(), 3)
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.replica = f"{self.host}:{self.pid}"
        self.front = getattr(relay, "front", "gevent")
        self.version = package_version()
        # What the last written record covered: the next one carries the difference of every cumulative count.
        self._written_at = self.started
        self._written: dict[tuple[str, str], list[int]] = {}
        self._seen_dropped: dict[int, int] = {}  # connection id -> its `dropped` when last looked at
        self._opened: dict[int, float] = {}  # connection id -> when it was first seen (its age in "slowest")
        self._failing = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.registry = CollectorRegistry(auto_describe=False)  # per relay: tests run several in one process
        self.registry.register(StatsCollector(self))
        ProcessCollector(registry=self.registry)
        relay.throttle.on_held = self.observe_held
        relay.throttle.on_flushed = lambda channel: self.count("flushed", channel)
        # The read stage is timed where the reader hands its decoded messages on (whatever the reader's kind).
        dispatch = getattr(relay.reader, "on_messages", None)
        if dispatch is not None:

            def on_messages(messages: list[Message]) -> None:
                # Timed here, counted on the hub's thread: on asyncio the reader's loops are several OS threads.
                self._runtime().call_soon(self.observe_read, messages, self.clock() * 1000)
                dispatch(messages)

            relay.reader.on_messages = on_messages

    # -- what the relay and the throttle call ---------------------------------------------------------------
    def observe_write(self, written: Connection | Sequence[Connection]) -> None:
        """After socket writes, one connection's or a write pass's (sidecar/writer.py): the age of the oldest frame
        of each write (one observation per write), in all, for its channel's pattern, and since it was queued
        (the queue stage). A pass is timed once, at its end, and the writes of one message to many sockets are
        counted as one observation times their number."""
        conns = (written,) if isinstance(written, Connection) else written
        now = 0.0
        ts = at = 0.0
        channel: str | None = None
        n = 0
        for conn in conns:
            if not conn.batch_ts:
                continue
            if n and conn.batch_ts == ts and conn.batch_at == at and conn.batch_channel == channel:
                n += 1
                continue
            if n:
                self._observe_writes(now, ts, at, channel, n)
            else:
                now = self.clock() * 1000
            ts, at, channel, n = conn.batch_ts, conn.batch_at, conn.batch_channel, 1
        if n:
            self._observe_writes(now, ts, at, channel, n)

    def _observe_writes(self, now: float, ts: float, at: float, channel: str | None, n: int) -> None:
        ms = now - ts
        self.latency.observe(ms, n)
        if channel is not None:
            key = self._key(channel)
            hist = self.pattern_latency.get(key)
            if hist is None:
                hist = self.pattern_latency[key] = Histogram()
            hist.observe(ms, n)
        hub_clock = self.relay.hub.clock
        if at and hub_clock is not None:
            self.stages["queue"].observe((hub_clock() - at) * 1000, n)

    def observe_read(self, messages: Iterable[Message], now_ms: float | None = None) -> None:
        """Messages the reader decoded at ``now_ms`` (default: now): publish -> there is the read stage."""
        now, read = self.clock() * 1000 if now_ms is None else now_ms, self.stages["read"]
        for msg in messages:
            if msg.ts:
                read.observe(now - msg.ts)

    def observe_held(self, seconds: float) -> None:
        """A delivery the throttle held (a coalescing window, a spread poke) went out after ``seconds``."""
        self.stages["held"].observe(seconds * 1000)

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
    def collect(self) -> Census:
        """Fold what the reader and the hub counted since the last call into the cumulative counters, and walk
        the connections once (their slow-consumer drops, transports, queues) and the channels once (subscriptions
        by mode): the :class:`Census` a record and /metrics show."""
        reader, hub = self.relay.reader, self.relay.hub
        # Swap, then fold: nothing yields in between, so no count is lost under gevent.
        read, reader.read_by_channel = reader.read_by_channel, {}
        delivered, hub.delivered_by_channel = hub.delivered_by_channel, {}
        for channel, n in read.items():
            self._row(channel)[_INDEX["published"]] += n
        for channel, n in delivered.items():
            self._row(channel)[_INDEX["delivered"]] += n
        connections, now = hub.connections, self.clock()
        # Only what changes is written: a drop count where there was a drop (absent reads as 0), a first-seen
        # time for a new connection; most connections have neither, so the pass makes no dict of them all.
        seen_dropped, seen, opened = self._seen_dropped, {}, self._opened
        transports: dict[str, int] = {}
        depths, behind, dropped = [0] * len(QUEUE_BOUNDS), [], 0
        bucket_of, bounds = bisect.bisect_left, QUEUE_BOUNDS
        for conn in list(connections.values()):
            cid, n = conn.id, conn.dropped
            if n:
                dropped += max(n - seen_dropped.get(cid, 0), 0)
                seen[cid] = n
            if cid not in opened:
                opened[cid] = now
            transports[conn.transport] = transports.get(conn.transport, 0) + 1
            queued = len(conn.queue)
            depths[bucket_of(bounds, queued) if queued else 0] += 1
            if conn.queued_bytes or conn.writing_since is not None:
                behind.append(conn)
        if len(opened) > len(connections):  # it holds every connection now: the rest have closed
            for cid in opened.keys() - connections.keys():
                del opened[cid]
        self.slow_dropped += dropped
        self._seen_dropped = seen
        # Subscriptions are counted through the channels, not the connections' own: a channel's pattern is looked
        # up once for all its subscribers (counted in the pass above, collect() took 1.4x as long at 10,000).
        return Census(transports, self.modes(), depths, behind)

    def modes(self) -> dict[str, dict[str, int]]:
        """Subscriptions on this replica per pattern and mode (modes without any left out)."""
        counts: dict[str, dict[str, int]] = {}
        for channel, record in list(self.relay.hub.channels.items()):
            by_mode = counts.setdefault(self._key(channel), {})
            for sub in list(record.subs.values()):
                by_mode[sub.mode] = by_mode.get(sub.mode, 0) + 1
        return {pattern: by_mode for pattern, by_mode in counts.items() if by_mode}

    def slowest(self, census: Census, now: float) -> list[dict[str, Any]]:
        """The :data:`SLOWEST` connections with the most bytes queued (or in a socket write): no id, address or
        channel name."""
        slowest = heapq.nlargest(SLOWEST, census.behind, key=lambda c: (c.queued_bytes, len(c.queue)))
        return [
            {"t": c.transport, "ch": len(c.subs), "qb": c.queued_bytes, "qf": len(c.queue),
             "age": round(max(now - self._opened.get(c.id, now), 0.0), 1)}
            for c in slowest
        ]  # fmt: skip

    def _cumulative(self) -> dict[tuple[str, str], list[int]]:
        """A copy of every count a record carries the difference of, by (kind, name)."""
        relay = self.relay
        counts = {("ch", p): list(row) for p, row in self.counters.items()}
        counts |= {("plat", p): list(h.counts) for p, h in self.pattern_latency.items()}
        counts |= {("stage", name): list(h.counts) for name, h in self.stages.items()}
        counts[("lat", "")] = list(self.latency.counts)
        counts[("adm", "")] = [relay.throttle.admissions[k] for k in ADMISSION]
        counts[("slow", "")] = [self.slow_dropped]
        control = getattr(relay, "control", None)  # made after the stats
        counts[("stuck", "")] = [control.stuck_closed if control is not None else 0]
        loops = getattr(relay.reader, "loop_of", {})
        for key, shard in getattr(relay.reader, "shards", {}).items():
            loop = loops.get(key)
            counts[("reconn", str(shard))] = [getattr(loop, "reconnects", 0)]
        return counts

    def shards(self, delta: dict[tuple[str, str], list[int]]) -> dict[str, dict[str, int | None]]:
        """Per shard: the reader's lag (ms; None until the watchdog has read the shard's head) and reconnects."""
        reader = self.relay.reader
        lags = {g.shard: g.lag_ms for g in reader.lags()} if hasattr(reader, "lags") else {}
        heads = getattr(reader, "heads", {})
        return {
            str(shard): {"lag": lags.get(shard) if key in heads else None, "reconn": delta[("reconn", str(shard))][0]}
            for key, shard in getattr(reader, "shards", {}).items()
        }

    def sample(self) -> tuple[dict[str, Any], Callable[[], None]]:
        """The record for now, and the commit to call once it is written (the next record then starts here)."""
        census = self.collect()
        # Millisecond times, and dt their exact difference: a record begins where the previous one ended.
        now = round(self.clock(), 3)
        cumulative = self._cumulative()
        written = self._written
        delta = {k: [v - w for v, w in zip(values, written.get(k, repeat(0)))] for k, values in cumulative.items()}
        modes = census.modes
        patterns = {p for (kind, p), values in delta.items() if kind in ("ch", "plat") and any(values)}
        zeros = [0] * len(COUNTERS)
        channels: dict[str, dict[str, Any]] = {}
        for pattern in patterns | modes.keys():
            row = delta.get(("ch", pattern), zeros)
            entry: dict[str, Any] = {key: v for key, v in zip(COUNTERS.values(), row) if v}
            if pattern in modes:
                entry[SUBSCRIBERS] = sum(modes[pattern].values())
                entry["modes"] = modes[pattern]
            latency = delta.get(("plat", pattern))
            if latency and any(latency):
                entry["lat"] = latency
            channels[pattern] = entry
        relay, reader = self.relay, self.relay.reader
        ok, defer, rej = delta[("adm", "")]
        bucket = relay.throttle.admission_bucket()
        record = {
            "v": RECORD_VERSION,
            "replica": self.replica,
            "host": self.host,
            "pid": self.pid,
            "port": self.settings.port,
            "front": self.front,
            "version": self.version,
            "ts": now,
            "dt": round(max(now - self._written_at, 0.001), 3),
            "started": self.started,
            "reader": int(bool(reader.alive and reader.healthy)),
            "conn": census.transports,
            "slow": delta[("slow", "")][0],
            "stuck": delta[("stuck", "")][0],
            "lat": delta[("lat", "")],
            "stage": {name: delta[("stage", name)] for name in STAGES},
            "shards": self.shards(delta),
            "adm": {"ok": ok, "defer": defer, "rej": rej, "tries": ok + defer + rej,
                    "level": round(bucket[0], 2) if bucket else None,
                    "rate": relay.throttle.policy.admit_rate, "burst": bucket[1] if bucket else 0},
            "qd": census.depths,
            "slowest": self.slowest(census, now),
            "herd": {"pending": self.gauges["pokes_pending"], "spread": self.gauges["poke_spread"]},
            "ch": _top(channels, RECORD_PATTERNS),
        }  # fmt: skip

        def commit() -> None:
            self._written = cumulative
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


def _top(channels: dict[str, dict[str, Any]], limit: int) -> dict[str, dict[str, Any]]:
    """At most ``limit`` entries: the busiest, and the rest summed into OTHER."""
    if len(channels) <= limit:
        return channels
    ranked = sorted(channels.items(), key=lambda kv: (-sum(v for v in kv[1].values() if isinstance(v, int)), kv[0]))
    kept = {p: e for p, e in ranked if p != OTHER}
    kept = dict(list(kept.items())[: limit - 1])
    other: dict[str, Any] = {}
    for pattern, entry in ranked:
        if pattern not in kept:
            for key, v in entry.items():
                if isinstance(v, list):  # a histogram
                    other[key] = [a + b for a, b in zip(other.get(key, repeat(0)), v)]
                elif isinstance(v, dict):  # modes
                    into = other.setdefault(key, {})
                    for mode, n in v.items():
                        into[mode] = into.get(mode, 0) + n
                else:
                    other[key] = other.get(key, 0) + v
    kept[OTHER] = other
    return kept


# -- Prometheus ---------------------------------------------------------------------------------------------
_HELP = {
    "published": "Messages read from the live streams (every replica reads all of them).",
    "delivered": "Frames queued to this replica's connections.",
    "coalesced": "Messages the throttle held for a coalescing window (sent in its frame, not at once).",
    "dropped": "Frames dropped by the throttle or for connections too slow to keep up.",
    "poke_delayed": "Pokes the throttle spread out.",
    "admitted": "Connections admitted by the throttle, per channel they asked for.",
    "rejected": "Connections rejected by the throttle, per channel they asked for.",
    "pulled": "Reads of GET /channels/<channel>/state.",
    "flushed": "Coalescing windows the throttle sent (one frame out each).",
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
        census = stats.collect()
        for name, i in _INDEX.items():
            family = CounterMetricFamily(f"sidecar_{name}", _HELP.get(name, f"{name} per channel pattern"),
                                         labels=["pattern"])  # fmt: skip
            for pattern, row in sorted(stats.counters.items()):
                family.add_metric([pattern], row[i])
            yield family
        subs = GaugeMetricFamily("sidecar_subscribers", "Subscriptions on this replica.", labels=["pattern"])
        for pattern, n in sorted(census.subscribers().items()):
            subs.add_metric([pattern], n)
        yield subs
        conns = GaugeMetricFamily("sidecar_connections", "Open client connections.", labels=["transport"])
        for transport, n in sorted({"sse": 0, "ws": 0, **census.transports}.items()):
            conns.add_metric([transport], n)
        yield conns
        counter, gauge = CounterMetricFamily, GaugeMetricFamily
        scalars: list[tuple[Callable[..., Metric], str, str, float]] = [
            (counter, "sidecar_slow_dropped_frames", "Frames dropped because a connection could not keep up (it "
             "was resynchronised).", stats.slow_dropped),
            (counter, "sidecar_stuck_closed", "Connections closed while stuck in one socket write.",
             relay.control.stuck_closed),
            (counter, "sidecar_messages_read", "Messages the live reader decoded (shards mode: every message "
             "published; channels mode: those of its clients' channels).", reader.messages_read),
            (counter, "sidecar_reader_caught_up", "Messages the channels-mode reader took from history on a "
             "(re)subscribe or position check: what pub/sub lost or raced (0 in shards mode).",
             getattr(reader, "caught_up", 0)),
            (counter, "sidecar_frames_encoded", "Frames encoded (once per message, mode and transport).",
             hub.frames_encoded),
            (gauge, "sidecar_reader_healthy", "1 while the live reader reads.", int(reader.alive and reader.healthy)),
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
        yield HistogramMetricFamily(
            "sidecar_delivery_latency_seconds",
            "Publish call to frame written to the socket (the oldest frame of each write).",
            buckets=_buckets(stats.latency),
            sum_value=stats.latency.sum_ms / 1000,
        )
        yield from self._v2(stats, census)

    def _v2(self, stats: Stats, census: Census) -> Iterator[Metric]:
        """What the v2 record added: stages, per-pattern latency, admission, queue depths, shard reconnects."""
        relay = stats.relay
        info = GaugeMetricFamily("sidecar_info", "The front serving, and the version.", labels=["front", "version"])
        info.add_metric([stats.front, stats.version], 1)
        yield info
        stages = HistogramMetricFamily("sidecar_stage_latency_seconds", "Where the time goes: read (publish to this "
                                       "replica's reader), held (by a coalescing window or poke spreading, only "
                                       "deliveries that were held), queue (queued to written to the socket).",
                                       labels=["stage"])  # fmt: skip
        for name, hist in stats.stages.items():
            stages.add_metric([name], _buckets(hist), hist.sum_ms / 1000)
        yield stages
        per_pattern = HistogramMetricFamily("sidecar_pattern_latency_seconds", "Publish call to frame written to the "
                                            "socket, per channel pattern.", labels=["pattern"])  # fmt: skip
        for pattern, hist in sorted(stats.pattern_latency.items()):
            per_pattern.add_metric([pattern], _buckets(hist), hist.sum_ms / 1000)
        yield per_pattern
        admissions = CounterMetricFamily("sidecar_admissions", "Connection attempts by outcome: ok (admitted), "
                                         "defer (the token bucket was empty: told when to retry), rej (over "
                                         "max_connections or the unauthenticated budget).",
                                         labels=["outcome"])  # fmt: skip
        for outcome in ADMISSION:
            admissions.add_metric([outcome], relay.throttle.admissions[outcome])
        yield admissions
        bucket = relay.throttle.admission_bucket()
        if bucket is not None:
            yield GaugeMetricFamily("sidecar_admission_tokens", "Tokens in the admission bucket.", value=bucket[0])
        cumulative, buckets = 0, []
        for bound, n in zip(QUEUE_BOUNDS, census.depths):
            cumulative += n
            buckets.append((floatToGoString(bound), cumulative))
        yield GaugeHistogramMetricFamily("sidecar_connection_queue_frames", "Frames queued per connection, now.",
                                         buckets=buckets, gsum_value=sum(len(c.queue) for c in
                                         list(relay.hub.connections.values())))  # fmt: skip
        reconnects = CounterMetricFamily("sidecar_reader_shard_reconnects", "Reconnects of the reader connection "
                                         "that reads each shard (errors, MOVED, the watchdog).",
                                         labels=["shard"])  # fmt: skip
        loops = getattr(relay.reader, "loop_of", {})
        for key, shard in getattr(relay.reader, "shards", {}).items():
            reconnects.add_metric([str(shard)], getattr(loops.get(key), "reconnects", 0))
        yield reconnects


def _buckets(hist: Histogram) -> list[tuple[str, float]]:
    """Prometheus' cumulative buckets of a histogram of milliseconds, in seconds."""
    cumulative, buckets = 0, list[tuple[str, float]]()
    for bound, n in zip(hist.bounds, hist.counts):
        cumulative += n
        buckets.append((floatToGoString(bound / 1000), cumulative))
    return buckets


def exposition(stats: Stats) -> bytes:
    """The body of ``GET /metrics`` (Prometheus text format, :data:`CONTENT_TYPE_LATEST`): the relay's metrics
    and the process's own (``process_*``: memory, CPU, open files).

    Example::

        return Response(exposition(relay.stats), content_type=CONTENT_TYPE_LATEST)
    """
    return generate_latest(stats.registry)
