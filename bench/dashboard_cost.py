"""`python -m bench.dashboard_cost [--seconds 20]`: what one dashboard process costs Redis and the CPU.

A real redis-server, a real `sidecar dashboard` process and real Chromium pages (Playwright) on it; the stats
stream is fed by simulated replicas that write real v2 records (the agreed format: 10 active patterns, 16
shards, every v2 field; about the size sidecar/stats.py writes) once a second each, plus one publisher record
a second. For each (replicas, sessions) case it measures, over ``--seconds`` after a warm-up, the Redis
commands the dashboard sent (``INFO commandstats`` deltas, the writers' XADDs left out) and the dashboard
process's CPU (utime + stime from /proc). Prints one JSON line per case and a table, with each case's ratio to
the first (1 replica, 1 session) measured in the same run. docs/dashboard.md records the figures.

Every process started is stopped by its pid.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import orjson
import redis
import requests

from sidecar.embedded import EmbeddedRedis, free_port
from tests.processes import REPO_ROOT, ManagedProcess, child_env

CASES = ((1, 1), (1, 10), (20, 1), (20, 10))  # (replicas, browser sessions)
PATTERNS = [f"p{i}:*" for i in range(10)]
N_BUCKETS = 14
COMMANDS = ("xrange", "xrevrange", "type", "hgetall", "get")


def record(replica: str, ts: float, started: float, rng: random.Random) -> dict[str, Any]:
    """A v2 replica record with every field filled (docs/dashboard.md, "The stats record")."""

    def hist() -> list[int]:
        return [rng.randrange(0, 50) for _ in range(N_BUCKETS)]

    return {
        "v": 2, "replica": replica, "host": replica.split(":")[0], "pid": 1, "port": 8000, "front": "gevent",
        "version": "0.1.0", "ts": round(ts, 3), "dt": 1.0, "started": started, "reader": 1,
        "conn": {"sse": 300, "ws": 200}, "slow": 0, "lat": hist(), "herd": {"pending": 0, "spread": 0.0},
        "stage": {"read": hist(), "held": hist(), "queue": hist()},
        "shards": {str(s): {"lag": round(rng.random() * 5, 2), "reconn": 0} for s in range(16)},
        "adm": {"ok": 3, "defer": 1, "rej": 0, "tries": 4, "level": 12.5, "rate": 20.0, "burst": 100},
        "qd": [400, 50, 20, 10, 5, 5, 3, 2, 1, 0, 0, 0],
        "slowest": [{"t": "ws", "ch": 3, "qb": 40_000 - i, "qf": 200, "age": 30.0} for i in range(5)], "stuck": 0,
        "ch": {p: {"pub": 100, "dlv": 500, "coal": 20, "subs": 50, "lat": hist(),
                   "modes": {"event": 20, "diff": 20, "poke": 10}} for p in PATTERNS},
    }  # fmt: skip


class Writers:
    """``replicas`` simulated replicas and one publisher, one record each per second (a pipeline), in a thread."""

    def __init__(self, client: redis.Redis, replicas: int) -> None:
        self.client = client
        self.replicas = [f"bench-{i}:{1000 + i}" for i in range(replicas)]
        self.started = time.time()
        self.rng = random.Random(0)
        self.size = len(orjson.dumps(record(self.replicas[0], time.time(), self.started, self.rng)))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(1.0 - time.time() % 1.0):
            now = time.time()
            pipe = self.client.pipeline(transaction=False)
            for replica in self.replicas:
                pipe.xadd("rt:stats", {"r": orjson.dumps(record(replica, now, self.started, self.rng))},
                          maxlen=20_000, approximate=True)  # fmt: skip
            pub = {"v": 2, "kind": "pub", "replica": "worker:7", "host": "worker", "pid": 7, "ts": round(now, 3),
                   "dt": 1.0, "n": 100, "ack": [90, 10] + [0] * 12}  # fmt: skip
            pipe.xadd("rt:stats", {"r": orjson.dumps(pub)})
            pipe.execute()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(3)


class Dashboard(ManagedProcess):
    def __init__(self, redis_url: str, log_dir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/app"
        argv = [sys.executable, "-m", "sidecar", "dashboard", "--host", "127.0.0.1", "--port", str(self.port)]
        super().__init__("dashboard", argv, child_env(redis_url, {}), log_dir / "dashboard.log", cwd=REPO_ROOT)
        self.wait_until("GET /app 200", self._up, 60.0)

    def _up(self) -> bool:
        try:
            return requests.get(self.url, timeout=2).status_code == 200
        except requests.RequestException:
            return False

    def cpu(self) -> float:
        """CPU seconds the process (it execs `panel serve`: the same pid) has used."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def commandstats(client: redis.Redis) -> dict[str, int]:
    stats = client.info("commandstats")
    return {c: int(stats.get(f"cmdstat_{c}", {}).get("calls", 0)) for c in COMMANDS}


def measure(browser: Any, redis_url: str, client: redis.Redis, replicas: int, sessions: int, seconds: float,
            log_dir: Path) -> dict[str, Any]:  # fmt: skip
    client.delete("rt:stats")
    writers = Writers(client, replicas)
    time.sleep(3)
    dash = Dashboard(redis_url, log_dir)
    pages = []
    try:
        for _ in range(sessions):
            page = browser.new_page(viewport={"width": 1400, "height": 1200})
            page.goto(dash.url)
            page.wait_for_function("() => window.Bokeh && Bokeh.documents.length && Bokeh.documents[0]"
                                   ".get_model_by_name('stages')", timeout=60_000)  # fmt: skip
            pages.append(page)
        time.sleep(10)  # warm-up: every session refreshing, the readiness check's session gone
        calls, cpu, t0 = commandstats(client), dash.cpu(), time.monotonic()
        time.sleep(seconds)
        after, cpu_after, elapsed = commandstats(client), dash.cpu(), time.monotonic() - t0
        result = {
            "scenario": "dashboard_cost", "replicas": replicas, "sessions": sessions, "seconds": round(elapsed, 1),
            "record_bytes": writers.size,
            **{f"{c}_per_s": round((after[c] - calls[c]) / elapsed, 2) for c in COMMANDS},
            "cpu_percent": round(100 * (cpu_after - cpu) / elapsed, 1),
        }  # fmt: skip
    finally:
        for page in pages:
            page.close()
        dash.stop()
        writers.stop()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="measured seconds per case (default 20)")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    from tests.browser.conftest import CHROMIUM, CHROMIUM_ARGS

    results = []
    with tempfile.TemporaryDirectory(prefix="bench-dashboard-") as tmp:
        server = EmbeddedRedis(Path(tmp) / "redis").start()
        client = redis.Redis.from_url(server.url)
        try:
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
                try:
                    for replicas, sessions in CASES:
                        result = measure(browser, server.url, client, replicas, sessions, args.seconds, Path(tmp))
                        print(json.dumps(result), flush=True)
                        results.append(result)
                finally:
                    browser.close()
        finally:
            client.close()
            server.stop()
    base = results[0]
    print("\n| replicas | sessions | XRANGE/s | XREVRANGE/s | TYPE/s | HGETALL/s | dashboard CPU | CPU vs 1x1 |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        ratio = r["cpu_percent"] / base["cpu_percent"] if base["cpu_percent"] else float("nan")
        print(f"| {r['replicas']} | {r['sessions']} | {r['xrange_per_s']} | {r['xrevrange_per_s']} | "
              f"{r['type_per_s']} | {r['hgetall_per_s']} | {r['cpu_percent']} % | {ratio:.1f}x |")  # fmt: skip


if __name__ == "__main__":
    main()
