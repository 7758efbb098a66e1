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

Two more parts compare the live-read modes (SIDECAR_LIVE_READ, docs/scaling.md): `publish` measures what the
publish script's PUBLISH costs a publish nobody subscribes to (the script with and without that line, in one
run), and `modes` runs 1, 2 and 4 replicas in `shards` and in `channels` mode, where each replica has one SSE
client that wants 1/R of the channels. `check` what the position check costs
Redis per channel, `bus`, on the 3+3 test cluster,
what a classic PUBLISH costs the nodes that do not own the channel. Run parts alone:
`python -m bench.readers publish|modes|check|bus`.
"""

from __future__ import annotations

import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import redis
import requests

from bench.context import Context
from sidecar.publish import Publisher
from sidecar.store import PUBLISH_SCRIPT
from tests.processes import SidecarProcess

BATCH = 100  # messages per pipelined round trip of the publisher


def redis_cpu(client: redis.Redis) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def xread_calls(client: redis.Redis) -> int:
    return int(client.info("commandstats").get("cmdstat_xread", {}).get("calls", 0))


CHANNELS = 64
NOTIFY_LINE = "redis.call('PUBLISH', ARGV[13], cjson.encode(live))"


def publish_at(
    url: str, rate: float, seconds: float, stop: threading.Event, script: str | None = None,
    channels: list[str] | None = None,
) -> int:
    """Publish `rate` small events/s over 64 channels (all 16 shards) until `seconds` pass; returns the count.
    `script`: another publish script (same arguments) in place of the real one; `channels`: other channels."""
    names = channels or [f"readers:{c}" for c in range(CHANNELS)]
    sent = 0
    with Publisher.from_url(url) as pub:
        if script is not None:
            store = pub.store
            store.redis.script_load(script)
            store._publish = store.redis.register_script(script)
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
                    batch.event(names[(sent + i) % len(names)], "tick", {"n": sent + i})
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


def publish_cost(ctx: Context, rate: float, seconds: float) -> list[dict]:
    """Redis CPU per publish with the script's PUBLISH and without it, no subscriber and no reader at all."""
    assert NOTIFY_LINE in PUBLISH_SCRIPT
    records = []
    for notify in (False, True) * 3:  # interleaved: a drift of the machine's load shows as a spread
        script = None if notify else PUBLISH_SCRIPT.replace(NOTIFY_LINE, "")
        with ctx.redis(f"publish-{notify}") as server:
            client = redis.Redis.from_url(server.url)
            cpu0, t0 = redis_cpu(client), time.monotonic()
            sent = publish_at(server.url, rate, seconds, threading.Event(), script)
            wall = time.monotonic() - t0
            used = redis_cpu(client) - cpu0
            script_us = float(client.info("commandstats").get("cmdstat_evalsha", {}).get("usec_per_call", 0))
            client.close()
        records.append({
            "scenario": "readers-publish", "notify": notify, "rate": rate, "achieved": round(sent / seconds),
            "redis_cpu": round(used / wall, 4), "cpu_per_publish_us": round(used / sent * 1e6, 2),
            "script_us": script_us,  # Redis' own time in the script per call (INFO commandstats)
        })  # fmt: skip
        print(f"  publish {'with' if notify else 'without'} PUBLISH at {rate:.0f}/s: "
              f"{records[-1]['cpu_per_publish_us']} us of Redis CPU each, {script_us} us in the script",
              flush=True)  # fmt: skip
    return records


def drain(url: str, channels: list[str], stop: threading.Event) -> None:
    """An SSE client of `channels` that reads and drops everything (the client's CPU is not measured)."""
    query = "&".join(f"channel={c}" for c in channels)
    try:
        with requests.get(f"{url}/sse?{query}&mode=event", stream=True, timeout=30) as response:
            for _ in response.iter_content(65536):
                if stop.is_set():
                    return
    except requests.RequestException:  # the sidecar stopped at the end of the step
        return


def measure_mode(ctx: Context, mode: str, replicas: int, rate: float, seconds: float) -> dict:
    """R replicas in `mode`, replica i's one client wanting channels i, i+R, i+2R, ... (1/R of them)."""
    with ctx.redis(f"modes-{mode}-{replicas}-{int(rate)}") as server:
        env = {"SIDECAR_LIVE_READ": mode}
        sidecars = [SidecarProcess(server.url, ctx.log_dir, env) for _ in range(replicas)]
        stop = threading.Event()
        try:
            for i, sidecar in enumerate(sidecars):
                wanted = [f"readers:{c}" for c in range(i, CHANNELS, replicas)]
                threading.Thread(target=drain, args=(sidecar.url, wanted, stop), daemon=True).start()
            client = redis.Redis.from_url(server.url)
            time.sleep(1.5)  # clients subscribed, readers settled
            procs = [psutil.Process(s.pid) for s in sidecars]
            side0 = [p.cpu_times() for p in procs]
            read0 = [messages_read(s.url) for s in sidecars]
            cpu0, t0 = redis_cpu(client), time.monotonic()
            sent = publish_at(server.url, rate, seconds, threading.Event())
            time.sleep(0.5)
            wall = time.monotonic() - t0
            used = redis_cpu(client) - cpu0
            side = [
                (p.cpu_times().user + p.cpu_times().system) - (c.user + c.system)
                for p, c in zip(procs, side0, strict=True)
            ]
            read = [messages_read(s.url) - r for s, r in zip(sidecars, read0, strict=True)]
            client.close()
        finally:
            stop.set()
            for sidecar in sidecars:
                sidecar.stop()
    return {
        "scenario": "readers-modes", "mode": mode, "replicas": replicas, "rate": rate,
        "achieved": round(sent / seconds), "published": sent,
        "redis_cpu": round(used / wall, 4),
        "redis_cpu_per_publish_us": round(used / sent * 1e6, 2),
        "sidecar_cpu": round(sum(side) / wall / replicas, 4),
        "decoded_per_replica": round(sum(read) / replicas),  # messages each replica decoded, on average
    }  # fmt: skip


def messages_read(url: str) -> float:
    for line in requests.get(f"{url}/metrics", timeout=5).text.splitlines():
        if line.startswith("sidecar_messages_read_total "):
            return float(line.split()[1])
    return 0.0


def modes(ctx: Context, seconds: float) -> list[dict]:
    records = []
    for rate in (2000.0, 6000.0):
        for replicas in (1, 2, 4):
            for mode in ("shards", "channels"):
                record = measure_mode(ctx, mode, replicas, rate, seconds)
                print(f"  {mode:8} {replicas} replicas at {rate:.0f}/s: Redis {record['redis_cpu']:.3f} core "
                      f"({record['redis_cpu_per_publish_us']} us per publish), each sidecar "
                      f"{record['sidecar_cpu']:.3f} core, decoded {record['decoded_per_replica']} of "
                      f"{record['published']}", flush=True)  # fmt: skip
                records.append(record)
    return records


def bus_cost(ctx: Context, rate: float, seconds: float) -> list[dict]:
    """On a 3+3 cluster: what a classic PUBLISH costs the nodes that do not own the channel (Redis broadcasts it
    over the cluster bus to every node), with no subscriber anywhere; the script with and without it."""
    from sidecar.core.protocol import shard_of
    from sidecar.core.slots import key_slot
    from tests.cluster import RedisClusterNodes

    records = []
    with RedisClusterNodes(ctx.log_dir / f"bus-{time.monotonic_ns()}").start() as cluster:
        url = "redis+cluster://" + ",".join(n.addr for n in cluster.masters())
        owner = cluster.masters()[0]
        with Publisher.from_url(url) as probe:
            store = probe.store
            owned = [c for c in (f"bus:{i}" for i in range(2000))
                     if cluster.master_for_slot(key_slot(store.live_key(shard_of(c, store.settings.shards))))
                     is owner][:CHANNELS]  # fmt: skip
        for notify in (False, True) * 2:
            script = None if notify else PUBLISH_SCRIPT.replace(NOTIFY_LINE, "")
            nodes = cluster.live_nodes()
            clients = [n.client(timeout=5) for n in nodes]
            cpu0 = [redis_cpu(c) for c in clients]
            sent = publish_at(url, rate, seconds, threading.Event(), script, owned)
            used = [redis_cpu(c) - c0 for c, c0 in zip(clients, cpu0, strict=True)]
            for c in clients:
                c.close()
            others = [u for n, u in zip(nodes, used, strict=True) if n is not owner]
            records.append({
                "scenario": "readers-bus", "notify": notify, "rate": rate, "achieved": round(sent / seconds),
                "owner_cpu_per_publish_us": round(used[nodes.index(owner)] / sent * 1e6, 2),
                "other_node_cpu_per_publish_us": round(sum(others) / len(others) / sent * 1e6, 2),
            })  # fmt: skip
            print(f"  cluster publish {'with' if notify else 'without'} PUBLISH at {rate:.0f}/s: owner "
                  f"{records[-1]['owner_cpu_per_publish_us']} us, each other node "
                  f"{records[-1]['other_node_cpu_per_publish_us']} us per publish", flush=True)  # fmt: skip
    return records


def check_cost(ctx: Context, channels: int = 10_000, rounds: int = 10) -> list[dict]:
    """What the channels mode's position check costs Redis: one pipelined HMGET of a channel's meta hash."""
    with ctx.redis("check") as server, Publisher.from_url(server.url) as pub:
        names = [f"check:{i}" for i in range(channels)]
        for i in range(0, channels, BATCH):
            with pub.batch() as batch:
                for name in names[i : i + BATCH]:
                    batch.event(name, "tick", {})
        store, client = pub.store, redis.Redis.from_url(server.url)
        client.config_resetstat()
        cpu0, t0 = redis_cpu(client), time.monotonic()
        for _ in range(rounds):
            pipe = client.pipeline(transaction=False)
            for name in names:
                pipe.hmget(store.keys(name).meta, "id", "epoch")
            pipe.execute()
        wall, used = time.monotonic() - t0, redis_cpu(client) - cpu0
        usec = float(client.info("commandstats").get("cmdstat_hmget", {}).get("usec_per_call", 0))
        client.close()
    record = {
        "scenario": "readers-check", "channels": channels, "rounds": rounds, "hmget_usec_per_call": usec,
        "redis_cpu_per_hmget_us": round(used / (channels * rounds) * 1e6, 2), "seconds": round(wall, 2),
    }  # fmt: skip
    print(f"  position check: {record['redis_cpu_per_hmget_us']} us of Redis CPU per channel checked "
          f"({usec} us in HMGET itself)", flush=True)  # fmt: skip
    return [record]


def main(argv: list[str]) -> int:
    """`python -m bench.readers publish|modes|check|bus [--quick]`: parts alone, JSON records on stdout."""
    ctx = Context(quick="--quick" in argv, log_dir=Path(tempfile.mkdtemp(prefix="sidecar-bench-readers-")))
    seconds = ctx.seconds(10, 4)
    parts = [a for a in argv if not a.startswith("--")] or ["publish", "modes"]
    records = []
    if "publish" in parts:
        records += publish_cost(ctx, 8000.0, seconds)
    if "modes" in parts:
        records += modes(ctx, seconds)
    if "check" in parts:
        records += check_cost(ctx)
    if "bus" in parts:
        records += bus_cost(ctx, 4000.0, seconds)
    for record in records:
        print(json.dumps(record), flush=True)
    return 0


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
    live = [*publish_cost(ctx, 8000.0, seconds), *modes(ctx, seconds), *check_cost(ctx)]
    return [*records, model, *live, *bus_cost(ctx, 4000.0, seconds)]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
