"""wait: what `WAIT 1` after a publish costs, on a 3+3 Redis Cluster (tests/cluster.py) on this machine.

One publisher publishes task-outcome-sized diffs one at a time (a Celery worker's outcome is one round trip),
over channels on every master, alternating blocks of plain publishes and of `wait=1` publishes so that both meet
the same machine noise. Per kind: publish latency p50/p99/max (the call, as the worker waits for it), and the
WAIT shortfalls (replicas that did not acknowledge within SIDECAR_PUBLISH_WAIT_TIMEOUT_MS, 100 ms). Every node
runs AOF with `appendfsync everysec` (WAIT waits for replication, not for the disk).

Run: `python -m bench wait` (or `--quick`).
"""

from __future__ import annotations

import statistics
import time

from bench.context import Context
from sidecar.config import Settings
from sidecar.publish import Publisher
from sidecar.store import Store, connect
from tests.cluster import RedisClusterNodes

BLOCK = 200  # publishes per block
BLOCKS = 10  # blocks per kind


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3)


def run(ctx: Context) -> list[dict]:
    cluster = RedisClusterNodes(ctx.log_dir / f"cluster-wait-{time.monotonic_ns()}")
    try:
        cluster.start()
        settings = Settings()
        url = "redis+cluster://" + ",".join(cluster.startup_nodes[:3])
        pub = Publisher(Store(connect(url, settings), settings))
        latencies: dict[int, list[float]] = {0: [], 1: []}
        n = 0
        for _ in range(BLOCKS // 2 if ctx.quick else BLOCKS):
            for wait in (0, 1):
                for _ in range(BLOCK):
                    n += 1
                    changes = {"status": "SUCCESS", "result": {"rows": n}, "runtime": 0.25}
                    t0 = time.perf_counter()
                    pub.diff(f"task:bench-{n % 64}", "task-succeeded", changes, wait=wait)
                    latencies[wait].append((time.perf_counter() - t0) * 1000)
        shortfalls = pub.store.wait_shortfalls
        pub.close()
    finally:
        cluster.stop()
    records = []
    for wait, values in latencies.items():
        record = {
            "scenario": "wait", "wait": wait, "publishes": len(values),
            "p50_ms": quantile(values, 0.5), "p99_ms": quantile(values, 0.99), "max_ms": round(max(values), 3),
            "mean_ms": round(statistics.fmean(values), 3), "shortfalls": shortfalls if wait else 0,
        }  # fmt: skip
        records.append(record)
        print(
            f"  wait={wait}: {len(values)} publishes p50 {record['p50_ms']} p99 {record['p99_ms']} "
            f"max {record['max_ms']} ms, shortfalls {record['shortfalls']}",
            flush=True,
        )
    return records
