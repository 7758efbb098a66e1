"""connections: 10,000 idle connections (half SSE, half WebSocket) held for a minute: RSS per connection, idle CPU.

The same count against the raw ceiling server (the floor: a socket and a list entry) and, in the full run, the
peer (Flask-SocketIO, all WebSocket).
"""

from __future__ import annotations

import time

from bench.context import Context
from bench.load import LoadClients
from bench.servers import Meter, start_sidecar
from bench.targets import CeilingTarget, PeerTarget, Target

TOTAL = 10_000


def hold(
    name: str, pid: int, groups: list[tuple[str, int, str, list[list[str]] | None]], port: int, seconds: float
) -> dict:
    time.sleep(0.5)
    before = Meter(pid).rss_mb()[0]
    loads = [LoadClients(2) for _ in groups]
    try:
        t0 = time.monotonic()
        opened = [
            load.open("127.0.0.1", port, kind, count, path=path, channels=channels, mode="event", timeout=300)
            for load, (kind, count, path, channels) in zip(loads, groups)
        ]
        setup = time.monotonic() - t0
        after_open = Meter(pid).rss_mb()[0]
        meter = Meter(pid).start()
        time.sleep(seconds)
        (cpu,) = meter.stop()
        after = Meter(pid).rss_mb()[0]
        closed = sum(load.report()["closed"] for load in loads)
    finally:
        for load in loads:
            load.close()
    ready = sum(o["ready"] for o in opened)
    record = {
        "scenario": "connections", "server": name, "connections": ready,
        "failed": sum(o["failed"] for o in opened), "closed_during_hold": closed, "open_seconds": round(setup, 1),
        "hold_seconds": seconds, "rss_before_mb": before, "rss_after_open_mb": after_open, "rss_after_hold_mb": after,
        "rss_per_conn_kb": round((after - before) * 1024 / max(ready, 1), 1), "idle_cpu": cpu,
    }  # fmt: skip
    print(f"  connections {name:>8}: {ready} open, {record['rss_per_conn_kb']} KB each, idle CPU {cpu}%", flush=True)
    return record


def run(ctx: Context) -> list[dict]:
    half = TOTAL // 2
    records = []
    groups = [("sse", half, "/sse?channel=idle&mode=event", None), ("ws", half, "/ws", [["idle"]])]
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
