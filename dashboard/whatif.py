"""What a channel policy would have done over recorded traffic: the what-if shown next to Apply. Pure: no Redis,
no Panel.

:func:`replay` runs the relay's own throttle (``sidecar.core.throttle.Throttle``, on a fake clock) over one
pattern's recorded seconds (:class:`dashboard.sources.Point`: published per second, subscribers, replicas) and
counts what comes out: frames pushed to subscribers, pulls by poke subscribers, and how long messages were held.

What the record does not say, the replay assumes (docs/dashboard.md, "What-if"):

- a pattern's publishes all went to **one** channel (the record counts per pattern, not per channel), evenly
  spaced inside their second: the most a window can coalesce; spread over many channels it coalesces less;
- its subscribers are spread evenly over the replicas, and each replica throttles on its own (as the relay does);
- *frames* are what the event, diff and state subscribers get, *pulls* what the poke subscribers make (one pull
  per poke), from the subscribers by mode of v2 records; v1 records do not count them by mode, so there each
  figure is for all subscribers in that mode.

Example::

    points = window.series(end - 300, end, "sprint:*")
    new = replay(points, ChannelPolicy(window=0.25))
    now = replay(points, ChannelPolicy())
    new.frames_per_s, new.pulls_peak, new.delay_mean_ms
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

from sidecar.core.protocol import Message, stream_key
from sidecar.core.throttle import ChannelPolicy, Outgoing, Policy, Throttle

from .sources import Point

CHANNEL = "whatif"
MIN_SAMPLE = 20  # messages offered per second at least (when that many were published): see _sample
MAX_CONNS = 200  # poke subscribers simulated per replica; more are scaled (the spread's slots are even)


@dataclass(frozen=True)
class Outcome:
    """What a policy did (or would have done) over ``seconds`` of one pattern's traffic. Rates are per second."""

    seconds: int
    published: float  # messages in the span
    frames: float  # frames pushed to subscribers in the span (every replica)
    frames_per_s: float
    frames_peak: float  # the busiest second
    pulls_per_s: float  # pulls by poke subscribers, every replica
    pulls_peak: float
    delay_mean_ms: float  # added by the window, per message (0: sent at once)
    delay_max_ms: float
    spread_max_s: float  # the longest a change's pokes were spread over
    poke_delay_mean_ms: float  # from a change to the poke that tells a subscriber of it (poke subscribers)
    poke_delay_max_ms: float


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _sample(n: int, policy: ChannelPolicy) -> int:
    """How many of a second's ``n`` messages to offer. All of them without a window; with one, enough that more
    than three fall in each window (more would not change which windows hold something), at least MIN_SAMPLE."""
    if policy.window <= 0 and policy.poke_rate <= 0:
        return n
    floor = math.ceil(3 / policy.window) if policy.window > 0 else MIN_SAMPLE
    return min(n, max(MIN_SAMPLE, floor))


def _message(seq: int, at: float) -> Message:
    sid = f"{int(at * 1000)}-{seq}"
    return Message(CHANNEL, sid, stream_key(sid), seq, "e", "tick", at * 1000, "event")


def replay(points: Sequence[Point], policy: ChannelPolicy) -> Outcome:
    """The throttle under ``policy`` over the recorded seconds ``points`` (oldest first, one per second)."""
    if not points:
        return Outcome(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)
    if policy.window <= 0 and policy.poke_rate <= 0:
        return _unthrottled(points)
    clock = _Clock()
    throttle = Throttle(Policy(channels={"*": policy}), clock, random.Random(0))
    t0 = points[0].t
    n = len(points)
    frames, pulls = [0.0] * (n + 1), [0.0] * (n + 1)  # one more second: what the last second's windows flush
    delays: list[tuple[float, float]] = []  # (ms, weight)
    poke_delays: list[float] = []  # ms, per poke
    since: dict[int, float] = {}  # simulated connection -> its oldest change not yet poked (ms)
    spread_max = 0.0
    carry, seq = 0.0, 0
    subs_now, conns_now, scale = 0.0, 0, 1.0  # per replica: poke subscribers, simulated poke connections, scale
    push_now = 0.0  # per replica: subscribers that get frames (every subscriber when modes are not recorded)

    def emit(out: list[Outgoing], at: float, sent: float) -> None:
        i = min(max(int(at - t0), 0), n)
        for o in out:
            if o.conn is None:
                frames[i] += push_now * replicas
                if o.pokes:  # no spreading: every poke subscriber pulls at once
                    pulls[i] += subs_now * replicas
                for m in o.messages:
                    delays.append((sent * 1000 - m.ts, weight))
            else:
                pulls[i] += scale * replicas
                if o.conn in since:
                    poke_delays.append(sent * 1000 - since.pop(o.conn))

    def drain(until: float) -> None:
        while (due := throttle.due()) is not None and due <= until:
            clock.now = max(clock.now, due)
            emit(throttle.flush(), clock.now, clock.now)

    weight, replicas = 1.0, 1
    for k, p in enumerate(points):
        carry += p.published
        count = int(carry + 1e-9)
        carry -= count
        replicas = max(p.replicas, 1)
        known = p.poke_subscribers is not None  # v2 records count subscribers by mode
        push_now = (p.subscribers - (p.poke_subscribers or 0)) / replicas if known else p.subscribers / replicas
        subs_now = (p.poke_subscribers or 0) / replicas if known else p.subscribers / replicas
        conns_now = min(math.ceil(subs_now), MAX_CONNS)
        scale = subs_now / conns_now if conns_now else 0.0
        offered = _sample(count, policy)
        weight = count / offered if offered else 1.0
        # The spread of N pokes lasts max(N / rate, floor): fewer simulated connections, a rate scaled alike.
        sim_rate = policy.poke_rate * (conns_now / subs_now) if subs_now and policy.poke_rate else policy.poke_rate
        sim = ChannelPolicy(policy.window, sim_rate, policy.poke_floor)
        if sim != throttle.policy.channels["*"]:
            throttle.set_policy(Policy(channels={"*": sim}))
        pokes = range(conns_now) if sim.poke_rate > 0 else ()
        for j in range(offered):
            at = p.t + (j + 0.5) / offered
            drain(at)
            clock.now = at
            seq += 1
            for conn in pokes:
                since.setdefault(conn, at * 1000)
            emit(throttle.offer(_message(seq, at), pokes), at, at)
            spread_max = max(spread_max, throttle.spread_seconds)
        if k == n - 1:
            drain(p.t + 1 + 3600)
        else:
            drain(p.t + 1)
    published = sum(p.published for p in points)
    weights = sum(w for _, w in delays)
    total_frames = sum(frames)
    return Outcome(
        seconds=n,
        published=published,
        frames=total_frames,
        frames_per_s=total_frames / n,
        frames_peak=max(frames),
        pulls_per_s=sum(pulls) / n,
        pulls_peak=max(pulls),
        delay_mean_ms=sum(d * w for d, w in delays) / weights if weights else 0.0,
        delay_max_ms=max((d for d, _ in delays), default=0.0),
        spread_max_s=spread_max,
        poke_delay_mean_ms=sum(poke_delays) / len(poke_delays) if poke_delays else 0.0,
        poke_delay_max_ms=max(poke_delays, default=0.0),
    )


def _unthrottled(points: Sequence[Point]) -> Outcome:
    """No window, no spreading: every message goes at once to every subscriber (what the replay would find)."""
    carry, frames, pulls = 0.0, [], []
    for p in points:
        carry += p.published
        count = int(carry + 1e-9)
        carry -= count
        poke = p.subscribers if p.poke_subscribers is None else p.poke_subscribers
        push = p.subscribers if p.poke_subscribers is None else p.subscribers - p.poke_subscribers
        frames.append(count * push)
        pulls.append(count * poke)
    n = len(points)
    total = float(sum(frames))
    return Outcome(n, sum(p.published for p in points), total, total / n, max(frames), sum(pulls) / n, max(pulls),
                   0.0, 0.0, 0.0, 0.0, 0.0)  # fmt: skip


def compare(points: Sequence[Point], current: ChannelPolicy, proposed: ChannelPolicy) -> list[tuple[str, str, str]]:
    """The figures of both policies, as (what, in force, proposed) rows for a table."""
    a, b = replay(points, current), replay(points, proposed)
    rows = [
        ("frames/s out (all subscribers)", f"{a.frames_per_s:.2f}", f"{b.frames_per_s:.2f}"),
        ("frames/s, busiest second", f"{a.frames_peak:.0f}", f"{b.frames_peak:.0f}"),
        ("pulls/s peak (poke subscribers)", f"{a.pulls_peak:.0f}", f"{b.pulls_peak:.0f}"),
        ("added delay, mean (ms)", f"{a.delay_mean_ms:.0f}", f"{b.delay_mean_ms:.0f}"),
        ("added delay, max (ms)", f"{a.delay_max_ms:.0f}", f"{b.delay_max_ms:.0f}"),
        ("poke spread, max (s)", f"{a.spread_max_s:.1f}", f"{b.spread_max_s:.1f}"),
        ("poke delay, max (ms)", f"{a.poke_delay_max_ms:.0f}", f"{b.poke_delay_max_ms:.0f}"),
    ]
    return rows


def channel_policy(doc: object) -> ChannelPolicy:
    """A ChannelPolicy from a pattern's JSON policy (unknown or bad values: ValueError, as PUT would refuse)."""
    return Policy.from_json({"channels": {"x": doc}}).channels["x"]
