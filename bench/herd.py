"""The poke herd, with and without the pull-rate cap: `python -m bench.herd [--subscribers N] [--cap R]`.

N poke subscribers (raw sockets on one selector, tests/swarm.py) on one channel of one sidecar; each pulls
GET /channels/<c>/state when poked. One change with the cap on, one after a live PUT turning it off. Prints one
JSON record: pulls per second and in the busiest 100 ms, how long the pulls took to arrive, and how many Redis
reads the state endpoint made (LRANGE calls: only a snapshot read runs one).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import redis
import requests

from sidecar.publish import Publisher
from tests.processes import EmbeddedRedis, SidecarProcess
from tests.swarm import Swarm, busiest, per_window

ADMIN_KEY = "bench-admin-key-0123456789"


def measure(swarm: Swarm, counter: redis.Redis, publish: Callable[[], object], expected: int, timeout: float) -> dict:
    reads = _lrange(counter)
    start = len(swarm.pulls)
    published = time.monotonic()
    publish()
    swarm.wait(lambda s: sum(1 for p in s.pulls[start:] if p.done) >= expected, timeout)
    sent = [p.sent for p in swarm.pulls[start:]]
    return {
        "pulls": len(sent),
        "pulls_per_s": per_window(sent),
        "busiest_1s": busiest(sent, 1.0),
        "busiest_100ms": busiest(sent, 0.1),
        "share_in_100ms": round(busiest(sent, 0.1) / len(sent), 3),
        "first_pull_s": round(min(sent) - published, 3),
        "last_pull_s": round(max(sent) - published, 3),
        "redis_reads": _lrange(counter) - reads,
        "failed": sum(1 for p in swarm.pulls[start:] if p.status != 200),
    }


def _lrange(client: redis.Redis) -> int:
    return int(client.info("commandstats").get("cmdstat_lrange", {}).get("calls", 0))


def run(subscribers: int, cap: float, log_dir: Path) -> dict:
    server = EmbeddedRedis(log_dir / "redis", appendonly=False).start()
    sidecar = None
    try:
        policy = {"channels": {"herd:*": {"poke_rate": cap}}}
        env = {"SIDECAR_THROTTLE": json.dumps(policy), "SIDECAR_ADMIN_KEY": ADMIN_KEY}
        sidecar = SidecarProcess(server.url, log_dir, env, ready_timeout=30)
        pub = Publisher.from_url(server.url)
        pub.state("herd:1", "created", {"rev": 0})
        counter = redis.Redis.from_url(server.url)
        with Swarm("127.0.0.1", sidecar.port, subscribers, lambda i: ["herd:1"], mode="poke", pull=True) as swarm:
            swarm.wait(lambda s: s.connected() == subscribers, 60)
            timeout = subscribers / cap * 2 + 30
            capped = measure(swarm, counter, lambda: pub.diff("herd:1", "changed", {"rev": 1}), subscribers, timeout)
            headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
            requests.put(f"{sidecar.url}/admin/throttle", json={"channels": {}}, headers=headers, timeout=5)
            time.sleep(0.2)
            uncapped = measure(swarm, counter, lambda: pub.diff("herd:1", "changed", {"rev": 2}), subscribers, 60)
        return {"scenario": "herd", "subscribers": subscribers, "cap": cap, "capped": capped, "uncapped": uncapped}
    finally:
        if sidecar is not None:
            sidecar.stop()
        server.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.herd", description=__doc__)
    parser.add_argument("--subscribers", type=int, default=1000)
    parser.add_argument("--cap", type=float, default=200.0, help="pulls per second with the cap on")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-herd-") as tmp:
        record = run(args.subscribers, args.cap, Path(tmp))
    json.dump(record, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
