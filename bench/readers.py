"""readers: what "every replica reads every shard" costs Redis, with 0, 1, 2 and 4 replicas on one publish stream.

A publisher sends P messages/s (pipelined, over all shards) for a fixed time while R real sidecar processes,
with no clients at all, read every shard; Redis' own CPU (INFO cpu: user + sys of the server) and each
sidecar's CPU are sampled over the same window. Two publish rates separate the cost that grows with entries
read from the fixed cost of a replica (its blocking reads, stats records and policy polls):

    redis_cpu ~= a + b*P + c*X + d*R*P      (CPU seconds per second; X: XREAD calls/s of all replicas)

`b` is the cost of a publish itself, `c` of one XREAD call (its wakeup, reply and re-block), `d` of one entry
in a reply. X is what the readers make of it: a blocking XREAD returns as soon as one entry arrives, so at
moderate rates each replica makes about one call per publish, and entries per call grow only when the readers
fall behind.
The scaling model in docs/scaling.md is built from these figures. Run: `python -m bench readers`.
"""

from __future__ import annotations

import threading
import time

import psutil
import redis

from bench.context import Context
from sidecar.publish import Publisher
from tests.processes import SidecarProcess

BATCH = 100  # messages per pipelined round trip of the publisher


def redis_cpu(client: redis.Redis) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def xread_calls(client: redis.Redis) -> int:
    return int(client.info("commandstats").get("cmdstat_xread", {}).get("calls", 0))


def publish_at(url: str, rate: float, seconds: float, stop: threading.Event) -> int:
    """Publish `rate` small events/s over 64 channels (all 16 shards) until `seconds` pass; returns the count."""
    sent = 0
    with Publisher.from_url(url) as pub:
        t0 = time.monotonic()
        while not stop.is_set():
            elapsed = time.monotonic() - t0
            if elapsed >= seconds:
                break
            due = int(rate * elapsed) - sent
            if due <= 0:
                time.sleep(0.002)
                continue
            with pub.batch() as batch:
                for i in range(min(due, BATCH)):
                    batch.event(f"readers:{(sent + i) % 64}", "tick", {"n": sent + i})
            sent += min(due, BATCH)
    return sent


def measure(ctx: Context, replicas: int, rate: float, seconds: float, linger_ms: float = 0.0) -> dict:
    with ctx.redis(f"readers-{replicas}-{int(rate)}") as server:
        env = {"SIDECAR_READ_LINGER_MS": linger_ms}
        sidecars = [SidecarProcess(server.url, ctx.log_dir, env) for _ in range(replicas)]
        try:
            client = redis.Redis.from_url(server.url)
            time.sleep(1.0)  # readers settled in their blocking reads
            procs = [psutil.Process(s.pid) for s in sidecars]
            side0 = [p.cpu_times() for p in procs]
            cpu0, calls0, t0 = redis_cpu(client), xread_calls(client), time.monotonic()
            sent = publish_at(server.url, rate, seconds, threading.Event())
            time.sleep(0.5)  # the readers drain what is left
            wall = time.monotonic() - t0
            used = redis_cpu(client) - cpu0
            calls = xread_calls(client) - calls0
            side = [
                (p.cpu_times().user + p.cpu_times().system) - (c.user + c.system)
                for p, c in zip(procs, side0, strict=True)
            ]
            client.close()
        finally:
            for sidecar in sidecars:
                sidecar.stop()
    return {
        "scenario": "readers",
        "replicas": replicas,
        "rate": rate,
        "linger_ms": linger_ms,
        "achieved": round(sent / seconds),  # the model uses what was published, not what was asked for
        "published": sent,
        "redis_cpu": round(used / wall, 4),  # CPU seconds per second (1.0 = one core)
        "xread_per_s": round(calls / wall),  # all replicas together
        "entries_per_xread": round(sent * replicas / calls, 1) if calls else 0.0,
        "sidecar_cpu": round(sum(side) / wall / replicas, 4) if replicas else 0.0,
    }


def fit(records: list[dict]) -> dict:
    """The model's costs by least squares over the measured points: Redis CPU per publish, per XREAD call and
    per entry read, and a sidecar's CPU per entry it reads."""
    import numpy as np

    rows = [[1.0, r["achieved"], r["xread_per_s"], r["replicas"] * r["achieved"]] for r in records]
    cpu = [r["redis_cpu"] for r in records]
    (a, b, c, d), *_ = np.linalg.lstsq(np.array(rows), np.array(cpu), rcond=None)
    sidecar = [r["sidecar_cpu"] / r["achieved"] for r in records if r["replicas"]]
    return {
        "scenario": "readers-model",
        "idle_cpu": round(float(a), 5),
        "cpu_per_publish_us": round(float(b) * 1e6, 3),
        "cpu_per_xread_us": round(float(c) * 1e6, 3),
        "cpu_per_entry_read_us": round(float(d) * 1e6, 3),
        "sidecar_cpu_per_entry_us": round(1e6 * sum(sidecar) / len(sidecar), 3),
    }


def run(ctx: Context) -> list[dict]:
    seconds = ctx.seconds(10, 4)
    records = []
    for rate in (2000.0, 8000.0):
        for replicas in (0, 1, 2, 4):
            record = measure(ctx, replicas, rate, seconds)
            print(f"  {replicas} replicas at {rate:.0f}/s: Redis {record['redis_cpu']:.3f} core, "
                  f"{record['xread_per_s']} XREAD/s ({record['entries_per_xread']} entries each), "
                  f"each sidecar {record['sidecar_cpu']:.3f} core", flush=True)  # fmt: skip
            records.append(record)
    model = fit(records)
    for linger in (1.0, 2.0, 5.0):  # the read linger (SIDECAR_READ_LINGER_MS) against the 0 ms row above
        record = measure(ctx, 2, 2000.0, seconds, linger)
        print(f"  2 replicas at 2000/s, linger {linger:g} ms: Redis {record['redis_cpu']:.3f} core, "
              f"{record['xread_per_s']} XREAD/s ({record['entries_per_xread']} entries each), "
              f"each sidecar {record['sidecar_cpu']:.3f} core", flush=True)  # fmt: skip
        records.append(record)
    return [*records, model]
