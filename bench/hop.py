"""`python -m bench.hop`: what the asyncio front pays for reading Redis through a thread pool (sidecar/runtime.py)
instead of redis.asyncio, in one run on one embedded redis-server: a GET direct (the gevent front's cost, less
its greenlet switch), awaited in AsyncioRuntime's pool, and with redis.asyncio, one at a time and 100 at once;
and the relay's own snapshot read direct vs in the pool. Microseconds per read, the median of 5 rounds.
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import redis
import redis.asyncio as aredis

from sidecar.config import Settings
from sidecar.embedded import EmbeddedRedis
from sidecar.publish import Publisher
from sidecar.runtime import AsyncioRuntime
from sidecar.store import Store, connect

N = 3000  # reads per round
ROUNDS = 5
POOL = 8  # threads, and connections for redis.asyncio


def per_read(seconds: float) -> float:
    return seconds / N * 1e6


def timed(fn: Callable[[], None]) -> float:
    t = time.perf_counter()
    fn()
    return per_read(time.perf_counter() - t)


def timed_async(make: Callable[[AsyncioRuntime], Awaitable[None]]) -> float:
    async def main() -> float:
        runtime = AsyncioRuntime(asyncio.get_running_loop(), POOL)
        t = time.perf_counter()
        await make(runtime)
        out = per_read(time.perf_counter() - t)
        runtime.stop()
        return out

    return asyncio.run(main())


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        server = EmbeddedRedis(Path(tmp) / "redis").start()
        try:
            settings = Settings(redis_url=server.url)
            store = Store(connect(server.url, settings), settings)
            Publisher(store).state("hop:1", "x", {"n": 1})
            client = redis.Redis.from_url(server.url)
            client.set("k", "v")

            async def pool_one(rt: AsyncioRuntime) -> None:
                for _ in range(N):
                    await rt.read(client.get, "k")

            async def pool_many(rt: AsyncioRuntime) -> None:
                for _ in range(N // 100):
                    await asyncio.gather(*[rt.read(client.get, "k") for _ in range(100)])

            async def native(rt: AsyncioRuntime, many: bool) -> None:
                pool = aredis.BlockingConnectionPool.from_url(server.url, max_connections=POOL)
                a = aredis.Redis(connection_pool=pool)
                await a.get("k")
                for _ in range(N // 100 if many else N):
                    if many:
                        await asyncio.gather(*[a.get("k") for _ in range(100)])
                    else:
                        await a.get("k")
                await a.aclose()

            async def snapshot_pool(rt: AsyncioRuntime) -> None:
                for _ in range(N):
                    await rt.read(store.snapshot, "hop:1")

            cases: dict[str, Callable[[], float]] = {
                "GET direct": lambda: timed(lambda: [client.get("k") for _ in range(N)] and None),
                "GET in the pool": lambda: timed_async(pool_one),
                "GET redis.asyncio": lambda: timed_async(lambda rt: native(rt, False)),
                "GET in the pool, 100 at once": lambda: timed_async(pool_many),
                "GET redis.asyncio, 100 at once": lambda: timed_async(lambda rt: native(rt, True)),
                "snapshot direct": lambda: timed(lambda: [store.snapshot("hop:1") for _ in range(N)] and None),
                "snapshot in the pool": lambda: timed_async(snapshot_pool),
            }
            results: dict[str, list[float]] = {name: [] for name in cases}
            for _ in range(ROUNDS):
                for name, case in cases.items():
                    results[name].append(case())
            for name, values in results.items():
                print(f"{name:32s} {statistics.median(values):7.1f} us per read")
        finally:
            server.stop()


if __name__ == "__main__":
    main()
