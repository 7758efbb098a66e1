"""The relay's one seam to its concurrency model: background loops, calls onto the hub's thread, timers.

The hub (sidecar/core/hub.py) is single-threaded on every front: no lock, no hub call from another thread.
What differs is where that thread's work comes from.

- :class:`GeventRuntime` (the Flask front, today's behaviour): the process is monkey-patched, so a background
  loop is a greenlet and every greenlet runs on the one OS thread; hub calls never yield, so `call_soon` is a
  direct call, and timers run on the scheduler's greenlet (sidecar/scheduler.py).
- :class:`AsyncioRuntime` (the ASGI front): background loops are real OS threads doing blocking redis-py calls
  (the reader's XREAD BLOCK, the stats XADD, the policy poll); whatever they hand the hub goes through
  `loop.call_soon_threadsafe`, and timers are `loop.call_at`. Redis reads a request needs run in a bounded
  pool (`read`), awaited by the route (docs/architecture.md, "Two fronts").

Example::

    runtime = GeventRuntime()                 # or AsyncioRuntime(asyncio.get_running_loop(), pool_size)
    runtime.spawn(reader_loop, "sidecar-reader")
    runtime.call_soon(hub.dispatch, messages)  # from the reader's loop: runs on the hub's thread
    timer = runtime.call_at(time.monotonic() + 0.1, hub.flush)
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from sidecar.scheduler import Scheduler

T = TypeVar("T")
Spawn = Callable[[Callable[[], None], str], threading.Thread]  # (loop, name): the loop started in the background


def spawn_thread(fn: Callable[[], None], name: str) -> threading.Thread:
    """A daemon thread running `fn` (a greenlet once gevent has patched threading)."""
    thread = threading.Thread(target=fn, name=name, daemon=True)
    thread.start()
    return thread


class Cancellable(Protocol):
    when: float
    cancelled: bool

    def cancel(self) -> None: ...


class Runtime(Protocol):
    front: str  # "gevent" | "asyncio": which front runs on it (the stats record's "front")

    def spawn(self, fn: Callable[[], None], name: str) -> threading.Thread: ...
    def call_soon(self, fn: Callable[..., Any], *args: Any) -> None: ...
    def call(self, fn: Callable[[], T]) -> T: ...
    def call_at(self, when: float, fn: Callable[[], None]) -> Cancellable: ...
    def every(self, interval: float, fn: Callable[[], None]) -> Cancellable: ...
    def sleep(self, seconds: float) -> None: ...
    def event(self) -> threading.Event: ...
    def start(self) -> None: ...
    def stop(self) -> None: ...


class _Threads:
    """What both runtimes share: background loops are threads (greenlets once gevent has patched threading)."""

    def spawn(self, fn: Callable[[], None], name: str) -> threading.Thread:
        return spawn_thread(fn, name)

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)

    def event(self) -> threading.Event:
        return threading.Event()


class GeventRuntime(_Threads):
    """One OS thread, greenlets: the hub is called directly, timers run on the scheduler's greenlet."""

    front = "gevent"

    def __init__(self) -> None:
        self.scheduler = Scheduler()  # every timer of the process (docs/operations.md)

    def call_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        fn(*args)  # the caller is a greenlet on the hub's thread, and hub calls never yield

    def call(self, fn: Callable[[], T]) -> T:
        return fn()

    def call_at(self, when: float, fn: Callable[[], None]) -> Cancellable:
        return self.scheduler.at(when, fn)

    def every(self, interval: float, fn: Callable[[], None]) -> Cancellable:
        return self.scheduler.every(interval, fn)

    def start(self) -> None:
        self.scheduler.start()

    def stop(self) -> None:
        self.scheduler.stop()


class LoopTimer:
    """A timer on the event loop; `cancel` is safe from the loop's thread (where timers are armed)."""

    __slots__ = ("when", "fn", "interval", "cancelled", "handle", "runtime")

    def __init__(self, runtime: AsyncioRuntime, when: float, fn: Callable[[], None], interval: float | None) -> None:
        self.runtime = runtime
        self.when = when
        self.fn = fn
        self.interval = interval
        self.cancelled = False
        self.handle: asyncio.TimerHandle | None = None

    def cancel(self) -> None:
        self.cancelled = True
        if self.handle is not None:
            self.handle.cancel()

    def _fire(self) -> None:
        self.handle = None
        if self.cancelled:
            return
        try:
            self.fn()
        except Exception:  # one bad callback must not stop every timer (the gevent scheduler's rule)
            self.runtime.log.exception("timer %r failed", self.fn)
        if self.interval is not None and not self.cancelled:
            self.when = max(self.when + self.interval, time.monotonic())  # never a burst of missed runs
            self.runtime._arm(self)


class AsyncioRuntime(_Threads):
    """Background loops in OS threads, the hub on the event loop's thread. `pool` bounds the threads that run
    Redis reads for requests (size it like the Redis connection pool: more threads would only wait for a
    connection)."""

    front = "asyncio"

    def __init__(self, loop: asyncio.AbstractEventLoop, pool: int = 8) -> None:
        self.log = logging.getLogger(__name__)
        self.loop = loop
        self.pool = concurrent.futures.ThreadPoolExecutor(max(1, pool), thread_name_prefix="sidecar-read")
        self.loop_thread = threading.get_ident()  # created on the loop's thread (the app's lifespan)
        self.running = True

    def on_loop(self) -> bool:
        return threading.get_ident() == self.loop_thread

    def call_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        if self.on_loop():
            self.loop.call_soon(fn, *args)
        elif self.running:
            with contextlib.suppress(RuntimeError):  # the loop closed under a loop that is about to stop
                self.loop.call_soon_threadsafe(fn, *args)

    def call(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the loop's thread and wait for its result (from a background loop; on the loop, direct)."""
        if self.on_loop():
            return fn()
        done: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            try:
                done.set_result(fn())
            except BaseException as exc:
                done.set_exception(exc)

        self.loop.call_soon_threadsafe(run)
        return done.result()

    def call_at(self, when: float, fn: Callable[[], None]) -> Cancellable:
        timer = LoopTimer(self, when, fn, None)
        self._arm(timer)
        return timer

    def every(self, interval: float, fn: Callable[[], None]) -> Cancellable:
        timer = LoopTimer(self, time.monotonic() + interval, fn, interval)
        self._arm(timer)
        return timer

    def _arm(self, timer: LoopTimer) -> None:
        if not self.on_loop():
            self.call_soon(self._arm, timer)
            return
        # The loop's clock is time.monotonic (asyncio's default): the relay's deadlines need no conversion.
        if not timer.cancelled and self.running:
            timer.handle = self.loop.call_at(self.loop.time() + (timer.when - time.monotonic()), timer._fire)

    async def read(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a blocking Redis read in the pool; the caller awaits it on the loop."""
        return await self.loop.run_in_executor(self.pool, fn, *args)

    def start(self) -> None:
        self.running = True

    def stop(self) -> None:
        self.running = False
        self.pool.shutdown(wait=False, cancel_futures=True)
