"""spread: 10,000 channels with 1-3 subscribers each (WebSocket connections of ~10 channels), mixed publish rates.

1% of the channels are hot (5 msg/s), 9% warm (0.5 msg/s), the rest cold (one message every 50 s); every
subscriber of a channel must get each of its messages.
"""

from __future__ import annotations

import random
import time

from bench.context import Context
from bench.load import LoadClients
from bench.servers import Meter, start_sidecar
from bench.targets import PAD
from sidecar.publish import Publisher

CHANNELS = 10_000
RATES = ((0.01, 5.0), (0.09, 0.5), (0.90, 0.02))  # (share of channels, messages/s each)


def plan(connections: int, rng: random.Random) -> tuple[list[list[str]], dict[str, int]]:
    """Each channel gets 1-3 distinct subscriber connections; the channel lists per connection."""
    per_conn: list[list[str]] = [[] for _ in range(connections)]
    subs: dict[str, int] = {}
    for c in range(CHANNELS):
        name = f"spread:{c}"
        k = 1 + c % 3
        for conn in rng.sample(range(connections), k):
            per_conn[conn].append(name)
        subs[name] = k
    return per_conn, subs


def schedule(seconds: float, rng: random.Random) -> list[tuple[float, str]]:
    """(offset in seconds, channel) of every message, in time order."""
    out = []
    start = 0
    for share, rate in RATES:
        n = int(CHANNELS * share)
        for c in range(start, start + n):
            t = rng.random() / rate  # a random phase, then a steady rate
            while t < seconds:
                out.append((t, f"spread:{c}"))
                t += 1 / rate
        start += n
    out.sort()
    return out


def run(ctx: Context) -> list[dict]:
    rng = random.Random(7)
    connections = 2_000
    seconds = ctx.seconds(15, 6)
    per_conn, subs = plan(connections, rng)
    messages = schedule(seconds, rng)
    data = {"pad": "x" * PAD}
    with ctx.redis("spread") as server:
        sidecar = start_sidecar(server.url, ctx.log_dir)
        try:
            with LoadClients(2) as load, Publisher.from_url(server.url) as pub:
                t0 = time.monotonic()
                opened = load.open("127.0.0.1", sidecar.port, "ws", connections, path="/ws", channels=per_conn,
                                   mode="event", check_seq=False, timeout=300)  # fmt: skip
                setup = time.monotonic() - t0
                rss_idle = Meter(sidecar.pid).rss_mb()[0]
                load.mark()
                meter = Meter(sidecar.pid).start()
                t0 = time.monotonic()
                i = 0
                while i < len(messages):
                    now = time.monotonic() - t0
                    j = i
                    while j < len(messages) and messages[j][0] <= now:
                        j += 1
                    if j == i:
                        time.sleep(min(0.005, max(0.0, messages[i][0] - now)))
                        continue
                    with pub.batch() as batch:
                        for _, channel in messages[i:j]:
                            batch.event(channel, "tick", data)
                    i = j
                elapsed = time.monotonic() - t0
                expected = sum(subs[channel] for _, channel in messages)
                load.wait_received(expected, 5)
                (cpu,) = meter.stop()
                got = load.report()
        finally:
            sidecar.stop()
    record = {
        "scenario": "spread", "channels": CHANNELS, "connections": connections, "subscriptions": sum(subs.values()),
        "ready": opened["ready"], "subscribe_seconds": round(setup, 1),
        "messages_per_s": round(len(messages) / elapsed),
        "deliveries_per_s": round(got["received"] / elapsed), "p50": got["p50"], "p95": got["p95"], "p99": got["p99"],
        "max": got["max"], "lost": max(0, expected - got["received"]), "cpu": cpu, "rss_idle_mb": rss_idle,
    }  # fmt: skip
    print(f"  spread {record['subscriptions']} subs on {connections} conns: {record['deliveries_per_s']}/s "
          f"p50 {record['p50']} p99 {record['p99']} ms lost {record['lost']} cpu {cpu}%", flush=True)  # fmt: skip
    return [record]
