"""Herd control: coalescing windows, poke spreading and admission. Pure: the caller owns sockets, Redis and time.

The policy is set per channel pattern (``task:*``, ``sprint:*``, ``*``; the most specific match wins) and changed
live by ops (PUT /admin/throttle, docs/operations.md). The hub offers every message it dispatches and sends what
comes back; the caller's scheduler calls :meth:`Throttle.flush` at :meth:`Throttle.due`.

Example::

    throttle = Throttle(Policy.from_json({"channels": {"sprint:*": {"window": 0.1}}}), time.monotonic)
    now = throttle.offer(msg, pokes=[])     # what goes out at once (nothing: held for the window's end)
    later = throttle.due()                  # when flush() has something (None: nothing is held)
    throttle.flush()                        # what became sendable by now
"""

from __future__ import annotations

import heapq
import itertools
import random
import re
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import orjson

from sidecar.core.limits import TokenBucket
from sidecar.core.patterns import glob_match
from sidecar.core.protocol import MAX_CHANNEL_LEN, Message

PATTERN_RE = re.compile(rf"[A-Za-z0-9_\-:.@*]{{1,{MAX_CHANNEL_LEN}}}")  # channel characters plus `*`
MAX_PATTERNS = 256
MAX_PENDING = 10_000  # messages one window may hold; past that it is flushed early (bounds memory, not rate)
MIN_RETRY = 0.25  # seconds: the shortest retry hint
MAX_RETRY = 60.0  # seconds: the longest retry hint
CAP_RETRY = 5.0  # seconds: the retry hint when the connection cap is full (no telling when a slot frees)
WAITING_RETRY = 1.0  # seconds: the retry hint when too many sockets wait for their auth frame (each frees soon)


class PolicyError(ValueError):
    """A policy document that cannot be applied; the message says which value and why (fit for a 400)."""


@dataclass(frozen=True)
class ChannelPolicy:
    window: float = 0.0  # seconds: at most one frame per channel per window per connection; 0: off
    poke_rate: float = 0.0  # pulls/s: pokes of one change are spread to this rate; 0: off
    poke_floor: float = 0.0  # seconds: the least a change's pokes are spread over (with poke_rate on)


# name -> (type, lowest, highest) of every value a policy document may hold
CHANNEL_LIMITS: dict[str, tuple[type, float, float]] = {
    "window": (float, 0.0, 10.0),
    "poke_rate": (float, 0.0, 1_000_000.0),
    "poke_floor": (float, 0.0, 60.0),
}
LIMITS: dict[str, tuple[type, float, float]] = {
    "admit_rate": (float, 0.0, 1_000_000.0),
    "admit_burst": (int, 0, 1_000_000),
    "max_connections": (int, 0, 100_000_000),
    "queue_frames": (int, 1, 1_000_000),
    "queue_bytes": (int, 1024, 1 << 30),
    "stuck_timeout": (float, 1.0, 3600.0),
}


@dataclass(frozen=True)
class Policy:
    """Everything ops can tune live. The ``"*"`` pattern is always there: it is the default of every channel."""

    channels: Mapping[str, ChannelPolicy] = field(default_factory=lambda: {"*": ChannelPolicy()})
    admit_rate: float = 0.0  # new connections (and resumes) per second per replica; 0: unlimited
    admit_burst: int = 0  # admitted at once before admit_rate applies; 0: one second's worth
    max_connections: int = 0  # per replica; 0: unlimited
    queue_frames: int = 1000  # per-connection queue bound: past it the backlog is dropped and resynchronised
    queue_bytes: int = 1 << 20
    stuck_timeout: float = 30.0  # seconds a connection may sit in one socket write before it is closed

    def match(self, channel: str) -> tuple[str, ChannelPolicy]:
        """The most specific pattern matching ``channel`` (most literal characters, then fewest ``*``)."""
        for pattern, policy in self._ordered():
            if glob_match(pattern, channel):
                return pattern, policy
        return "*", self.channels.get("*", ChannelPolicy())

    def _ordered(self) -> list[tuple[str, ChannelPolicy]]:
        return sorted(self.channels.items(), key=lambda kv: (-len(kv[0].replace("*", "")), kv[0].count("*"), kv[0]))

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"channels": {p: _fields(c) for p, c in sorted(self.channels.items())}}
        doc.update({name: getattr(self, name) for name in LIMITS})
        return doc

    @classmethod
    def from_json(cls, doc: object, defaults: Policy | None = None) -> Policy:
        """A policy from a document like :meth:`to_json`'s; what it leaves out comes from ``defaults``.

        Raises PolicyError naming the first bad value.
        """
        base = defaults or cls()
        if not isinstance(doc, dict):
            raise PolicyError("the policy is a JSON object")
        unknown = set(doc) - set(LIMITS) - {"channels"}
        if unknown:
            raise PolicyError(f"unknown field {sorted(unknown)[0]!r}; fields are channels, {', '.join(LIMITS)}")
        values: dict[str, Any] = {name: _number(doc[name], name, LIMITS[name]) for name in LIMITS if name in doc}
        channels = dict(base.channels)
        if "channels" in doc:
            given = doc["channels"]
            if not isinstance(given, dict):
                raise PolicyError("channels maps channel patterns to policies")
            if len(given) > MAX_PATTERNS:
                raise PolicyError(f"at most {MAX_PATTERNS} channel patterns")
            channels = {"*": base.channels.get("*", ChannelPolicy())}
            for pattern, entry in given.items():
                channels[_pattern(pattern)] = _channel_policy(entry, pattern)
        return cls(channels=channels, **{**{n: getattr(base, n) for n in LIMITS}, **values})


def _fields(policy: ChannelPolicy) -> dict[str, float]:
    return {f.name: getattr(policy, f.name) for f in fields(policy)}


def _pattern(pattern: object) -> str:
    if not isinstance(pattern, str) or not PATTERN_RE.fullmatch(pattern):
        raise PolicyError(f"bad channel pattern {str(pattern)[:50]!r}: channel characters and * only")
    return pattern


def _channel_policy(entry: object, pattern: str) -> ChannelPolicy:
    if not isinstance(entry, dict):
        raise PolicyError(f'channels[{pattern!r}] is an object like {{"window": 0.1}}')
    unknown = set(entry) - set(CHANNEL_LIMITS)
    if unknown:
        raise PolicyError(f"channels[{pattern!r}]: unknown field {sorted(unknown)[0]!r}; fields are "
                          f"{', '.join(CHANNEL_LIMITS)}")  # fmt: skip
    return ChannelPolicy(**{k: _number(v, f"channels[{pattern!r}].{k}", CHANNEL_LIMITS[k]) for k, v in entry.items()})


def _number(value: object, name: str, limits: tuple[type, float, float]) -> float | int:
    kind, low, high = limits
    # bool is an int to Python but not a number to anyone writing JSON.
    if isinstance(value, bool) or not isinstance(value, int | float) or (kind is int and not float(value).is_integer()):
        raise PolicyError(f"{name} must be {'an integer' if kind is int else 'a number'}")
    if not low <= value <= high:
        raise PolicyError(f"{name} must be between {low:g} and {high:g}")
    return kind(value)


@dataclass(frozen=True, slots=True)
class Outgoing:
    """Messages of one channel to send as one delivery, oldest first.

    ``conn`` None: every live subscriber of the channel (``pokes`` False: except poke-mode ones, whose pokes are
    spread); otherwise one connection's spread poke, carrying the channel's latest message.
    """

    channel: str
    messages: tuple[Message, ...]
    conn: int | None = None
    pokes: bool = True


class _Window:
    __slots__ = ("until", "pending", "since")

    def __init__(self, until: float) -> None:
        self.until = until
        self.pending: list[Message] = []
        self.since = 0.0  # when the oldest pending message came


class _Spread:
    __slots__ = ("next_slot", "waiting", "latest")

    def __init__(self, now: float, latest: Message) -> None:
        self.next_slot = now
        self.waiting: set[int] = set()  # connections with a poke scheduled
        self.latest = latest


class Throttle:
    """The herd control of one relay process. Not thread safe: one OS thread (gevent) drives it."""

    def __init__(self, policy: Policy, clock: Callable[[], float], rng: random.Random | None = None) -> None:
        self.clock = clock
        self.rng = rng or random.Random()
        self.policy = policy
        self._matches: dict[str, tuple[str, ChannelPolicy]] = {}
        self._windows: dict[str, _Window] = {}
        self._spreads: dict[str, _Spread] = {}
        self._flushes: list[tuple[float, int, str, _Window]] = []  # heap: window ends with something held
        self._pokes: list[tuple[float, int, str, int, float]] = []  # heap: (when, n, channel, connection, since)
        self._n = itertools.count()
        self.counts: dict[tuple[str, str], int] = {}  # (counter, channel) -> n since take_counts()
        self.spread_seconds = 0.0  # what the latest change's pokes were spread over
        self.on_held: Callable[[float], None] | None = None  # the seconds each held delivery was held (stats)
        self.on_flushed: Callable[[str], None] | None = None  # the channel of each window sent (stats)
        self.admissions = {"ok": 0, "defer": 0, "rej": 0}  # ever: admitted; refused by the bucket; over a cap
        self._bucket: TokenBucket | None = None
        self._backlog = 0.0  # rejected connections expected back (drains at admit_rate)
        self._backlog_at = 0.0
        self.set_policy(policy)

    def set_policy(self, policy: Policy) -> None:
        """Apply a new policy. Held messages keep their window's end; new windows use the new values."""
        old, self.policy = self.policy, policy
        self._matches.clear()
        if self._bucket is None or (old.admit_rate, old.admit_burst) != (policy.admit_rate, policy.admit_burst):
            burst = policy.admit_burst or max(1.0, policy.admit_rate)
            self._bucket = TokenBucket(policy.admit_rate, burst, self.clock()) if policy.admit_rate > 0 else None
            self._backlog = 0.0

    def match(self, channel: str) -> tuple[str, ChannelPolicy]:
        found = self._matches.get(channel)
        if found is None:
            found = self._matches[channel] = self.policy.match(channel)
        return found

    def spreads(self, channel: str) -> bool:
        """Whether pokes on ``channel`` are spread (the hub then passes its poke subscribers to offer())."""
        return self.match(channel)[1].poke_rate > 0

    # -- messages -------------------------------------------------------------------------------------------
    def offer(self, msg: Message, pokes: Collection[int] = ()) -> list[Outgoing]:
        """What to send now for ``msg``: nothing if a window holds it. ``pokes``: the channel's live poke
        subscribers, when :meth:`spreads` says their pokes are spread."""
        channel, now = msg.channel, self.clock()
        policy = self.match(channel)[1]
        spread = policy.poke_rate > 0
        if spread and pokes:
            self._spread(msg, pokes, policy, now)
        window = self._windows.get(channel)
        if window is not None and now >= window.until and not window.pending:
            del self._windows[channel]
            window = None
        if window is None:
            if policy.window > 0:
                self._windows[channel] = _Window(now + policy.window)
            return [Outgoing(channel, (msg,), pokes=not spread)]
        if not window.pending:
            window.since = now
        window.pending.append(msg)
        if now >= window.until or len(window.pending) >= MAX_PENDING:
            # Overdue (the scheduler ran late) or full: send what is held with this one, in order. This one goes
            # out in the window's frame, not at once: coalesced too, so frames out = pub - coal + windows sent.
            self._count("coalesced", channel)
            return [self._close(channel, window, policy, now)]
        self._count("coalesced", channel)
        if len(window.pending) == 1:
            heapq.heappush(self._flushes, (window.until, next(self._n), channel, window))
        return []

    def _close(self, channel: str, window: _Window, policy: ChannelPolicy, now: float) -> Outgoing:
        messages, window.pending = tuple(window.pending), []
        if self.on_held is not None and now > window.since:
            self.on_held(now - window.since)
        if self.on_flushed is not None:  # at once, like on_held: a record has both or neither
            self.on_flushed(channel)
        if policy.window > 0:
            window.until = now + policy.window  # the next window starts with this send
        else:
            del self._windows[channel]
        return Outgoing(channel, messages, pokes=policy.poke_rate <= 0)

    def _spread(self, msg: Message, pokes: Collection[int], policy: ChannelPolicy, now: float) -> None:
        # Spread the pokes of N subscribers over max(N / rate, floor) seconds in random order, after any
        # spread still running, so that their pulls reach the state endpoint at `poke_rate`, not all at once.
        spread = self._spreads.get(msg.channel)
        if spread is None:
            spread = self._spreads[msg.channel] = _Spread(now, msg)
        spread.latest = msg  # a poke still waiting will carry the newest position
        fresh = [conn for conn in pokes if conn not in spread.waiting]
        if not fresh:
            return
        self.rng.shuffle(fresh)
        span = len(fresh) / policy.poke_rate
        if spread.next_slot <= now:
            # The floor spreads a herd that comes at once. Pokes queued behind a spread still running are spread
            # already: a floor for every such group would put them a floor further behind on every change.
            span = max(span, policy.poke_floor)
        start, step = max(now, spread.next_slot), span / len(fresh)
        for i, conn in enumerate(fresh):
            heapq.heappush(self._pokes, (start + i * step, next(self._n), msg.channel, conn, now))
        spread.waiting.update(fresh)
        spread.next_slot = start + span
        self.spread_seconds = span
        self._count("poke_delayed", msg.channel, len(fresh))

    def due(self) -> float | None:
        """When :meth:`flush` has something to send next (None: nothing is held)."""
        tops = [heap[0][0] for heap in (self._flushes, self._pokes) if heap]
        return min(tops) if tops else None

    def flush(self) -> list[Outgoing]:
        """What became sendable by now: ended windows' messages, and the pokes whose slot came."""
        now = self.clock()
        out: list[Outgoing] = []
        while self._flushes and self._flushes[0][0] <= now:
            when, _, channel, window = heapq.heappop(self._flushes)
            if self._windows.get(channel) is window and window.pending and window.until == when:
                out.append(self._close(channel, window, self.match(channel)[1], now))
        while self._pokes and self._pokes[0][0] <= now:
            _, _, channel, conn, since = heapq.heappop(self._pokes)
            spread = self._spreads.get(channel)
            if spread is None or conn not in spread.waiting:
                continue  # the channel was forgotten meanwhile
            spread.waiting.discard(conn)
            out.append(Outgoing(channel, (spread.latest,), conn=conn))
            if self.on_held is not None:
                self.on_held(now - since)
            if not spread.waiting and spread.next_slot <= now:
                del self._spreads[channel]
        return out

    def forget(self, channel: str) -> None:
        """Drop what is held for ``channel``: it has no subscribers left, or they are being resynchronised."""
        self._matches.pop(channel, None)
        self._windows.pop(channel, None)
        self._spreads.pop(channel, None)

    def pokes_pending(self) -> int:
        return sum(len(s.waiting) for s in self._spreads.values())

    # -- admission ------------------------------------------------------------------------------------------
    def admit(self, connections: int, channels: Collection[str] = ()) -> float | None:
        """None: let a new connection (or resume) in. Otherwise the seconds it should wait (jittered).

        Rejected clients are expected back: the k-th of a storm is told about k / admit_rate seconds, so the
        retries come back at the admission rate instead of as a second herd.
        """
        now, policy = self.clock(), self.policy
        names = channels or ("*",)
        hint, outcome = None, "ok"
        if policy.max_connections and connections >= policy.max_connections:
            hint, outcome = CAP_RETRY, "rej"
        elif self._bucket is not None and self._bucket.take(now) > 0:  # no token left: refused
            self._backlog = max(0.0, self._backlog - (now - self._backlog_at) * policy.admit_rate) + 1
            self._backlog_at = now
            hint, outcome = self._backlog / policy.admit_rate, "defer"
        self.admissions[outcome] += 1
        for name in names:
            self._count("admitted" if hint is None else "rejected", name)
        if hint is None:
            return None
        return min(MAX_RETRY, max(MIN_RETRY, hint) * self.rng.uniform(0.8, 1.25))

    def admit_unauthenticated(self, waiting: int, limit: int) -> float | None:
        """None: let in a WebSocket that has no token yet, to wait for its auth frame (:meth:`admit` comes with
        that frame). ``waiting``: such sockets open now; ``limit``: their own small budget, apart from
        ``max_connections``, so that sockets that proved nothing cannot lock out the clients that did.
        Otherwise the seconds it should wait (jittered)."""
        if waiting < limit:
            return None
        self._count("rejected", "*")
        self.admissions["rej"] += 1
        return WAITING_RETRY * self.rng.uniform(0.8, 1.25)

    def admission_bucket(self) -> tuple[float, float] | None:
        """(tokens now, burst) of the admission bucket; None while admission is unlimited (admit_rate 0)."""
        bucket = self._bucket
        if bucket is None:
            return None
        elapsed = max(0.0, self.clock() - bucket.at)
        return min(bucket.burst, bucket.tokens + elapsed * bucket.rate), bucket.burst

    # -- counters -------------------------------------------------------------------------------------------
    def _count(self, name: str, channel: str, n: int = 1) -> None:
        key = (name, channel)
        self.counts[key] = self.counts.get(key, 0) + n

    def take_counts(self) -> dict[tuple[str, str], int]:
        counts, self.counts = self.counts, {}
        return counts


# -- the policy-change log (GET /admin/throttle/log, both fronts): what each change did, in words --------------
LOG_MAX = 1000  # GET /admin/throttle/log?n= at most (the stream keeps about as many)
WHAT_MAX = 200  # characters of a change's summary
UNITS = {"window": " s", "poke_rate": "/s", "poke_floor": " s", "admit_rate": "/s", "queue_bytes": " B",
         "stuck_timeout": " s"}  # fmt: skip


def log_count(raw: str) -> int | None:
    """`?n=` of GET /admin/throttle/log: 1 to LOG_MAX, else None (a 400)."""
    n = int(raw) if raw.isascii() and raw.isdigit() and len(raw) <= 4 else 0
    return n if 1 <= n <= LOG_MAX else None


def policy_changes(rows: Iterable[tuple[str, Mapping[str, str]]]) -> list[dict[str, Any]]:
    """The log's entries (stream id, fields), newest first, as GET /admin/throttle/log answers them."""
    changes = []
    for stream_id, entry in rows:
        try:
            at = float(entry.get("at", ""))
            policy = orjson.loads(entry["policy"]) if entry.get("policy") else None
        except (ValueError, orjson.JSONDecodeError):
            continue  # not written by us
        changes.append({"id": stream_id, "at": at, "who": entry.get("who", ""), "what": entry.get("what", ""),
                        "policy": policy})  # fmt: skip
    return changes


def change_summary(before: Policy, after: Policy, stored: bytes | None) -> str:
    """The log's `what` of a PUT (`stored`: the policy stored) or a DELETE (None: back to the settings')."""
    what = describe_change(before, after)
    return what if stored is not None else f"back to the settings' policy: {what}"[:WHAT_MAX]


def describe_change(before: Policy, after: Policy) -> str:
    """A short human summary of what changed, e.g. ``orders:* window 0 -> 0.5 s; admit_rate 0 -> 200/s``.

    A pattern added is compared with what its channels got before (the pattern that matched it), a pattern
    removed with what they get now."""
    parts = []
    for pattern in sorted(before.channels.keys() | after.channels.keys()):
        old, new = before.channels.get(pattern), after.channels.get(pattern)
        if old == new:
            continue
        note = ""
        if old is None:
            old, note = before.match(pattern)[1], " (new)"
        elif new is None:
            new, note = after.match(pattern)[1], " (removed)"
        changed = _changed(old, new, [f.name for f in fields(ChannelPolicy)])
        parts.append(f"{pattern} {changed or 'as before'}{note}")
    limits = _changed(before, after, list(LIMITS))
    if limits:
        parts.append(limits)
    text = "; ".join(parts) or "no change"
    return text if len(text) <= WHAT_MAX else text[: WHAT_MAX - 3] + "..."


def _changed(old: object, new: object, names: list[str]) -> str:
    return ", ".join(
        f"{name} {_shown(getattr(old, name))} -> {_shown(getattr(new, name))}{UNITS.get(name, '')}"
        for name in names
        if getattr(old, name) != getattr(new, name)
    )


def _shown(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"
