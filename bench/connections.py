"""connections: idle connections (half SSE, half WebSocket) held for a minute: RSS per connection of each kind,
idle CPU. The WebSocket clients offer permessage-deflate as Chromium does (bench/loadclient.py).

`python -m bench connections` runs 10,000 against the sidecar and the raw ceiling server (the floor: a socket and
a list entry) and, in the full run, the peer (Flask-SocketIO, all WebSocket). On its own, this module puts fronts
and the permessage-deflate setting side by side in one run, and adds a fanout to the WebSockets for the CPU per
delivered frame::

    python -m bench.connections --front gevent --front asgi --deflate 0 --deflate 1 --sse 5000 --ws 5000
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from bench.context import Context
from bench.load import LoadClients
from bench.servers import FRONTS, Meter, start_sidecar
from bench.targets import PAD, CeilingTarget, PeerTarget, Target, pace
from sidecar.publish import Publisher

TOTAL = 10_000
Group = tuple[str, int, str, list[list[str]] | None]  # kind, count, path, channels (WebSocket subscribes)


def hold(name: str, pid: int, groups: list[Group], port: int, seconds: float, offer: bool = True) -> dict:
    """Open each group in turn (RSS measured after each: the cost per connection of each kind), hold them all
    `seconds`; `offer`: the WebSocket clients offer permessage-deflate."""
    time.sleep(0.5)
    before = Meter(pid).rss_mb()[0]
    loads = [LoadClients(2) for _ in groups]
    per_kind: dict[str, float] = {}
    try:
        t0 = time.monotonic()
        opened, rss = [], before
        for load, (kind, count, path, channels) in zip(loads, groups):
            opened.append(load.open("127.0.0.1", port, kind, count, path=path, channels=channels, mode="event",
                                    timeout=300, deflate=offer))  # fmt: skip
            time.sleep(0.5)
            now = Meter(pid).rss_mb()[0]
            per_kind[kind] = round((now - rss) * 1024 / max(opened[-1]["ready"], 1), 1)
            rss = now
        setup = time.monotonic() - t0
        after_open = Meter(pid).rss_mb()[0]
        meter = Meter(pid).start()
        time.sleep(seconds)
        (cpu,) = meter.stop()
        after = Meter(pid).rss_mb()[0]
        reports = [r for load in loads for r in load.ask({"op": "report"}, timeout=60)]
    finally:
        for load in loads:
            load.close()
    ready = sum(o["ready"] for o in opened)
    record = {
        "scenario": "connections", "server": name, "connections": ready,
        "failed": sum(o["failed"] for o in opened), "closed_during_hold": sum(r["closed"] for r in reports),
        "deflate_accepted": sum(r["deflated"] for r in reports), "open_seconds": round(setup, 1),
        "hold_seconds": seconds, "rss_before_mb": before, "rss_after_open_mb": after_open, "rss_after_hold_mb": after,
        "rss_per_conn_kb": round((after - before) * 1024 / max(ready, 1), 1), "rss_per_kind_kb": per_kind,
        "idle_cpu": cpu,
    }  # fmt: skip
    kinds = ", ".join(f"{k} {v} KB" for k, v in per_kind.items())
    print(f"  connections {name:>8}: {ready} open, {record['rss_per_conn_kb']} KB each ({kinds}), "
          f"deflate accepted by {record['deflate_accepted']}, idle CPU {cpu}%", flush=True)  # fmt: skip
    return record


def fanout(name: str, pid: int, port: int, redis_url: str, clients: int, rate: float, seconds: float) -> dict:
    """`clients` WebSockets (offering permessage-deflate) on one channel, `rate` messages/s for `seconds`: the
    server's CPU per delivered frame."""
    load = LoadClients(2)
    try:
        opened = load.open("127.0.0.1", port, "ws", clients, path="/ws", channels=[["fan"]], mode="event",
                           timeout=300, deflate=True)  # fmt: skip
        deflated = sum(r["deflated"] for r in load.ask({"op": "report"}))  # sockets with the extension
        with Publisher.from_url(redis_url) as publisher:
            publisher.event("fan", "warm", {})
            time.sleep(1.0)
            load.mark(from_seq=2)
            data = {"pad": "x" * PAD}
            count = max(2, round(rate * seconds))

            def send(k: int) -> None:
                for _ in range(k):
                    publisher.event("fan", "tick", data)

            meter = Meter(pid).start()
            elapsed = pace(count, rate, send)
            load.wait_received(count * opened["ready"], 5.0)
            (cpu,) = meter.stop()
            cpu_seconds = cpu / 100 * (time.monotonic() - meter.t0)
        got = load.report()
    finally:
        load.close()
    record = {
        "scenario": "connections-fanout", "server": name, "clients": opened["ready"],
        "deflate_accepted": deflated, "rate": rate, "seconds": round(elapsed, 1),
        "delivered": got["received"], "lost": max(0, count * opened["ready"] - got["received"]), "cpu": cpu,
        "cpu_us_per_delivery": round(cpu_seconds * 1e6 / max(got["received"], 1), 2), "p99": got["p99"],
    }  # fmt: skip
    print(f"  fanout      {name:>8}: {record['delivered']} frames to {record['clients']} sockets, "
          f"{record['cpu_us_per_delivery']} us CPU each, p99 {record['p99']} ms", flush=True)  # fmt: skip
    return record


def run(ctx: Context) -> list[dict]:
    half = TOTAL // 2
    records = []
    groups: list[Group] = [("sse", half, "/sse?channel=idle&mode=event", None), ("ws", half, "/ws", [["idle"]])]
    trees = [("sidecar", None)] + ([(f"sidecar@{ctx.compare.name}", ctx.compare)] if ctx.compare else [])
    with ctx.redis("connections") as server:
        for name, tree in trees:
            sidecar = start_sidecar(server.url, ctx.log_dir, tree)
            try:
                records.append(hold(name, sidecar.pid, groups, sidecar.port, ctx.seconds(60, 15)))
            finally:
                sidecar.stop()
        others: list[tuple[str, Target]] = [("raw", CeilingTarget(ctx.log_dir, "sse", "batched"))]
        if not ctx.quick:
            others.append(("peer", PeerTarget(server.url, ctx.log_dir)))
        for name, target in others:
            try:
                port = target.proc.port  # type: ignore[attr-defined]
                if name == "raw":
                    groups = [("raw-sse", TOTAL, "/", None)]
                else:
                    groups = [("sio", TOTAL, "/socket.io/?EIO=4&transport=websocket", None)]
                records.append(hold(name, target.pid, groups, port, ctx.seconds(20, 10)))
            finally:
                target.stop()
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.connections", description=__doc__.splitlines()[0])
    parser.add_argument("--front", action="append", choices=FRONTS, help="repeat for side by side (default gevent)")
    parser.add_argument("--deflate", action="append", choices=("0", "1"),
                        help="the server's SIDECAR_WS_DEFLATE; repeat for both (default: unset)")  # fmt: skip
    parser.add_argument("--tree", type=Path, help="run the sidecar of this other checkout (e.g. a branch's worktree)")
    parser.add_argument("--sse", type=int, default=TOTAL // 2, help="idle SSE connections")
    parser.add_argument("--ws", type=int, default=TOTAL // 2, help="idle WebSocket connections")
    parser.add_argument("--no-offer", action="store_true", help="WebSocket clients do not offer permessage-deflate")
    parser.add_argument("--seconds", type=float, default=30, help="how long the idle connections are held")
    parser.add_argument("--fanout", type=int, default=1000, help="WebSocket clients of the fanout (0: none)")
    parser.add_argument("--rate", type=float, default=50, help="fanout messages per second")
    parser.add_argument("--fanout-seconds", type=float, default=10)
    args = parser.parse_args(argv)
    log_dir = Path(tempfile.mkdtemp(prefix="sidecar-bench-connections-"))
    ctx = Context(quick=False, log_dir=log_dir)
    groups: list[Group] = [(k, n, p, c) for k, n, p, c in [
        ("sse", args.sse, "/sse?channel=idle&mode=event", None), ("ws", args.ws, "/ws", [["idle"]])] if n]  # fmt: skip
    print(json.dumps({"scenario": "machine", "command": "python -m bench.connections " + " ".join(sys.argv[1:]),
                      "started": time.strftime("%Y-%m-%d %H:%M:%S"), "logs": str(log_dir)}), flush=True)  # fmt: skip
    with ctx.redis("connections") as server:
        for front in args.front or ["gevent"]:
            for deflate in args.deflate or [None]:
                env = {} if deflate is None else {"SIDECAR_WS_DEFLATE": deflate}
                name = front + ("" if deflate is None else f"/deflate={deflate}")
                sidecar = start_sidecar(server.url, log_dir, args.tree, front=front, **env)
                try:
                    record = hold(name, sidecar.pid, groups, sidecar.port, args.seconds, offer=not args.no_offer)
                    print(json.dumps(record | {"front": front, "ws_deflate": deflate}), flush=True)
                    if args.fanout:
                        record = fanout(name, sidecar.pid, sidecar.port, server.url, args.fanout, args.rate,
                                        args.fanout_seconds)  # fmt: skip
                        print(json.dumps(record | {"front": front, "ws_deflate": deflate}), flush=True)
                finally:
                    sidecar.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
