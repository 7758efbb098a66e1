"""Stats records -> what the dashboard shows. Pure: no Redis, no Panel, no Bokeh (pandas only on request).

Every sidecar replica XADDs one record per second to ``<prefix>:stats`` (sidecar/stats.py writes it,
docs/dashboard.md documents it). A record's counts cover ``(ts - dt, ts]``. The :class:`Window` keeps the
records of the last minutes and turns them into one-second bins:

- counts are spread evenly over the seconds their record covers, so a late or merged record (a replica that
  could not write for a while) still lands where it happened, and bins add up exactly to what was counted;
- ``published`` is *one* replica's count, not the sum: every replica reads every message. It is the
  longest-running replica with a healthy reader that covers the second (see :func:`_rank`);
  everything else (delivered, coalesced, dropped, latency, connections, subscribers) is summed;
- a bin is *settled* once every live replica has reported past it; only settled bins are plotted, so a plot
  never shows a half-counted second;
- a replica with no record for ``stale_after`` seconds is stale: marked, and no longer waited for.

Example::

    window = Window(span=600)
    window.add(records)              # dashboard.feed reads them from the stream
    end = window.settled(time.time())
    points = window.series(end - 60, end)
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from sidecar.core.patterns import glob_match
from sidecar.stats import COUNTERS, LATENCY_BOUNDS_MS, QUEUE_BOUNDS, RECORD_FIELD, SUBSCRIBERS

COUNT_KEYS = tuple(COUNTERS.values())  # "pub", "dlv", "coal", "drop", "delay", "adm", "rej", "pull", "win"
N_BUCKETS = len(LATENCY_BOUNDS_MS)
VERSIONS = (1, 2)  # record versions this dashboard reads (v2 adds fields; docs/dashboard.md, "The stats record")
N_QUEUE = len(QUEUE_BOUNDS)  # the per-connection queue-depth histogram of v2 records ("qd"), in frames
MODES = ("event", "diff", "state", "poke")  # v2 subscribers by mode, per pattern
STAGES = ("read", "held", "queue")  # v2 "stage" histograms: Redis -> reader, held by the throttle, queued
ADMISSION = ("ok", "defer", "rej", "tries")  # v2 "adm" counts
QUANTILES = (50, 95, 99)
Labels = str | frozenset[str] | None  # which channel labels a series counts: one, a set of them, or all


# -- records ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Record:
    """One replica's stats record, as read from the stream."""

    id: str  # the stream id
    replica: str
    ts: float  # unix seconds when sampled
    dt: float  # seconds the counts cover
    started: float  # when the replica's process started
    host: str = ""
    pid: int = 0
    port: int = 0
    reader_ok: bool = True
    conn: Mapping[str, int] = field(default_factory=dict)  # transport -> open connections
    slow: int = 0  # frames dropped for slow consumers
    lat: tuple[int, ...] = (0,) * N_BUCKETS  # latency histogram counts
    pending: float = 0  # pokes waiting (herd control)
    spread: float = 0.0  # seconds pokes are spread over
    channels: Mapping[str, Mapping[str, int]] = field(default_factory=dict)  # pattern -> counts
    stopped: bool = False  # the replica's last record after a clean stop
    # -- v2 (empty in v1 records) ---------------------------------------------------------------------------
    v: int = 1  # the record's version
    kind: str = "relay"  # "relay" (a sidecar replica) or "pub" (a publisher: Celery worker, POST /publish)
    front: str = ""  # "gevent" | "asyncio"
    version: str = ""  # the package version
    stage: Mapping[str, tuple[int, ...]] = field(default_factory=dict)  # STAGES -> latency histogram
    shards: Mapping[str, tuple[float | None, int]] = field(default_factory=dict)  # shard -> (lag ms, reconnects)
    adm: Mapping[str, float] = field(default_factory=dict)  # ok, defer, rej, tries (counts); level, rate, burst
    qd: tuple[int, ...] = ()  # queue depth histogram (QUEUE_BOUNDS), connections at sample time
    slowest: tuple[Mapping[str, Any], ...] = ()  # the slowest connections: t, ch, qb, qf, age
    stuck: int = 0  # connections closed for a stuck write
    ch_lat: Mapping[str, tuple[int, ...]] = field(default_factory=dict)  # pattern -> latency histogram
    modes: Mapping[str, Mapping[str, int]] = field(default_factory=dict)  # pattern -> subscribers by mode
    n: int = 0  # "pub" records: publishes
    ack: tuple[int, ...] = ()  # "pub" records: publish call -> Redis acknowledged (latency histogram)

    @property
    def begin(self) -> float:
        return self.ts - self.dt

    def in_mode(self, mode: str, pattern: Labels = None) -> int:
        """Subscribers in ``mode`` (v2) of one pattern, of several, or of all."""
        return sum(
            m.get(mode, 0)
            for name, m in self.modes.items()
            if pattern is None or name == pattern or (not isinstance(pattern, str) and name in pattern)
        )

    def counts(self, pattern: Labels = None) -> dict[str, int]:
        """The counters of one pattern, of several summed (a set of them), or of all (``pattern`` None)."""
        if isinstance(pattern, str):
            entry = self.channels.get(pattern, {})
            return {k: entry.get(k, 0) for k in (*COUNT_KEYS, SUBSCRIBERS)}
        total = dict.fromkeys((*COUNT_KEYS, SUBSCRIBERS), 0)
        for name, entry in self.channels.items():
            if pattern is None or name in pattern:
                for k in total:
                    total[k] += entry.get(k, 0)
        return total


def _hist(raw: Any, n: int = N_BUCKETS) -> tuple[int, ...]:
    counts = [max(int(v), 0) for v in raw or ()]
    return tuple((counts + [0] * n)[:n])


def _count(raw: Any) -> int:
    return max(int(raw or 0), 0)


def parse_record(stream_id: str | bytes, fields: Mapping[Any, Any]) -> Record | None:
    """A :class:`Record` from an XRANGE entry (v1 or v2, a replica's or a publisher's), or None if it is not a
    record this dashboard can read (another version, another kind, a broken one)."""
    raw = fields.get(RECORD_FIELD.encode(), fields.get(RECORD_FIELD))
    if raw is None:
        return None
    try:
        doc = orjson.loads(raw)
        if not isinstance(doc, dict) or doc.get("v") not in VERSIONS:
            return None
        kind = str(doc.get("kind") or "relay")
        if kind not in ("relay", "pub"):
            return None
        ts, dt = float(doc["ts"]), float(doc["dt"])
        if dt <= 0 or not math.isfinite(ts) or not math.isfinite(dt):
            return None
        channels, ch_lat, modes = {}, {}, {}
        for p, entry in (doc.get("ch") or {}).items():
            if not isinstance(entry, dict):
                continue
            channels[str(p)] = {str(k): max(int(v), 0) for k, v in entry.items() if isinstance(v, int | float)}
            if entry.get("lat"):
                ch_lat[str(p)] = _hist(entry["lat"])
            if isinstance(entry.get("modes"), dict):
                modes[str(p)] = {str(m): _count(v) for m, v in entry["modes"].items()}
        herd = doc.get("herd") or {}
        adm = doc.get("adm") or {}
        return Record(
            id=stream_id.decode() if isinstance(stream_id, bytes) else stream_id,
            replica=str(doc["replica"]),
            ts=ts,
            dt=dt,
            started=float(doc.get("started", ts - dt)),
            host=str(doc.get("host", "")),
            pid=int(doc.get("pid", 0)),
            port=int(doc.get("port", 0)),
            reader_ok=bool(doc.get("reader", 1)),
            conn={str(t): int(n) for t, n in (doc.get("conn") or {}).items()},
            slow=_count(doc.get("slow")),
            lat=_hist(doc.get("lat")),
            pending=float(herd.get("pending", 0)),
            spread=float(herd.get("spread", 0.0)),
            channels=channels,
            stopped=bool(doc.get("stopped", 0)),
            v=int(doc["v"]),
            kind=kind,
            front=str(doc.get("front", "")),
            version=str(doc.get("version", "")),
            stage={k: _hist(v) for k, v in (doc.get("stage") or {}).items() if k in STAGES},
            shards={
                str(k): (None if v.get("lag") is None else float(v["lag"]), _count(v.get("reconn")))
                for k, v in (doc.get("shards") or {}).items()
                if isinstance(v, dict)
            },
            adm={k: max(float(adm[k]), 0.0) for k in (*ADMISSION, "level", "rate", "burst") if adm.get(k) is not None},
            qd=_hist(doc["qd"], N_QUEUE) if doc.get("qd") else (),
            slowest=tuple(c for c in doc.get("slowest") or () if isinstance(c, dict)),
            stuck=_count(doc.get("stuck")),
            ch_lat=ch_lat,
            modes=modes,
            n=_count(doc.get("n")),
            ack=_hist(doc.get("ack")) if doc.get("ack") else (),
        )
    except (ValueError, TypeError, KeyError, AttributeError):
        return None


# -- percentiles --------------------------------------------------------------------------------------------
def percentile(counts: Sequence[float], q: float, bounds: Sequence[float] = LATENCY_BOUNDS_MS) -> float | None:
    """The ``q``-th percentile (0-100) of a bucketed histogram, interpolated linearly inside its bucket
    (as Prometheus' histogram_quantile does). None when the histogram is empty. A percentile that falls in the
    open last bucket is reported as that bucket's lower bound (it is "at least" that)."""
    total = sum(counts)
    if total <= 0:
        return None
    rank = q / 100 * total
    cumulative = 0.0
    for i, n in enumerate(counts):
        if n <= 0:
            continue
        if cumulative + n >= rank:
            lower = bounds[i - 1] if i > 0 else 0.0
            upper = bounds[i]
            if math.isinf(upper):
                return float(lower)
            return lower + (upper - lower) * max(rank - cumulative, 0.0) / n
        cumulative += n
    return float(bounds[-2])


def bucket_labels(bounds: Sequence[float] = LATENCY_BOUNDS_MS) -> list[str]:
    """``["<=0.5", "<=1", ..., ">5000"]``, in ms."""
    labels = [f"\u2264{b:g}" for b in bounds[:-1]]
    return [*labels, f">{bounds[-2]:g}"]


# -- aggregation --------------------------------------------------------------------------------------------
@dataclass
class Point:
    """One second of every replica, summed (``published``: one replica's). Rates are per second."""

    t: int  # bin start, unix seconds
    published: float = 0.0
    delivered: float = 0.0
    coalesced: float = 0.0
    dropped: float = 0.0
    poke_delayed: float = 0.0
    admitted: float = 0.0
    rejected: float = 0.0
    pulled: float = 0.0
    flushed: float = 0.0  # coalescing windows flushed (records that count them: "win")
    slow: float = 0.0
    latency: list[float] = field(default_factory=lambda: [0.0] * N_BUCKETS)
    sse: int = 0
    ws: int = 0
    subscribers: int = 0
    pending: float = 0.0
    spread: float = 0.0
    replicas: int = 0  # replicas with a record covering this second
    # -- v2 -------------------------------------------------------------------------------------------------
    ack: list[float] = field(default_factory=lambda: [0.0] * N_BUCKETS)  # publishers: publish -> Redis ack
    publishes: float = 0.0  # publish calls the publishers' records counted
    stage: dict[str, list[float]] = field(default_factory=lambda: {k: [0.0] * N_BUCKETS for k in STAGES})
    coal_in: float = 0.0  # messages offered to the throttle of replicas with subscribers (see coalescing)
    coal_out: float = 0.0  # ... and the frames it let out of them
    admitted_conn: float = 0.0  # admission (v2 "adm"): connections admitted,
    deferred: float = 0.0  # asked to retry later (503 Retry-After / 1013),
    refused: float = 0.0  # rejected,
    attempts: float = 0.0  # attempts
    bucket: float = 0.0  # token bucket level, every live replica summed (a gauge)
    admit_rate: float = 0.0  # the buckets' refill rates, summed (a gauge)
    admit_burst: float = 0.0
    stuck: float = 0.0  # stuck-write closes
    reconnects: float = 0.0  # reader reconnects, every shard and replica
    lag: float | None = None  # the worst reader lag (ms) of any live replica and shard (a gauge)
    queue_depth: list[float] = field(default_factory=lambda: [0.0] * N_QUEUE)  # connections by queued frames
    poke_subscribers: float | None = None  # subscribers in poke mode (v2 records; None: not recorded)

    @property
    def coalescing(self) -> float | None:
        """Messages in / frames out of the throttle (1: nothing coalesced); None without messages."""
        return self.coal_in / self.coal_out if self.coal_in > 0 and self.coal_out > 0 else None

    def stage_p(self, stage: str, q: float) -> float | None:
        """A percentile (ms) of one stage: ``ack`` (publishers), ``read``, ``held``, ``queue``, ``lat``."""
        if stage == "ack":
            return percentile(self.ack, q)
        if stage == "lat":
            return percentile(self.latency, q)
        return percentile(self.stage[stage], q)

    def depth_p(self, q: float) -> float | None:
        """A percentile of the connections' queued frames."""
        return percentile(self.queue_depth, q, QUEUE_BOUNDS)

    @property
    def p50(self) -> float | None:
        return percentile(self.latency, 50)

    @property
    def p95(self) -> float | None:
        return percentile(self.latency, 95)

    @property
    def p99(self) -> float | None:
        return percentile(self.latency, 99)


_POINT_FIELDS = dict(zip(COUNT_KEYS, COUNTERS))  # "pub" -> "published", ...


@dataclass(frozen=True)
class ChannelRow:
    pattern: str
    published: float  # per second
    delivered: float
    subscribers: int
    coalesced: float
    dropped: float
    poke_delayed: float
    pulled: float
    p99: float | None = None  # ms, publish -> socket, of the pattern's frames (v2 records; None: none recorded)


@dataclass(frozen=True)
class ReplicaRow:
    replica: str
    host: str
    pid: int
    port: int
    stale: bool  # stopped reporting without saying it stops
    stopped: bool  # its last record says it stopped cleanly
    age: float  # seconds since its last record
    sse: int
    ws: int
    connections: int
    subscribers: int
    published: float  # per second, over its last record
    delivered: float
    reader_ok: bool
    restarts: int  # process restarts seen in the window (same replica id, new start time)
    uptime: float
    front: str = ""  # v2: "gevent" | "asyncio" ("" from a v1 record)
    version: str = ""
    lag_ms: float | None = None  # v2: the worst shard's reader lag in its last record
    reconnects: int = 0  # v2: reader reconnects, every shard, over the window


@dataclass(frozen=True)
class ShardRow:
    shard: str
    replicas: int  # live replicas that report it
    lag_ms: float | None  # the worst of their lags (None: no replica knows)
    worst: str  # the replica with that lag
    reconnects: int  # over the window, every replica
    age: float  # seconds since a live replica last reported it


@dataclass(frozen=True)
class SlowRow:
    replica: str
    transport: str
    channels: int
    queued_bytes: int
    queued_frames: int
    age: float  # seconds the connection has been open


def heat_rows(points: Sequence[Point]) -> dict[str, list[Any]]:
    """The latency heatmap's cells: one per (second, bucket) with writes; ``bucket`` the bucket's index."""
    out: dict[str, list[Any]] = {"t": [], "bucket": [], "count": []}
    for p in points:
        for i, n in enumerate(p.latency):
            if n > 0:
                out["t"].append(p.t)
                out["bucket"].append(i)
                out["count"].append(n)
    return out


def _rank(coverage: float, started: float, replica: str) -> tuple[float, float, str]:
    """Which replica's count is `published` (lowest first): one that covers the whole span (so a replica that
    stopped halfway does not undercount it), then the longest-running, then by name. Every replica reads every
    message, so one replica's count is the publish count; the same replica second after second (while it runs)
    makes the seconds add up exactly, which neither a sum nor a per-second mean or max of replicas that sample
    out of phase would do."""
    return (0.0 if coverage >= 0.999 else 1.0, started, replica)


def _overlap(a0: float, a1: float, b0: float, b1: float) -> float:
    return max(0.0, min(a1, b1) - max(a0, b0))


def _sent(r: Record, counts: Mapping[str, int]) -> float:
    """What the throttle let out for the channels ``counts`` are of, in record ``r``: the messages it sent at
    once (``pub - coal``: a held message counts as coalesced) plus the windows it flushed. Records that count
    flushes per pattern (``win``, in any of their patterns) give them exactly. Older ones count them for the whole
    replica only (the ``held`` observations less the spread pokes, ``delay``); a pattern gets its share of them
    by its share of the coalesced messages (of the subscribers, when the record coalesced nothing new): exact
    with one pattern held, an estimate with several. v1 records have no ``held``: their flushes are not
    counted."""
    held = sum(r.stage.get("held", ()))
    sent = counts["pub"] - counts["coal"]
    if counts["win"] or any("win" in entry for entry in r.channels.values()):
        return sent + counts["win"]
    if not held:
        return sent
    every = r.counts()
    windows = max(held - every["delay"], 0)
    if every["coal"]:
        return sent + windows * counts["coal"] / max(every["coal"], counts["coal"])
    # A window flushed in a record that coalesced nothing new (its messages were held in the one before):
    # shared by subscribers.
    return sent + windows * counts[SUBSCRIBERS] / max(every[SUBSCRIBERS], counts[SUBSCRIBERS], 1)


def _spread_v2(r: Record, p: Point, frac: float) -> None:
    """A v2 record's replica-wide counts, ``frac`` of them into second ``p``."""
    for stage, counts in r.stage.items():
        p.stage[stage] = [a + b * frac for a, b in zip(p.stage[stage], counts)]
    p.admitted_conn += r.adm.get("ok", 0.0) * frac
    p.deferred += r.adm.get("defer", 0.0) * frac
    p.refused += r.adm.get("rej", 0.0) * frac
    p.attempts += r.adm.get("tries", 0.0) * frac
    p.stuck += r.stuck * frac
    p.reconnects += sum(n for _, n in r.shards.values()) * frac


class Window:
    """The records of the last ``span`` seconds, per replica, and what the dashboard shows from them."""

    def __init__(self, span: float = 900.0, stale_after: float = 5.0) -> None:
        self.span = span
        self.stale_after = stale_after
        self.records: dict[str, list[Record]] = {}  # replica -> records, oldest first
        self._ts: dict[str, list[float]] = {}  # the same records' ts, for bisect
        # Publishers' records ("pub"), apart: they write only when they publish, so no plot waits for them.
        self.pubs: dict[str, list[Record]] = {}
        self._pub_ts: dict[str, list[float]] = {}
        self._ids: set[str] = set()

    def add(self, records: Iterable[Record]) -> int:
        """Add records (duplicates are ignored); forget those older than the span. Returns how many were new."""
        added = 0
        for r in records:
            if r.id in self._ids:
                continue
            self._ids.add(r.id)
            kept, times = (self.pubs, self._pub_ts) if r.kind == "pub" else (self.records, self._ts)
            rows, stamps = kept.setdefault(r.replica, []), times.setdefault(r.replica, [])
            i = bisect.bisect_right(stamps, r.ts)
            rows.insert(i, r)
            stamps.insert(i, r.ts)
            added += 1
        self._prune()
        return added

    def _prune(self) -> None:
        newest = self.newest()
        if newest is None:
            return
        horizon = newest - self.span - 60  # keep a minute more than shown: records cover time before their ts
        for records, times in ((self.records, self._ts), (self.pubs, self._pub_ts)):
            for replica in list(records):
                rows, stamps = records[replica], times[replica]
                cut = bisect.bisect_left(stamps, horizon)
                if cut:
                    self._ids.difference_update(r.id for r in rows[:cut])
                    del rows[:cut], stamps[:cut]
                if not rows:
                    del records[replica], times[replica]

    def newest(self) -> float | None:
        stamps = [s[-1] for s in self._ts.values() if s]
        return max(stamps) if stamps else None

    def oldest(self) -> float | None:
        """When the oldest record's counts begin."""
        begins = [rows[0].begin for rows in self.records.values() if rows]
        return min(begins) if begins else None

    def latest(self, replica: str) -> Record:
        return self.records[replica][-1]

    def live(self, now: float) -> list[str]:
        """Replicas whose last record is at most ``stale_after`` seconds old and does not say they stopped."""
        return sorted(
            r for r, rows in self.records.items() if not rows[-1].stopped and now - rows[-1].ts <= self.stale_after
        )

    def settled(self, now: float) -> int:
        """The end (exclusive, unix seconds) of the bins every live replica has reported; with no live replica,
        the bins older than ``stale_after`` (they are empty, and a plot of them keeps moving)."""
        live = self.live(now)
        if not live:
            return math.floor(now - self.stale_after)
        return math.floor(min(self.latest(r).ts for r in live))

    # -- time series ----------------------------------------------------------------------------------------
    def series(self, start: int, end: int, pattern: Labels = None) -> list[Point]:
        """One :class:`Point` per second in ``[start, end)``; counts of ``pattern`` only if given (latency,
        connections and the herd gauges are per replica, not per channel, and are always the totals)."""
        if end <= start:
            return []
        n = end - start
        points = [Point(t) for t in range(start, end)]
        # Per bin, the best source of `published` so far: (rank, rate); see _rank.
        best: list[tuple[tuple[float, float, str], float] | None] = [None] * n
        for replica, rows in self.records.items():
            published, covered, started = [0.0] * n, [0.0] * n, [math.inf] * n
            self._spread_counts(rows, start, end, pattern, points, published, covered, started)
            self._gauges(replica, rows, start, end, pattern, points)
            for i in range(n):
                if covered[i] > 0:
                    candidate = (_rank(covered[i], started[i], replica), published[i])
                    current = best[i]
                    if current is None or candidate[0] < current[0]:
                        best[i] = candidate
        for p, chosen in zip(points, best):
            p.published = chosen[1] if chosen is not None else 0.0
        self._publishers(start, end, points)
        return points

    def _spread_counts(
        self,
        rows: list[Record],
        start: int,
        end: int,
        pattern: Labels,
        points: list[Point],
        published: list[float],
        covered: list[float],
        started: list[float],
    ) -> None:
        for r in self._covering(rows, start, end):
            counts = r.counts(pattern)
            sent = _sent(r, counts) if counts[SUBSCRIBERS] or counts["coal"] or counts["win"] else None
            first, last = max(math.floor(r.begin), start), min(math.ceil(r.ts), end)
            for t in range(first, last):
                overlap = _overlap(r.begin, r.ts, t, t + 1)
                if overlap <= 0:
                    continue
                frac = overlap / r.dt
                p = points[t - start]
                if r.reader_ok:
                    published[t - start] += counts["pub"] * frac
                    covered[t - start] += overlap
                    started[t - start] = min(started[t - start], r.started)
                for key in COUNT_KEYS[1:]:
                    if counts[key]:
                        name = _POINT_FIELDS[key]
                        setattr(p, name, getattr(p, name) + counts[key] * frac)
                p.slow += r.slow * frac
                if any(r.lat):
                    p.latency = [a + b * frac for a, b in zip(p.latency, r.lat)]
                if sent is not None:
                    p.coal_in += counts["pub"] * frac
                    p.coal_out += sent * frac
                if r.stage or r.adm or r.stuck or r.shards:
                    _spread_v2(r, p, frac)

    def _covering(self, rows: list[Record], start: float, end: float) -> list[Record]:
        """The records whose interval ``(begin, ts]`` overlaps ``[start, end)``."""
        if not rows:
            return []
        stamps = (self._pub_ts if rows[0].kind == "pub" else self._ts)[rows[0].replica]
        i = bisect.bisect_right(stamps, start)
        return [r for r in rows[i:] if r.begin < end]

    def _publishers(self, start: int, end: int, points: list[Point]) -> None:
        for rows in self.pubs.values():
            for r in self._covering(rows, start, end):
                for t in range(max(math.floor(r.begin), start), min(math.ceil(r.ts), end)):
                    frac = _overlap(r.begin, r.ts, t, t + 1) / r.dt
                    if frac > 0:
                        p = points[t - start]
                        p.publishes += r.n * frac
                        p.ack = [a + b * frac for a, b in zip(p.ack, r.ack)]

    def _gauges(
        self, replica: str, rows: list[Record], start: int, end: int, pattern: Labels, points: list[Point]
    ) -> None:
        # A gauge at second t is the replica's last record before t+1, if it is not stale by then.
        stamps = self._ts[replica]
        for p in points:
            i = bisect.bisect_left(stamps, p.t + 1) - 1
            if i < 0:
                continue
            r = rows[i]
            if r.stopped or p.t + 1 - r.ts > self.stale_after:
                continue
            p.replicas += 1
            p.sse += r.conn.get("sse", 0)
            p.ws += r.conn.get("ws", 0)
            p.subscribers += r.counts(pattern)[SUBSCRIBERS]
            if r.v >= 2:
                p.poke_subscribers = (p.poke_subscribers or 0) + r.in_mode("poke", pattern)
            p.pending += r.pending
            p.spread = max(p.spread, r.spread)
            if r.adm:
                p.bucket += r.adm.get("level", 0.0)
                p.admit_rate += r.adm.get("rate", 0.0)
                p.admit_burst += r.adm.get("burst", 0.0)
            lags = [lag for lag, _ in r.shards.values() if lag is not None]
            if lags:
                p.lag = max(p.lag or 0.0, *lags)
            if r.qd:
                p.queue_depth = [a + b for a, b in zip(p.queue_depth, r.qd)]

    def labels_under(self, pattern: str) -> frozenset[str]:
        """The channel labels seen in the window whose channels a policy ``pattern`` covers: the pattern itself,
        and labels it matches (``dash:*`` covers ``dash:alpha`` and ``dash:a*``). ``*``, the label of every
        channel no configured pattern matched, is covered only by ``*``: its channels are not known."""
        seen = {name for rows in self.records.values() for r in rows for name in r.channels}
        return frozenset(name for name in seen if name == pattern or (name != "*" and glob_match(pattern, name)))

    # -- tables ---------------------------------------------------------------------------------------------
    def top_channels(self, end: float, seconds: float = 10.0, now: float | None = None) -> list[ChannelRow]:
        """Every pattern seen in ``[end - seconds, end)``, busiest first, rates per second. Subscribers are
        those of the live replicas' last records."""
        start = end - seconds
        totals: dict[str, dict[str, float]] = {}
        latency: dict[str, list[float]] = {}  # pattern -> its latency buckets, every replica
        best: tuple[tuple[float, float, str], dict[str, float], float] | None = None  # published: one replica
        for replica, rows in self.records.items():
            published: dict[str, float] = {}
            covered, started = 0.0, math.inf
            for r in self._covering(rows, start, end):
                overlap = _overlap(r.begin, r.ts, start, end)
                frac = overlap / r.dt
                if r.reader_ok:
                    covered += overlap
                    started = min(started, r.started)
                for pattern, entry in r.channels.items():
                    acc = totals.setdefault(pattern, dict.fromkeys(COUNT_KEYS, 0.0))
                    for key in COUNT_KEYS:
                        acc[key] += entry.get(key, 0) * frac
                    if r.reader_ok:
                        published[pattern] = published.get(pattern, 0.0) + entry.get("pub", 0) * frac
                for pattern, counts in r.ch_lat.items():
                    acc_lat = latency.setdefault(pattern, [0.0] * N_BUCKETS)
                    latency[pattern] = [a + b * frac for a, b in zip(acc_lat, counts)]
            if covered > 0:
                rank = _rank(covered / seconds, started, replica)
                if best is None or rank < best[0]:
                    best = (rank, published, covered)
        subscribers: dict[str, int] = {}
        for replica in self.live(now if now is not None else end):
            for pattern, entry in self.latest(replica).channels.items():
                subscribers[pattern] = subscribers.get(pattern, 0) + entry.get(SUBSCRIBERS, 0)
        rows = []
        zeros = dict.fromkeys(COUNT_KEYS, 0.0)
        for pattern in set(subscribers) | set(totals):
            total = totals.get(pattern, zeros)
            rows.append(
                ChannelRow(
                    pattern=pattern,
                    published=best[1].get(pattern, 0.0) / best[2] if best is not None else 0.0,
                    delivered=total["dlv"] / seconds,
                    subscribers=subscribers.get(pattern, 0),
                    coalesced=total["coal"] / seconds,
                    dropped=total["drop"] / seconds,
                    poke_delayed=total["delay"] / seconds,
                    pulled=total["pull"] / seconds,
                    p99=percentile(latency[pattern], 99) if pattern in latency else None,
                )
            )
        rows.sort(key=lambda c: (-c.published, -c.delivered, -c.subscribers, c.pattern))
        return rows

    def replicas(self, now: float) -> list[ReplicaRow]:
        """One row per replica seen in the window; ``stale`` when it stopped reporting without a stopped record."""
        out = []
        for replica, rows in sorted(self.records.items()):
            last = rows[-1]
            counts = last.counts()
            conns = dict(last.conn)
            out.append(
                ReplicaRow(
                    replica=replica,
                    host=last.host,
                    pid=last.pid,
                    port=last.port,
                    stale=not last.stopped and now - last.ts > self.stale_after,
                    stopped=last.stopped,
                    age=max(now - last.ts, 0.0),
                    sse=conns.get("sse", 0),
                    ws=conns.get("ws", 0),
                    connections=sum(conns.values()),
                    subscribers=counts[SUBSCRIBERS],
                    published=counts["pub"] / last.dt,
                    delivered=counts["dlv"] / last.dt,
                    reader_ok=last.reader_ok,
                    restarts=len({r.started for r in rows}) - 1,
                    uptime=max(last.ts - last.started, 0.0),
                    front=last.front,
                    version=last.version,
                    lag_ms=max((lag for lag, _ in last.shards.values() if lag is not None), default=None),
                    reconnects=sum(n for r in rows for _, n in r.shards.values()),
                )
            )
        return out

    def shards(self, now: float) -> list[ShardRow]:
        """One row per Redis shard the live replicas' v2 records report (reconnects: over the window, any
        replica), sorted by shard number."""
        live = set(self.live(now))
        found: dict[str, dict[str, Any]] = {}
        for replica, rows in self.records.items():
            for r in rows:
                for shard, (_, reconn) in r.shards.items():
                    row = found.setdefault(shard, {"n": 0, "lag": None, "worst": "", "reconn": 0, "ts": -math.inf})
                    row["reconn"] += reconn
            if replica not in live:
                continue
            last = rows[-1]
            for shard, (lag, _) in last.shards.items():
                row = found[shard]
                row["n"] += 1
                row["ts"] = max(row["ts"], last.ts)
                if lag is not None and (row["lag"] is None or lag > row["lag"]):
                    row["lag"], row["worst"] = lag, replica
        return [
            ShardRow(shard, v["n"], v["lag"], v["worst"], v["reconn"], max(now - v["ts"], 0.0) if v["n"] else math.inf)
            for shard, v in sorted(found.items(), key=lambda kv: (not kv[0].isdigit(), int(kv[0]) if kv[0].isdigit()
                                                                   else 0, kv[0]))
        ]  # fmt: skip

    def slowest(self, now: float, n: int = 10) -> list[SlowRow]:
        """The ``n`` connections with the most queued bytes, of the live replicas' last records."""
        rows = []
        for replica in self.live(now):
            for c in self.latest(replica).slowest:
                try:
                    ch = c.get("ch", 0)
                    rows.append(
                        SlowRow(
                            replica,
                            str(c.get("t", "")),
                            len(ch) if isinstance(ch, list) else int(ch),
                            int(c.get("qb", 0)),
                            int(c.get("qf", 0)),
                            float(c.get("age", 0.0)),
                        )
                    )
                except (TypeError, ValueError):
                    continue
        rows.sort(key=lambda r: (-r.queued_bytes, -r.queued_frames, r.replica))
        return rows[:n]

    def publishers(self, now: float) -> list[tuple[str, float, int]]:
        """The publishers seen in the window: (id, seconds since their last record, publishes in the window)."""
        return [(k, max(now - rows[-1].ts, 0.0), sum(r.n for r in rows)) for k, rows in sorted(self.pubs.items())]

    def histogram(self, end: int, seconds: int = 10) -> list[float]:
        """Latency bucket counts of the ``seconds`` before ``end``, every replica summed."""
        total = [0.0] * N_BUCKETS
        for p in self.series(end - seconds, end):
            total = [a + b for a, b in zip(total, p.latency)]
        return total


# -- pandas, for the notebook -------------------------------------------------------------------------------
def records_frame(records: Iterable[Record]) -> Any:
    """One row per record (all channels summed): counts, rates, connections and the record's percentiles."""
    import pandas as pd

    rows = []
    for r in records:
        counts = r.counts()
        row: dict[str, Any] = {"time": pd.Timestamp(r.ts, unit="s"), "replica": r.replica, "dt": r.dt}
        for key, name in _POINT_FIELDS.items():
            row[name] = counts[key]
            row[f"{name}_per_s"] = counts[key] / r.dt
        row.update(subscribers=counts[SUBSCRIBERS], sse=r.conn.get("sse", 0), ws=r.conn.get("ws", 0))
        row.update(slow_dropped=r.slow, pokes_pending=r.pending, poke_spread=r.spread)
        row.update(front=r.front, version=r.version, stuck=r.stuck, kind=r.kind, publishes=r.n)
        row.update({f"adm_{k}": r.adm.get(k, 0.0) for k in (*ADMISSION, "level")})
        row.update({f"p{q}_ms": percentile(r.lat, q) for q in QUANTILES})
        rows.append(row)
    return pd.DataFrame(rows)


def channels_frame(records: Iterable[Record]) -> Any:
    """One row per (record, channel pattern)."""
    import pandas as pd

    rows = [
        {"time": pd.Timestamp(r.ts, unit="s"), "replica": r.replica, "pattern": pattern, "dt": r.dt,
         **{name: entry.get(key, 0) for key, name in _POINT_FIELDS.items()},
         "subscribers": entry.get(SUBSCRIBERS, 0),
         **{f"subs_{m}": r.modes.get(pattern, {}).get(m, 0) for m in MODES}}
        for r in records
        for pattern, entry in r.channels.items()
    ]  # fmt: skip
    return pd.DataFrame(rows)


def latency_frame(records: Iterable[Record]) -> Any:
    """One row per (record, latency bucket) with writes in it: ``le_ms`` the bucket's upper bound (inf: the
    open last one), ``writes`` the socket writes. Sum ``writes`` over any grouping, then :func:`percentile`
    of the summed buckets: percentiles of records do not average."""
    import pandas as pd

    rows = [
        {"time": pd.Timestamp(r.ts, unit="s"), "replica": r.replica, "le_ms": LATENCY_BOUNDS_MS[i], "writes": n}
        for r in records
        for i, n in enumerate(r.lat)
        if n
    ]
    frame = pd.DataFrame(rows, columns=["time", "replica", "le_ms", "writes"])
    return frame.astype({"time": "datetime64[ns]", "le_ms": float, "writes": int})  # typed even when empty


def stages_frame(records: Iterable[Record]) -> Any:
    """One row per (record, stage, pattern, latency bucket) with observations, from v2 records: ``stage`` is
    ``ack`` (publish call -> Redis acknowledged, from publishers), ``read`` (Redis -> the replica's reader),
    ``held`` (by coalescing or poke spreading), ``queue`` (the connection's queue -> socket) or ``lat`` (publish
    -> socket, end to end); ``pattern`` is "" for a replica's totals, else the channel pattern (``lat`` only);
    ``le_ms`` the bucket's upper bound, ``n`` the observations. :func:`percentile_by` works on it."""
    import pandas as pd

    rows: list[dict[str, Any]] = []
    for r in records:
        time = pd.Timestamp(r.ts, unit="s")
        hists: list[tuple[str, str, Sequence[int]]] = [("ack", "", r.ack)] if r.kind == "pub" else [
            ("lat", "", r.lat), *((stage, "", h) for stage, h in r.stage.items()),
            *(("lat", pattern, h) for pattern, h in r.ch_lat.items())]  # fmt: skip
        for stage, pattern, counts in hists:
            rows.extend(
                {"time": time, "replica": r.replica, "stage": stage, "pattern": pattern,
                 "le_ms": LATENCY_BOUNDS_MS[i], "n": n}
                for i, n in enumerate(counts) if n
            )  # fmt: skip
    frame = pd.DataFrame(rows, columns=["time", "replica", "stage", "pattern", "le_ms", "n"])
    return frame.astype({"time": "datetime64[ns]", "le_ms": float, "n": int})


def frame_percentile(frame: Any, q: float) -> float | None:
    """The ``q``-th percentile (ms) of the rows of :func:`latency_frame` or :func:`stages_frame` (any subset)."""
    counts = [0.0] * N_BUCKETS
    for bound, n in zip(frame["le_ms"], frame["writes" if "writes" in frame else "n"]):
        counts[LATENCY_BOUNDS_MS.index(bound)] += n
    return percentile(counts, q)


def percentile_by(frame: Any, keys: Sequence[str], q: float) -> Any:
    """The ``q``-th percentile (ms) per group of rows of :func:`latency_frame`: one row per group, columns
    ``keys`` and ``p<q>_ms``. E.g. ``percentile_by(frame.assign(minute=frame.time.dt.floor("min")),
    ["minute", "replica"], 99)``."""
    import pandas as pd

    name = f"p{q:g}_ms"
    rows = [
        {**dict(zip(keys, key if isinstance(key, tuple) else (key,))), name: frame_percentile(group, q)}
        for key, group in frame.groupby(list(keys))
    ]
    return pd.DataFrame(rows, columns=[*keys, name])
