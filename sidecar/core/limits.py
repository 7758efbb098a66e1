"""Per-connection rate limits. Pure: the caller passes the time.

Example::

    bucket = TokenBucket(rate=20, burst=100, now=clock())
    wait = bucket.take(clock())     # 0.0: go ahead; otherwise seconds until a token is there
"""

from __future__ import annotations


class TokenBucket:
    """`burst` tokens to start with, refilled at `rate` per second up to `burst`; one action takes one."""

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = float(burst)
        self.at = now

    def take(self, now: float) -> float:
        """Take a token if there is one and return 0.0; else take nothing and return the seconds to wait."""
        if now > self.at:
            self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
            self.at = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate if self.rate > 0 else float("inf")
