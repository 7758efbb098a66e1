"""`python -m bench.ws_burst`: the asyncio front's WebSocket write path, 200 clients on one channel, messages
published in batches of 20 (so a Write action carries many frames): the server's CPU time per delivery and the
clients' latency. A quick look at one path (issue #12: one ASGI send per frame vs one write per Write action),
not the fanout ladder of bench/fanout.py.

`--loop asyncio|uvloop` runs the documented uvicorn command (docs/deployment.md: our protocols, direct writes) on
that event loop instead of `sidecar serve --front asgi` (uvloop when installed): does uvloop help.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import psutil
import requests

from bench.load import LoadClients
from sidecar.publish import Publisher
from tests.processes import EmbeddedRedis, ManagedProcess, SidecarProcess, child_env, free_port

CLIENTS, BATCH, BATCHES, GAP = 200, 20, 100, 0.02  # 1,000 messages/s: 200,000 deliveries/s for 2 s
ENV = {"SIDECAR_ADMIT_RATE": "100000", "SIDECAR_ADMIT_BURST": "100000"}


class UvicornRelay(ManagedProcess):
    """`uvicorn --factory sidecar.asgi:app` with our protocols on `loop` (docs/deployment.md's command)."""

    def __init__(self, redis_url: str, log_dir: Path, loop: str) -> None:
        self.port = free_port()
        argv = [sys.executable, "-m", "uvicorn", "--factory", "sidecar.asgi:app", "--host", "127.0.0.1", "--port",
                str(self.port), "--loop", loop, "--http", "sidecar.asgi.protocols:HTTPProtocol", "--ws",
                "sidecar.asgi:WSProtocol", "--ws-ping-interval", "0", "--ws-per-message-deflate", "false",
                "--no-access-log"]  # fmt: skip
        env = child_env(redis_url, {"SIDECAR_DEV": "1", **ENV})
        super().__init__(f"uvicorn-{loop}-{self.port}", argv, env, log_dir / f"uvicorn-{self.port}.log")
        self.wait_until("GET /healthz 200", self._healthy, 30)

    def _healthy(self) -> bool:
        try:
            return requests.get(f"http://127.0.0.1:{self.port}/healthz", timeout=1).status_code == 200
        except requests.RequestException:
            return False


def run(redis_url: str, tmp: Path, loop: str = "auto") -> dict:
    proc: ManagedProcess
    proc = SidecarProcess(redis_url, tmp, ENV, front="asgi") if loop == "auto" else UvicornRelay(redis_url, tmp, loop)
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
            "loop": loop, "clients": opened["ready"], "deliveries": got, "expected": expected,
            "seconds": round(time.monotonic() - t0, 2), "server_cpu_s": round(cpu, 2),
            "cpu_us_per_delivery": round(cpu / max(1, got) * 1e6, 2), "p50_ms": report["p50"],
            "p99_ms": report["p99"], "gaps": report["gaps"],
        }  # fmt: skip
    finally:
        pub.close()
        proc.stop()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.ws_burst")
    parser.add_argument("--loop", action="append", choices=("auto", "asyncio", "uvloop"),
                        help="repeat to run each in turn (default: auto, i.e. sidecar serve --front asgi)")  # fmt: skip
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        server = EmbeddedRedis(Path(tmp) / "redis").start()
        try:
            for loop in args.loop or ["auto"]:
                print(json.dumps(run(server.url, Path(tmp), loop)), flush=True)
        finally:
            server.stop()


if __name__ == "__main__":
    main()
