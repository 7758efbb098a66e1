"""fanout: one channel, N clients; the publish rate steps up until p99 passes 100 ms or anything is lost.

Every server runs at once, each with its own N clients: the sidecar (SSE and WebSocket), the peer, and the raw
ceiling (batched, and one write per frame). The ladder of delivery rates is walked in lock-step, each rate tried
on each server still standing, one after the other, so that all of them meet the same noise of a shared machine.
A failed step is tried once more (for every server alike); after the first rate a server cannot hold, one
bisecting step (`--bisect N`: N, also in lock-step) narrows its highest rate down. With 5,000 clients every
server is tried at each of the first rates whether it held the one before or not: there the figure is the
latency at each rate.

Per step: deliveries/s (messages/s x clients, as read by the clients), latency p50/p95/p99/max (publish call ->
frame read), messages lost, server CPU% and the server's CPU time per delivery, the figure least disturbed by
other load on the machine.

On its own, both fronts side by side with the peer and the raw ceilings, 1,000 clients each, in one run::

    python -m bench.fanout --front gevent --front asgi [--transport sse|ws] [--clients N] [--single] [--ladder ...]
        [--compare DIR [--compare-front asgi]]   # the sidecar of checkout DIR beside this one's (before/after)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import psutil

from bench import report
from bench.context import Context
from bench.load import LoadClients
from bench.servers import FRONTS, Meter
from bench.targets import CeilingTarget, PeerTarget, SidecarTarget, Target

P99_LIMIT_MS = 100.0
LADDER = (25_000, 50_000, 100_000, 200_000, 400_000, 800_000, 1_600_000)  # deliveries/s tried, in order
TRIES = 2
MANY = 5000  # clients: the latency at each rate is the figure, not the highest rate held


def step(target: Target, load: LoadClients, n: int, deliveries: float, seconds: float) -> dict:
    rate = deliveries / n
    count = max(2, round(rate * seconds))
    load.mark(from_seq=target.next_seq)
    meter = Meter(target.pid).start()
    psutil.cpu_percent()  # starts the machine-wide measurement
    elapsed = target.publish(count, rate)
    expected = count * n
    load.wait_received(expected, 2.0)
    (cpu,) = meter.stop()
    busy = psutil.cpu_percent()
    got = load.report()
    lost = max(0, expected - got["received"])
    offered = count / elapsed
    held = (
        got["p99"] is not None and got["p99"] <= P99_LIMIT_MS and lost == 0 and got["gaps"] == 0
        and offered >= 0.9 * rate and got["closed"] == 0
    )  # fmt: skip
    cpu_seconds = cpu / 100 * (time.monotonic() - meter.t0)
    return {
        "rate": round(rate, 1), "offered_rate": round(offered, 1), "deliveries_per_s": round(got["received"] / elapsed),
        "p50": got["p50"], "p95": got["p95"], "p99": got["p99"], "max": got["max"], "lost": lost,
        "gaps": got["gaps"], "closed": got["closed"], "cpu": cpu,
        "cpu_us_per_delivery": round(cpu_seconds * 1e6 / max(got["received"], 1), 2),
        "machine_busy": round(busy * psutil.cpu_count() / 100, 2), "load1": round(os.getloadavg()[0], 2),
        "rss_mb": Meter(target.pid).rss_mb()[0], "held": held,
    }  # fmt: skip


def tried(target: Target, load: LoadClients, n: int, deliveries: float, seconds: float) -> dict:
    for attempt in range(1, TRIES + 1):
        result = step(target, load, n, deliveries, seconds) | {"tries": attempt}
        if result["held"]:
            break
    return result


class Series:
    def __init__(self, kind: str, target: Target, n: int) -> None:
        self.kind, self.target, self.n = kind, target, n
        self.load = LoadClients(2 if n <= 2000 else 4)
        self.steps: list[dict] = []
        self.best = 0.0
        self.best_rate = 0.0
        self.fail_at: float | None = None
        try:
            opened = target.open(self.load, n)
        except BaseException:
            self.load.close()
            target.stop()
            raise
        self.record: dict = {
            "scenario": "fanout", "server": target.name, "transport": target.transport, "clients": n,
            "ready": opened["ready"], "failed": opened["failed"], "rss_idle_mb": Meter(target.pid).rss_mb()[0],
        }  # fmt: skip
        if opened["failed"]:
            self.record["errors"] = opened["errors"]

    def run(self, deliveries: float, seconds: float, tag: str = "") -> bool:
        result = tried(self.target, self.load, self.n, deliveries, seconds)
        if tag:
            result[tag] = True
        self.steps.append(result)
        if result["held"] and result["deliveries_per_s"] > self.best:
            self.best, self.best_rate = result["deliveries_per_s"], deliveries
        return result["held"]

    def finish(self) -> dict:
        self.load.close()
        self.target.stop()
        steps = sorted(self.steps, key=lambda s: s["rate"])
        record = self.record | {"steps": steps, "best_deliveries_per_s": round(self.best)}
        at_100k = [s for s in steps if abs(s["rate"] * self.n - 100_000) < 1]
        if at_100k:
            record["at_100k"] = {k: at_100k[-1][k] for k in ("p50", "p99", "lost", "cpu", "cpu_us_per_delivery")}
        held = [s for s in steps if s["held"]]
        if held:
            record["cpu_us_per_delivery"] = min(s["cpu_us_per_delivery"] for s in held)
        return record


def plan(ctx: Context) -> list[list[tuple[str, int]]]:
    """Groups of series run side by side (one group per client count)."""
    thousand = ["sidecar-sse", "sidecar-ws", "peer", "raw-sse-batched", "raw-ws-batched"]
    if not ctx.quick:
        thousand += ["raw-sse-single", "raw-ws-single"]
    if ctx.compare is not None:
        thousand[2:2] = ["sidecar-sse@", "sidecar-ws@"]
    groups = [[(kind, 1000) for kind in thousand]]
    if not ctx.quick:
        groups.append([(kind, MANY) for kind in ("sidecar-sse", "sidecar-ws", "peer", "raw-sse-batched")])
    return groups


def make(ctx: Context, kind: str, n: int, redis_url: str) -> Target:
    """`sidecar-sse`, `sidecar-ws` (gevent front; `@`: the `--compare` checkout's), `asgi-sse`, `asgi-ws` (the
    asyncio front), `peer`, `raw-<sse|ws>-<batched|single>`."""
    if kind.startswith(("sidecar-", "asgi-")):
        front = "asgi" if kind.startswith("asgi-") else "gevent"
        transport = kind.split("-")[1].rstrip("@")
        tree = ctx.compare if kind.endswith("@") else None
        channel = f"fanout-{front}-{transport}-{n}-{time.monotonic_ns()}"
        return SidecarTarget(redis_url, ctx.log_dir, transport, channel, tree, front=front)
    if kind == "peer":
        return PeerTarget(redis_url, ctx.log_dir)
    _, transport, write = kind.split("-")
    return CeilingTarget(ctx.log_dir, transport, write)


def run_group(
    ctx: Context, group: list[tuple[str, int]], redis_url: str, only: list[str] | None,
    ladder: tuple[int, ...] = LADDER, bisect: int = 1,
) -> list[dict]:  # fmt: skip
    seconds = ctx.seconds(2.5, 2.0)
    series: list[Series] = []
    try:
        for kind, n in group:
            if not only or kind in only:
                series.append(Series(kind, make(ctx, kind, n, redis_url), n))
        standing = list(series)
        for deliveries in ladder:
            for s in list(standing):
                if s.n >= MANY and deliveries > 200_000:
                    standing.remove(s)
                elif not s.run(deliveries, seconds) and s.n < MANY:
                    s.fail_at = deliveries
                    standing.remove(s)
            if not standing:
                break
        for s in series:
            if s.n == 1000 and not any(abs(x["rate"] * s.n - 100_000) < 1 for x in s.steps):
                s.run(100_000, seconds)  # the target is stated at 100k/s
        for _ in range(bisect):  # in lock-step too: each server's next bisecting step, one server after the other
            for s in series:
                below = [x["rate"] * s.n for x in s.steps if x["held"] and x["rate"] * s.n < (s.fail_at or 0) * 0.99]
                if below and s.fail_at:  # between the highest rate held below the failure and the failure
                    rate = math.sqrt(max(below) * s.fail_at)
                    if not s.run(rate, seconds, "bisect"):
                        s.fail_at = rate
    finally:
        records = [s.finish() for s in series]
    for record in records:
        print_row(record)
    return records


def print_row(record: dict) -> None:
    steps = " ".join(f"{s['deliveries_per_s'] // 1000}k:{s['p99']}{'' if s['held'] else '!'}" for s in record["steps"])
    print(
        f"  fanout {record['server']:>11} {record['transport']:>3} n={record['clients']:<5} "
        f"best={record['best_deliveries_per_s']:>7}/s  [{steps}]",
        flush=True,
    )


def run(
    ctx: Context, only: list[str] | None = None, groups: list[list[tuple[str, int]]] | None = None,
    ladder: tuple[int, ...] = LADDER, bisect: int = 1,
) -> list[dict]:  # fmt: skip
    records: list[dict] = []
    with ctx.redis("fanout") as redis:
        for group in groups or plan(ctx):
            records += run_group(ctx, group, redis.url, only, ladder, bisect)
    return records


def fronts_group(
    fronts: list[str], transports: list[str], n: int, single: bool, compare: Sequence[str] = ()
) -> list[tuple[str, int]]:
    """Both fronts side by side with the peer and the raw ceilings, one group of `n` clients each; the fronts in
    `compare` also from the `--compare` checkout (`<kind>@`), next to this checkout's."""
    kinds = [
        f"{'sidecar' if front == 'gevent' else front}-{t}{at}"
        for front in fronts for at in ("", "@") if not at or front in compare for t in transports
    ]  # fmt: skip
    kinds += ["peer"] + [f"raw-{t}-batched" for t in transports]
    kinds += [f"raw-{t}-single" for t in transports] if single else []
    return [(kind, n) for kind in kinds]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fanout", description=__doc__.splitlines()[0])
    parser.add_argument("--front", action="append", choices=FRONTS, help="repeat for side by side (default: both)")
    parser.add_argument("--transport", action="append", choices=("sse", "ws"), help="repeatable (default: both)")
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--single", action="store_true", help="also the raw ceiling with one write per frame")
    parser.add_argument("--quick", action="store_true", help="2 s steps instead of 2.5 s")
    parser.add_argument("--ladder", default=",".join(map(str, LADDER)),
                        help="deliveries/s tried, in order, comma-separated (lower for a slow front)")  # fmt: skip
    parser.add_argument("--bisect", type=int, default=1,
                        help="bisecting steps between a server's best rate and its first failure")  # fmt: skip
    parser.add_argument("--compare", type=Path, metavar="DIR",
                        help="also run the sidecar of checkout DIR (a before/after in one run)")  # fmt: skip
    parser.add_argument("--compare-front", action="append", choices=FRONTS,
                        help="the fronts run from DIR too (default: every --front)")  # fmt: skip
    args = parser.parse_args(argv)
    log_dir = Path(tempfile.mkdtemp(prefix="sidecar-bench-fanout-"))
    compare = args.compare.resolve() if args.compare else None
    ctx = Context(quick=args.quick, log_dir=log_dir, compare=compare)
    command = "python -m bench.fanout " + " ".join(sys.argv[1:] if argv is None else argv)
    print(json.dumps({"scenario": "machine", "command": command, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                      "logs": str(log_dir)}), flush=True)  # fmt: skip
    fronts = args.front or list(FRONTS)
    compared = (args.compare_front or fronts) if compare else []
    group = fronts_group(fronts, args.transport or ["sse", "ws"], args.clients, args.single, compared)
    records = run(ctx, groups=[group], ladder=tuple(int(x) for x in args.ladder.split(",")), bisect=args.bisect)
    for record in records:
        print(json.dumps(record), flush=True)
    print(report.row(report.ratios(records, args.clients)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
