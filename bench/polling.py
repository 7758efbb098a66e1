"""polling, the seed's counter-argument: 1,000 clients polling the state every second vs the same clients on push.

The channel changes once a second in both halves. Polling clients GET /channels/<c>/state with keep-alive and
If-None-Match (a well-behaved poller); push clients hold an SSE connection. Reported: requests/s at the backend,
CPU of the sidecar and of Redis, and freshness: how old a change is when a client first sees it.
"""

from __future__ import annotations

import time

from bench.context import Context
from bench.load import LoadClients
from bench.servers import Meter, start_sidecar
from bench.wire import now_ms
from sidecar.publish import Publisher

CLIENTS = 1_000
CHANNEL = "poll"


def publish_for(pub: Publisher, seconds: float) -> int:
    t0 = time.monotonic()
    n = 0
    while time.monotonic() - t0 < seconds:
        pub.diff(CHANNEL, "tick", {"ts": round(now_ms(), 3)})
        n += 1
        time.sleep(max(0.0, t0 + n - time.monotonic()))
    return n


def run(ctx: Context) -> list[dict]:
    seconds = ctx.seconds(20, 8)
    records = []
    with ctx.redis("polling") as server:
        sidecar = start_sidecar(server.url, ctx.log_dir)
        try:
            with Publisher.from_url(server.url) as pub:
                pub.diff(CHANNEL, "tick", {"ts": round(now_ms(), 3)})
                for style in ("poll", "push"):
                    with LoadClients(2) as load:
                        if style == "poll":
                            load.open("127.0.0.1", sidecar.port, "poll", CLIENTS, path=f"/channels/{CHANNEL}/state")
                            load.ask({"op": "poll", "interval": 1.0})
                            time.sleep(1.5)  # every client has polled once: measure the steady state
                        else:
                            load.open(
                                "127.0.0.1", sidecar.port, "sse", CLIENTS, path=f"/sse?channel={CHANNEL}&mode=diff"
                            )
                        load.mark()
                        meter = Meter(sidecar.pid, server.pid or 0).start()
                        t0 = time.monotonic()
                        published = publish_for(pub, seconds)
                        elapsed = time.monotonic() - t0
                        cpu_sidecar, cpu_redis = meter.stop()
                        got = load.report()
                    record = {
                        "scenario": "polling", "style": style, "clients": CLIENTS, "changes": published,
                        "requests_per_s": round(got["responses"] / elapsed) if style == "poll" else 0,
                        "frames_per_s": round(got["received"] / elapsed), "freshness_p50": got["p50"],
                        "freshness_p99": got["p99"], "cpu_sidecar": cpu_sidecar, "cpu_redis": cpu_redis,
                    }  # fmt: skip
                    records.append(record)
                    print(f"  polling {style}: {record['requests_per_s']} req/s, sidecar CPU {cpu_sidecar}%, "
                          f"redis CPU {cpu_redis}%, change seen after p50 {got['p50']} ms p99 {got['p99']} ms",
                          flush=True)  # fmt: skip
        finally:
            sidecar.stop()
    return records
