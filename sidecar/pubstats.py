"""The publisher's stats record: how long publishes wait for Redis, from every process that publishes.

A :class:`~sidecar.publish.Publisher` (Celery workers, `POST /publish`) counts its publishes and the time from
each message's making (``Publisher.item``, the timestamp it carries) to Redis acknowledging it. A background
thread (a greenlet under gevent) XADDs what it counted to the relays' stats stream, at most once per
``PUB_INTERVAL`` and only after something was published; it ends after ``IDLE_STOP`` seconds without a publish
and the next publish starts it again. docs/dashboard.md documents the record::

    {"v": 2, "kind": "pub", "replica": "worker-3:977", "host": "worker-3", "pid": 977,
     "ts": 1732761000.002, "dt": 1.0, "n": 42, "ack": [0, 3, 30, 9, 0, ...]}

Nothing here can block or fail a publish: the publish path only adds to counters under a lock the writer holds
for a swap, never during its Redis call. A record Redis refuses is dropped (its counts with it) and counted in
``dropped``; its write has the publisher's own socket timeout (the Celery hooks' deadline), on the thread.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import orjson

from sidecar.stats import RECORD_FIELD, RECORD_VERSION, Histogram
from sidecar.store import redis_address

log = logging.getLogger(__name__)

PUB_INTERVAL = 1.0  # seconds: at most one record per process per interval
IDLE_STOP = 30.0  # seconds without a publish before the writer thread ends


class PublishStats:
    """The publish counts of one Publisher, and the thread that writes them (see the module docstring)."""

    def __init__(self, store: Any, clock: Callable[[], float] = time.time, interval: float = PUB_INTERVAL) -> None:
        self.store = store
        self.clock = clock
        self.interval = interval
        self.host = socket.gethostname()
        self.written = 0  # records written
        self.dropped = 0  # records Redis refused (their counts are dropped with them)
        self._closed = threading.Event()
        self._forked()

    def _forked(self) -> None:
        # A forked child (Celery prefork) starts afresh: no thread of the parent's runs here, and the parent's
        # writer may have held the lock at fork time.
        self.pid = os.getpid()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._ack = Histogram()
        self._n = 0
        self._since = self.clock()  # where the next record's dt starts
        self._last = 0.0  # monotonic time of the last publish
        self._failing = False

    def observe(self, sent_ms: Iterable[float]) -> None:
        """Messages (their ``Publisher.item`` timestamps, ms) Redis acknowledged just now."""
        if self._closed.is_set():
            return
        if self.pid != os.getpid():
            self._forked()
        now = self.clock() * 1000
        thread = None
        with self._lock:
            for ts in sent_ms:
                self._ack.observe(now - ts)
                self._n += 1
            self._last = time.monotonic()
            if self._thread is None and self._n:
                thread = self._thread = threading.Thread(target=self._run, name="sidecar-pubstats", daemon=True)
        if thread is not None:
            try:
                thread.start()
            except RuntimeError:  # no thread to be had: no records, but the publish stands
                self._thread = None

    def close(self) -> None:
        """No more records (the Publisher is closed: its Redis connections are gone)."""
        self._closed.set()

    def _run(self) -> None:
        while not self._closed.wait(self.interval):
            if not self.write():
                with self._lock:
                    if self._n == 0 and time.monotonic() - self._last >= IDLE_STOP:
                        self._thread = None  # the next publish starts another
                        return
        with self._lock:
            self._thread = None

    def take(self) -> dict[str, Any] | None:
        """The record of what was counted since the last one (and start counting afresh); None if nothing was."""
        with self._lock:
            if self._n == 0:
                return None
            n, ack, since, now = self._n, self._ack, self._since, round(self.clock(), 3)
            self._n, self._ack, self._since = 0, Histogram(), now
        return {"v": RECORD_VERSION, "kind": "pub", "replica": f"{self.host}:{self.pid}", "host": self.host,
                "pid": self.pid, "ts": now, "dt": round(max(now - since, 0.001), 3), "n": n,
                "ack": ack.counts}  # fmt: skip

    def write(self) -> bool:
        """Write the record of what was counted; False if there was nothing, or Redis refused it (dropped)."""
        record = self.take()
        if record is None:
            return False
        store = self.store
        try:
            store.redis.xadd(store.stats_key, {RECORD_FIELD: orjson.dumps(record)}, maxlen=store.settings.stats_len,
                             approximate=True)  # fmt: skip
        except Exception as exc:  # Redis away: the record is dropped, never retried into a publish's way
            self.dropped += 1
            if not self._failing:
                log.warning("publisher stats: cannot write a record to %s (%s); dropping them until it answers",
                            redis_address(store.redis), type(exc).__name__)  # fmt: skip
            self._failing = True
            return False
        self._failing = False
        self.written += 1
        return True
