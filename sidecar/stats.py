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

Channels are counted by pattern (:func:`pattern_of`: ``task:9f1c...`` -> ``task:*``) to bound cardinality.

Example (the herd control counting what it did)::

    relay.stats.count("coalesced", channel)
    relay.stats.gauge("pokes_pending", len(heap))
"""

from __future__ import annotations

import bisect
import functools
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import orjson

from sidecar.core.connection import Connection

log = logging.getLogger(__name__)

RECORD_VERSION = 1
RECORD_FIELD = "r"  # the stream entry's one field: the record as JSON

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

OTHER = "*"  # the pattern of everything past the caps below
MAX_PATTERNS = 500  # patterns counted per process; later ones count as OTHER
RECORD_PATTERNS = 50  # patterns per record, the most active first; the rest are summed into OTHER

_ID_LIKE = re.compile(r"[0-9@]")


@functools.lru_cache(maxsize=65_536)  # called for every subscribed channel every second
def pattern_of(channel: str) -> str:
    """The stats key of a channel: segments after the first that look like ids (a digit or an ``@``, or longer
    than 32 characters) become ``*``. ``task:9f1c-...`` -> ``task:*``, ``user:42:inbox`` -> ``user:*:inbox``,
    ``demo:board`` stays ``demo:board``. Idempotent, so callers may pass a channel or a pattern."""
    head, sep, rest = channel.partition(":")
    if not sep:
        return channel
    parts = ("*" if _ID_LIKE.search(p) or len(p) > 32 else p for p in rest.split(":"))
    return f"{head}:{':'.join(parts)}"


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
        self._thread = threading.Thread(target=self._run, name="sidecar-stats", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread = None

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

    def write(self) -> bool:
        """Sample and XADD one record; False (logged once per outage, never raised) if Redis refused it."""
        record, commit = self.sample()
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
        commit()
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
        pattern = pattern_of(channel)
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
PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

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


def prometheus_text(stats: Stats) -> str:
    """The process's counters in the Prometheus text format (version 0.0.4), for ``GET /metrics``.

    Example::

        return Response(prometheus_text(relay.stats), mimetype=PROMETHEUS_CONTENT_TYPE)
    """
    stats.collect()
    lines: list[str] = []

    def metric(name: str, kind: str, help_text: str, samples: Sequence[tuple[str, float]]) -> None:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        lines.extend(f"{name}{labels} {_number(value)}" for labels, value in samples)

    for name, i in _INDEX.items():
        samples = [(_labels(pattern=p), row[i]) for p, row in sorted(stats.counters.items())]
        metric(f"sidecar_{name}_total", "counter", _HELP[name], samples)
    subs = sorted(stats.subscribers().items())
    metric("sidecar_subscribers", "gauge", "Subscriptions on this replica.", [(_labels(pattern=p), n) for p, n in subs])
    transports = {"sse": 0, "ws": 0, **stats.transports()}
    metric(
        "sidecar_connections",
        "gauge",
        "Open client connections.",
        [(_labels(transport=t), n) for t, n in sorted(transports.items())],
    )
    metric(
        "sidecar_slow_dropped_frames_total",
        "counter",
        "Frames dropped because a connection could not keep up (it was resynchronised).",
        [("", stats.slow_dropped)],
    )
    reader, hub = stats.relay.reader, stats.relay.hub
    metric("sidecar_messages_read_total", "counter", "Messages read from every shard.", [("", reader.messages_read)])
    metric("sidecar_frames_encoded_total", "counter", "Frames encoded (once per message, mode and transport).",
           [("", hub.frames_encoded)])  # fmt: skip
    metric("sidecar_reader_healthy", "gauge", "1 while the shard reader reads.",
           [("", int(bool(reader.alive and reader.healthy)))])  # fmt: skip
    metric("sidecar_reader_reconnects_total", "counter", "Reader reconnects to Redis.", [("", reader.reconnects)])
    metric("sidecar_dispatch_errors_total", "counter", "Messages skipped because they could not be dispatched.",
           [("", hub.dispatch_errors)])  # fmt: skip
    metric("sidecar_pokes_pending", "gauge", "Pokes waiting to be sent.", [("", stats.gauges["pokes_pending"])])
    metric("sidecar_poke_spread_seconds", "gauge", "Seconds pokes are spread over.",
           [("", stats.gauges["poke_spread"])])  # fmt: skip
    metric("sidecar_stats_write_errors_total", "counter", "Stats records Redis refused.", [("", stats.write_errors)])

    name = "sidecar_delivery_latency_seconds"
    lines.append(f"# HELP {name} Publish call to frame written to the socket (oldest frame of each write).")
    lines.append(f"# TYPE {name} histogram")
    cumulative = 0
    for bound, n in zip(stats.latency.bounds, stats.latency.counts):
        cumulative += n
        le = "+Inf" if bound == float("inf") else _number(bound / 1000)
        lines.append(f"{name}_bucket{_labels(le=le)} {cumulative}")
    lines.append(f"{name}_sum {_number(stats.latency.sum_ms / 1000)}")
    lines.append(f"{name}_count {cumulative}")
    return "\n".join(lines) + "\n"


def _labels(**labels: str) -> str:
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items()) + "}"


def _escape(value: str) -> str:
    # Prometheus text format: label values escape backslash, double quote and line feed.
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if isinstance(value, int) or float(value).is_integer():
        return str(int(value))
    return repr(float(value))
