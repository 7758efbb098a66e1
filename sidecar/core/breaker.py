"""A circuit breaker for a dependency that may hang: after a failure, stop calling it for a while. Pure: the
caller passes the time (and holds a lock if several threads share one breaker).

Example::

    breaker = Breaker(cooldown=5.0)
    if breaker.allow(clock()):
        try:
            call_redis()
        except OSError:
            breaker.failed(clock())
        else:
            breaker.succeeded()
    else:
        drop_it()                   # near zero cost while Redis is known to be away

States: closed (every call goes ahead) -> open after one failure (no call for ``cooldown`` seconds) ->
half-open (ONE trial call; others are still refused) -> closed if the trial succeeds, open again if it fails.
One failure is enough to open: the dependency's own deadline already decided that it is away, and each further
try would cost a caller that deadline again.
"""

from __future__ import annotations

CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half-open"


class Breaker:
    def __init__(self, cooldown: float) -> None:
        self.cooldown = cooldown
        self.state = CLOSED
        self.opened_at = 0.0
        self.refused = 0  # calls refused since the breaker was last closed

    def allow(self, now: float) -> bool:
        """May a call go ahead now? In half-open state only the first caller gets True (the trial)."""
        if self.state == CLOSED:
            return True
        if self.state == OPEN and now >= self.opened_at + self.cooldown:
            self.state = HALF_OPEN
            return True
        self.refused += 1
        return False

    def failed(self, now: float) -> None:
        """The call failed the way a dependency that is away fails (refused, timed out): open (again)."""
        self.state = OPEN
        self.opened_at = now

    def succeeded(self) -> int:
        """The call went through: close. Returns how many calls were refused since it opened."""
        refused, self.refused = self.refused, 0
        self.state = CLOSED
        return refused

    def retry_in(self, now: float) -> float:
        """Seconds until the next trial is allowed (0.0 when closed or due)."""
        return max(0.0, self.opened_at + self.cooldown - now) if self.state == OPEN else 0.0
