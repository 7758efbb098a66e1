"""One thread (a greenlet under gevent) that runs every timer of the relay from one heap.

Coalescing flushes, spread pokes, the policy poll and the stuck-connection check all run here: no greenlet per
message or per timer. Callbacks run one at a time; they must be short and must not block for long (a Redis
round trip is fine).

Example::

    scheduler = Scheduler().start()
    scheduler.every(0.5, poll_policy)
    timer = scheduler.at(time.monotonic() + 0.1, hub.flush)
    timer.cancel()
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

IDLE_WAIT = 1.0  # seconds the loop sleeps with nothing due (a wake() cuts it short)


class Timer:
    __slots__ = ("when", "fn", "interval", "cancelled")

    def __init__(self, when: float, fn: Callable[[], None], interval: float | None) -> None:
        self.when = when
        self.fn = fn
        self.interval = interval
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True  # dropped from the heap when it comes up


class Scheduler:
    def __init__(self, clock: Callable[[], float] = time.monotonic, name: str = "sidecar-scheduler") -> None:
        self.clock = clock
        self.name = name
        self._heap: list[tuple[float, int, Timer]] = []
        self._n = itertools.count()
        self._lock = threading.Lock()
        self._wakeup = threading.Event()
        self._running = False
        self._thread: threading.Thread | None = None

    def at(self, when: float, fn: Callable[[], None]) -> Timer:
        """Run `fn` once at `when` (on this scheduler's clock)."""
        return self._push(Timer(when, fn, None))

    def every(self, interval: float, fn: Callable[[], None]) -> Timer:
        """Run `fn` every `interval` seconds, the first time one interval from now."""
        return self._push(Timer(self.clock() + interval, fn, interval))

    def _push(self, timer: Timer) -> Timer:
        with self._lock:
            earliest = not self._heap or timer.when < self._heap[0][0]
            heapq.heappush(self._heap, (timer.when, next(self._n), timer))
        if earliest:
            self._wakeup.set()
        return timer

    def start(self) -> Scheduler:
        if self._thread is None:
            self._running = True
            self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._running = False
        self._wakeup.set()
        self._thread = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        while self._running:
            now = self.clock()
            due: list[Timer] = []
            with self._lock:
                while self._heap and self._heap[0][0] <= now:
                    timer = heapq.heappop(self._heap)[2]
                    if not timer.cancelled:
                        due.append(timer)
            for timer in due:
                try:
                    timer.fn()
                except Exception:  # one bad callback must not stop every timer
                    log.exception("timer %r failed", timer.fn)
                if timer.interval is not None and not timer.cancelled:
                    # Keep the period, but never queue up missed runs after a stall.
                    timer.when = max(timer.when + timer.interval, self.clock())
                    self._push(timer)
            with self._lock:
                wait = self._heap[0][0] - self.clock() if self._heap else IDLE_WAIT
            if wait > 0:
                self._wakeup.wait(min(wait, IDLE_WAIT))
            self._wakeup.clear()
