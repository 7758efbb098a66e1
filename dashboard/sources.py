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
from sidecar.stats import COUNTERS, LATENCY_BOUNDS_MS, RECORD_FIELD, SUBSCRIBERS

COUNT_KEYS = tuple(COUNTERS.values())  # "pub", "dlv", "coal", "drop", "delay", "adm", "rej", "pull"
N_BUCKETS = len(LATENCY_BOUNDS_MS)
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

    @property
    def begin(self) -> float:
        return self.ts - self.dt

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


def parse_record(stream_id: str | bytes, fields: Mapping[Any, Any]) -> Record | None:
    """A :class:`Record` from an XRANGE entry, or None if it is not a record this dashboard can read."""
    raw = fields.get(RECORD_FIELD.encode(), fields.get(RECORD_FIELD))
    if raw is None:
        return None
    try:
        doc = orjson.loads(raw)
        if not isinstance(doc, dict) or doc.get("v") not in (1, 2) or doc.get("kind", "relay") != "relay":
            return None  # v2 adds fields (read by engineer dash's sources); other kinds are not replicas
        lat = [max(int(n), 0) for n in doc.get("lat") or ()]
        lat = (lat + [0] * N_BUCKETS)[:N_BUCKETS]
        channels = {
            str(p): {str(k): max(int(v), 0) for k, v in entry.items() if isinstance(v, int | float)}
            for p, entry in (doc.get("ch") or {}).items()
            if isinstance(entry, dict)
        }
        herd = doc.get("herd") or {}
        ts, dt = float(doc["ts"]), float(doc["dt"])
        if dt <= 0 or not math.isfinite(ts) or not math.isfinite(dt):
            return None
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
            slow=max(int(doc.get("slow", 0)), 0),
            lat=tuple(lat),
            pending=float(herd.get("pending", 0)),
            spread=float(herd.get("spread", 0.0)),
            channels=channels,
            stopped=bool(doc.get("stopped", 0)),
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
    slow: float = 0.0
    latency: list[float] = field(default_factory=lambda: [0.0] * N_BUCKETS)
    sse: int = 0
    ws: int = 0
    subscribers: int = 0
    pending: float = 0.0
    spread: float = 0.0
    replicas: int = 0  # replicas with a record covering this second

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


def _rank(coverage: float, started: float, replica: str) -> tuple[float, float, str]:
    """Which replica's count is `published` (lowest first): one that covers the whole span (so a replica that
    stopped halfway does not undercount it), then the longest-running, then by name. Every replica reads every
    message, so one replica's count is the publish count; the same replica second after second (while it runs)
    makes the seconds add up exactly, which neither a sum nor a per-second mean or max of replicas that sample
    out of phase would do."""
    return (0.0 if coverage >= 0.999 else 1.0, started, replica)


def _overlap(a0: float, a1: float, b0: float, b1: float) -> float:
    return max(0.0, min(a1, b1) - max(a0, b0))


class Window:
    """The records of the last ``span`` seconds, per replica, and what the dashboard shows from them."""

    def __init__(self, span: float = 900.0, stale_after: float = 5.0) -> None:
        self.span = span
        self.stale_after = stale_after
        self.records: dict[str, list[Record]] = {}  # replica -> records, oldest first
        self._ts: dict[str, list[float]] = {}  # the same records' ts, for bisect
        self._ids: set[str] = set()

    def add(self, records: Iterable[Record]) -> int:
        """Add records (duplicates are ignored); forget those older than the span. Returns how many were new."""
        added = 0
        for r in records:
            if r.id in self._ids:
                continue
            self._ids.add(r.id)
            rows, stamps = self.records.setdefault(r.replica, []), self._ts.setdefault(r.replica, [])
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
        for replica in list(self.records):
            rows, stamps = self.records[replica], self._ts[replica]
            cut = bisect.bisect_left(stamps, horizon)
            if cut:
                self._ids.difference_update(r.id for r in rows[:cut])
                del rows[:cut], stamps[:cut]
            if not rows:
                del self.records[replica], self._ts[replica]

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

    def _covering(self, rows: list[Record], start: float, end: float) -> list[Record]:
        """The records whose interval ``(begin, ts]`` overlaps ``[start, end)``."""
        if not rows:
            return []
        i = bisect.bisect_right(self._ts[rows[0].replica], start)
        return [r for r in rows[i:] if r.begin < end]

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
            p.pending += r.pending
            p.spread = max(p.spread, r.spread)

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
                )
            )
        return out

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
        row.update({f"p{q}_ms": percentile(r.lat, q) for q in QUANTILES})
        rows.append(row)
    return pd.DataFrame(rows)


def channels_frame(records: Iterable[Record]) -> Any:
    """One row per (record, channel pattern)."""
    import pandas as pd

    rows = [
        {"time": pd.Timestamp(r.ts, unit="s"), "replica": r.replica, "pattern": pattern, "dt": r.dt,
         **{name: entry.get(key, 0) for key, name in _POINT_FIELDS.items()},
         "subscribers": entry.get(SUBSCRIBERS, 0)}
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


def frame_percentile(frame: Any, q: float) -> float | None:
    """The ``q``-th percentile (ms) of the writes in rows of :func:`latency_frame` (any subset of them)."""
    counts = [0.0] * N_BUCKETS
    for bound, writes in zip(frame["le_ms"], frame["writes"]):
        counts[LATENCY_BOUNDS_MS.index(bound)] += writes
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
