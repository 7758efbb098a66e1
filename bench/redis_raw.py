"""redis: the raw Redis baseline from Python: pipelined XADD, and the latency of a blocking XREAD.

Also the sidecar's own publish script, pipelined the same way, to show what a publish costs over a bare XADD.
"""

from __future__ import annotations

import threading
import time

import redis

from bench.context import Context
from bench.targets import PAD
from bench.wire import bucket, now_ms, percentiles
from sidecar.publish import Publisher

PIPELINE = 500


def xadd_rate(client: redis.Redis, count: int) -> float:
    fields = {"c": "bench", "d": "x" * (PAD + 120)}
    t0 = time.monotonic()
    for start in range(0, count, PIPELINE):
        pipe = client.pipeline(transaction=False)
        for _ in range(min(PIPELINE, count - start)):
            pipe.xadd("bench:raw", fields, maxlen=10_000, approximate=True)
        pipe.execute()
    return count / (time.monotonic() - t0)


def publish_rate(url: str, count: int) -> float:
    data = {"pad": "x" * PAD}
    with Publisher.from_url(url) as pub:
        t0 = time.monotonic()
        for start in range(0, count, PIPELINE):
            with pub.batch() as batch:
                for _ in range(min(PIPELINE, count - start)):
                    batch.event("bench:pub", "tick", data)
        return count / (time.monotonic() - t0)


def xread_latency(url: str, rate: float, seconds: float) -> dict:
    """One thread XADDs at `rate`/s with the time in a field; another waits in XREAD BLOCK and times arrivals."""
    hist = [0] * 701
    writer, reader = redis.Redis.from_url(url), redis.Redis.from_url(url, socket_timeout=5)
    last = writer.xadd("bench:lat", {"t": "0"})
    count = int(rate * seconds)
    done = threading.Event()
    got = [0]

    def read() -> None:
        cursor = last
        while got[0] < count and not done.is_set():
            for _, entries in reader.xread({"bench:lat": cursor}, block=1000, count=1000) or ():
                now = now_ms()
                for entry_id, fields in entries:
                    hist[bucket(now - float(fields[b"t"]))] += 1
                    cursor = entry_id
                    got[0] += 1

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    t0 = time.monotonic()
    for i in range(count):
        time.sleep(max(0.0, t0 + i / rate - time.monotonic()))
        writer.xadd("bench:lat", {"t": repr(now_ms()), "d": "x" * PAD})
    thread.join(5)
    done.set()
    p50, p95, p99 = percentiles(hist)
    return {"xread_p50": p50, "xread_p95": p95, "xread_p99": p99, "xread_received": got[0], "xread_sent": count}


def run(ctx: Context) -> list[dict]:
    count = 20_000 if ctx.quick else 50_000
    with ctx.redis("raw") as server:
        client = redis.Redis.from_url(server.url)
        xadd_rate(client, 2_000)  # warm up
        record = {
            "scenario": "redis",
            "xadd_pipelined_per_s": round(xadd_rate(client, count)),
            "publish_script_pipelined_per_s": round(publish_rate(server.url, count // 2)),
        }
        record.update(xread_latency(server.url, 500, ctx.seconds(4, 2)))
        client.close()
    print(f"  redis  XADD {record['xadd_pipelined_per_s']}/s  "
          f"publish script {record['publish_script_pipelined_per_s']}/s  "
          f"XREAD p50 {record['xread_p50']} ms p99 {record['xread_p99']} ms", flush=True)  # fmt: skip
    return [record]
