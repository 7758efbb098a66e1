"""`python -m bench.ws_burst`: the asyncio front's WebSocket write path, 200 clients on one channel, messages
published in batches of 20 (so a Write action carries many frames): the server's CPU time per delivery and the
clients' latency. A quick look at one path (issue #12: one ASGI send per frame vs one write per Write action),
not the fanout ladder of bench/fanout.py.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import psutil

from bench.load import LoadClients
from sidecar.publish import Publisher
from tests.processes import EmbeddedRedis, SidecarProcess

CLIENTS, BATCH, BATCHES, GAP = 200, 20, 100, 0.02  # 1,000 messages/s: 200,000 deliveries/s for 2 s
ENV = {"SIDECAR_ADMIT_RATE": "100000", "SIDECAR_ADMIT_BURST": "100000"}


def run(redis_url: str, tmp: Path) -> dict:
    proc = SidecarProcess(redis_url, tmp, ENV, front="asgi")
    pub = Publisher.from_url(redis_url)
    try:
        with LoadClients(2) as load:
            opened = load.open("127.0.0.1", proc.port, "ws", CLIENTS, path="/ws", channels=[["burst"]], mode="event")
            time.sleep(1)
            load.mark(from_seq=1)
            server = psutil.Process(proc.pid)
            cpu0, t0 = sum(server.cpu_times()[:2]), time.monotonic()
            for _ in range(BATCHES):
                with pub.batch() as batch:
                    for _ in range(BATCH):
                        batch.event("burst", "tick", {"pad": "x" * 100})
                time.sleep(GAP)
            expected = CLIENTS * BATCH * BATCHES
            got = load.wait_received(expected, 30)
            cpu = sum(server.cpu_times()[:2]) - cpu0
            report = load.report()
        return {
            "clients": opened["ready"], "deliveries": got, "expected": expected,
            "seconds": round(time.monotonic() - t0, 2), "server_cpu_s": round(cpu, 2),
            "cpu_us_per_delivery": round(cpu / max(1, got) * 1e6, 2), "p50_ms": report["p50"],
            "p99_ms": report["p99"], "gaps": report["gaps"],
        }  # fmt: skip
    finally:
        pub.close()
        proc.stop()


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        server = EmbeddedRedis(Path(tmp) / "redis").start()
        try:
            print(json.dumps(run(server.url, Path(tmp))))
        finally:
            server.stop()


if __name__ == "__main__":
    main()
