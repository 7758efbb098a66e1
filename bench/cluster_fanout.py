"""cluster: the fanout scenario on one Redis node and on a 3-master Redis Cluster (3+3 nodes), in one run.

The same sidecar and the same 1,000 clients on one channel as `fanout`, four series (SSE and WebSocket, each on
the node and on the cluster; one transport at a time). After one warm-up step each, fixed delivery rates are
tried ROUNDS times, in lock-step over a transport's two series (node, cluster, node, cluster, ...), so that both
Redis setups meet the same noise of a shared machine. Per series and rate: the median p99, whether most rounds
held (p99 <= 100 ms, nothing lost), and the median sidecar CPU time per delivery.

Every Redis runs AOF with `appendfsync everysec`. The cluster's six nodes run on this machine too, so their
replication takes this machine's cores (a deployment puts them elsewhere): the sidecar's own CPU time per
delivery at the same rate is the figure that isolates what the cluster costs the relay, and what it can hold
is one core over it. The target: on the cluster the sidecar holds at least 90% of the deliveries/s it holds on
one node, i.e. its CPU per delivery is at most 1/0.9 of the node's.

Run: `python -m bench cluster` (or `--quick`).
"""

from __future__ import annotations

import statistics
import time

from bench.context import Context
from bench.fanout import Series, step
from bench.targets import SidecarTarget
from sidecar.embedded import EmbeddedRedis
from tests.cluster import RedisClusterNodes

CLIENTS = 1000
TARGET = 0.90  # the cluster holds >= 90% of the one-node deliveries/s
RATES = (50_000, 100_000, 200_000)  # deliveries/s
ROUNDS = 3


def run(ctx: Context) -> list[dict]:
    node = EmbeddedRedis(ctx.log_dir / f"redis-node-{time.monotonic_ns()}", extra_conf="appendfsync everysec\n")
    cluster = RedisClusterNodes(ctx.log_dir / f"cluster-{time.monotonic_ns()}")
    try:
        node.start()
        cluster.start()
        urls = {"node": node.url, "cluster": "redis+cluster://" + ",".join(cluster.startup_nodes[:3])}
        records: list[dict] = []
        for transport in ("sse", "ws"):  # two series at a time: fewer processes share the machine's cores
            series: list[Series] = []
            try:
                for where, url in urls.items():
                    channel = f"cluster-fanout-{transport}-{time.monotonic_ns()}"
                    target = SidecarTarget(url, ctx.log_dir, transport, channel)
                    target.name = f"sidecar@{where}"
                    series.append(Series(f"sidecar-{transport}", target, CLIENTS))
                records += measure(ctx, series)
            finally:
                for s in series:
                    s.load.close()
                    s.target.stop()
    finally:
        cluster.stop()
        node.stop()
    return [*records, ratios(records)]


def measure(ctx: Context, series: list[Series]) -> list[dict]:
    seconds = ctx.seconds(2.5, 2.0)
    for s in series:
        step(s.target, s.load, s.n, 25_000, seconds)  # warm-up: the first step's tail is the servers' start
    for _ in range(1 if ctx.quick else ROUNDS):
        for deliveries in RATES:
            for s in series:
                s.steps.append(step(s.target, s.load, s.n, deliveries, seconds) | {"deliveries": deliveries})
    records = []
    for s in series:
        by_rate = {}
        for deliveries in RATES:
            steps = [x for x in s.steps if x["deliveries"] == deliveries]
            by_rate[deliveries] = {
                "held": sum(x["held"] for x in steps) * 2 > len(steps),
                "p99": statistics.median(x["p99"] or 1e9 for x in steps),
                "cpu_us_per_delivery": statistics.median(x["cpu_us_per_delivery"] for x in steps),
                "lost": sum(x["lost"] for x in steps),
            }
        held = [d for d, r in by_rate.items() if r["held"]]
        record = s.record | {"scenario": "cluster-fanout", "by_rate": by_rate, "steps": s.steps,
                             "best_deliveries_per_s": max(held, default=0)}  # fmt: skip
        records.append(record)
        rates = " ".join(
            f"{d // 1000}k:p99 {r['p99']:.0f}{'' if r['held'] else '!'} {r['cpu_us_per_delivery']:.2f}us"
            for d, r in by_rate.items()
        )
        print(f"  cluster-fanout {record['server']:>15} {record['transport']:>3} [{rates}]", flush=True)
    return records


def ratios(records: list[dict]) -> dict:
    """Cluster vs node, per transport: the highest rate held by each, and per rate the sidecar's CPU time per
    delivery (node / cluster: the share of the node's deliveries/s the cluster's sidecar can hold)."""
    out: dict = {"scenario": "cluster-ratios", "target": TARGET}
    for transport in ("sse", "ws"):
        by = {r["server"].split("@")[1]: r for r in records if r["transport"] == transport}
        node, cluster = by.get("node"), by.get("cluster")
        if not node or not cluster:
            continue
        out[f"{transport}_held"] = f"{node['best_deliveries_per_s']} vs {cluster['best_deliveries_per_s']}"
        for deliveries in RATES:
            a, b = node["by_rate"][deliveries], cluster["by_rate"][deliveries]
            share = round(a["cpu_us_per_delivery"] / b["cpu_us_per_delivery"], 3)
            out[f"{transport}_{deliveries // 1000}k_capacity_share"] = share
            out[f"{transport}_{deliveries // 1000}k_p99"] = f"{a['p99']:.1f} vs {b['p99']:.1f}"
        shares = [out[f"{transport}_{d // 1000}k_capacity_share"] for d in RATES]
        out[f"{transport}_within_target"] = statistics.median(shares) >= TARGET
    print("  cluster/node: " + "  ".join(f"{k}={v}" for k, v in out.items() if k != "scenario"), flush=True)
    return out
