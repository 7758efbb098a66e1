"""Counters and latency histograms of one sidecar process, and its per-second stats record.

(Stub: the dashboard work fills in the record writer; the relay already calls these methods.)
"""

from __future__ import annotations

import bisect
import time
from typing import Any

from sidecar.core.hub import Connection

# Upper bounds (ms) of the latency buckets: publish call -> frame written to the socket.
LATENCY_BOUNDS_MS = (0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, float("inf"))


class Histogram:
    def __init__(self, bounds: tuple[float, ...] = LATENCY_BOUNDS_MS) -> None:
        self.bounds = bounds
        self.counts = [0] * len(bounds)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1


class Stats:
    def __init__(self, relay: Any) -> None:
        self.relay = relay
        self.latency = Histogram()

    def observe_write(self, conn: Connection) -> None:
        if conn.batch_ts:
            self.latency.observe(time.time() * 1000 - conn.batch_ts)

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass
