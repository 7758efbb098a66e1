"""Herd control around the pure throttle: its timers, its live policy, admission, stuck sockets, its counters.

- Timers: the hub tells us when the throttle next has something due; one runtime timer flushes it then.
- Policy: the settings give the defaults; ops' document (PUT /admin/throttle) is kept in Redis and every replica
  polls it every `policy_poll` seconds, so a change reaches all of them within a second. The poll is a
  background loop (its read blocks); what it found is applied on the hub's thread (sidecar/runtime.py).
- Admission: `admit()` before a connection is made; the refused get a jittered retry hint (`busy()`). A WebSocket
  without a token counts only once its auth frame brings one; until then it holds a place of the small
  `max_unauthenticated` budget (`admit_unauthenticated()`), so a flood of them cannot lock out real clients.
- Stuck sockets: a connection sitting in one socket write past `stuck_timeout` is aborted; its peer reconnects
  and resumes from its cursor.
- Counters: what the hub and throttle counted goes to `stats.count` once a second.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection
from typing import Any

import orjson
import redis

from sidecar.config import Settings
from sidecar.core.session import busy as busy  # moved to the core; importers of it here keep working
from sidecar.core.throttle import Policy, PolicyError
from sidecar.runtime import Cancellable
from sidecar.state_cache import StateCache

log = logging.getLogger(__name__)

HOUSEKEEPING = 1.0  # seconds between stuck checks and counter hand-overs


def policy_from_settings(settings: Settings) -> Policy:
    """The policy a replica runs until ops set one: the SIDECAR_* values, then SIDECAR_THROTTLE over them."""
    s = settings
    doc = {
        "channels": {"*": {"window": s.coalesce_window, "poke_rate": s.poke_rate, "poke_floor": s.poke_floor}},
        "admit_rate": s.admit_rate, "admit_burst": s.admit_burst, "max_connections": s.max_connections,
        "queue_frames": s.queue_frames, "queue_bytes": s.queue_bytes, "stuck_timeout": s.stuck_timeout,
    }  # fmt: skip
    try:
        policy = Policy.from_json(doc)
        if s.throttle:
            policy = Policy.from_json(orjson.loads(s.throttle), policy)
    except (PolicyError, orjson.JSONDecodeError) as exc:
        raise ValueError(f"SIDECAR_* throttle settings: {exc}") from None
    return policy


class Control:
    def __init__(self, relay: Any) -> None:
        self.relay = relay
        self.settings: Settings = relay.settings
        self.store = relay.store
        self.hub = relay.hub
        self.throttle = relay.throttle
        self.runtime = relay.runtime
        self.stats = relay.stats
        self.defaults = self.throttle.policy
        self.source = "settings"  # or "redis": ops set the policy in force
        self.version = 0
        self.updated = 0.0  # epoch seconds of the policy's last change by ops
        self.stuck_closed = 0
        self.unauthenticated: set[int] = set()  # WebSockets let in without a token, until their auth frame
        self.pulls = StateCache(self.store, self.hub, wait=self.settings.redis_socket_timeout)
        self._seen: tuple[int, bytes | None] = (0, None)
        self._bad_seen: tuple[int, bytes | None] | None = None
        self._failing = False
        self._armed: Cancellable | None = None
        self._running = False
        self.hub.on_timer = self._arm

    def start(self) -> None:
        self.poll_policy()
        self._running = True
        self.runtime.spawn(self._poll_loop, "sidecar-policy")
        self.runtime.every(HOUSEKEEPING, self.housekeep)

    def stop(self) -> None:
        self._running = False

    def _poll_loop(self) -> None:
        while self._running:
            self.runtime.sleep(self.settings.policy_poll)
            if self._running:
                self.poll_policy()

    # -- the throttle's timer -------------------------------------------------------------------------------
    def _arm(self, due: float) -> None:
        armed = self._armed
        if armed is not None and not armed.cancelled and armed.when <= due:
            return
        if armed is not None:
            armed.cancel()
        self._armed = self.runtime.call_at(due, self._flush)

    def _flush(self) -> None:
        self._armed = None
        self.hub.flush()  # re-arms through on_timer if more is held

    # -- policy ---------------------------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        return {
            "policy": self.throttle.policy.to_json(),
            "source": self.source,
            "version": self.version,
            "updated": self.updated or None,
            "replica": getattr(self.stats, "replica", None),
        }

    def put_policy(self, doc: object | None) -> Policy:
        """Validate (PolicyError), store in Redis for every replica, and apply here. None: back to the settings."""
        return self.applied(*self.store_policy(doc))

    def store_policy(self, doc: object | None) -> tuple[Policy, bytes | None, int, float]:
        """put_policy's Redis part (no hub state: any thread): validate and store; give what `applied` takes."""
        policy = self.defaults if doc is None else Policy.from_json(doc, self.defaults)
        stored = None if doc is None else orjson.dumps(policy.to_json())  # whole: replicas' settings may differ
        at = time.time()
        return policy, stored, self.store.write_policy(stored, at), at

    def applied(self, policy: Policy, stored: bytes | None, version: int, at: float) -> Policy:
        """put_policy's hub part, on the hub's thread."""
        self._seen = (version, stored)
        self._apply(policy, "settings" if stored is None else "redis", version, at)
        return policy

    def poll_policy(self) -> None:
        """Read the policy in Redis (blocking), then apply it on the hub's thread if it changed."""
        try:
            version, doc, at = self.store.read_policy()
        except redis.RedisError as exc:
            if not self._failing:
                log.warning("throttle: cannot read the policy (%s); keeping the current one", type(exc).__name__)
            self._failing = True
            return
        self._failing = False
        self.runtime.call(lambda: self._consider(version, doc, at))

    def _consider(self, version: int, doc: bytes | None, at: float) -> None:
        if (version, doc) == self._seen or (version, doc) == self._bad_seen:
            return
        if doc is None:
            policy, source = self.defaults, "settings"
        else:
            try:
                policy, source = Policy.from_json(orjson.loads(doc), self.defaults), "redis"
            except (PolicyError, orjson.JSONDecodeError) as exc:
                self._bad_seen = (version, doc)
                log.warning("throttle: policy version %d in Redis is not valid (%s); keeping the current one", version,
                            exc)  # fmt: skip
                return
        self._seen = (version, doc)
        self._apply(policy, source, version, at)

    def _apply(self, policy: Policy, source: str, version: int, at: float) -> None:
        if policy != self.throttle.policy:
            log.info("throttle: applying policy version %d from %s", version, source)
        self.throttle.set_policy(policy)
        self.hub.set_budget(policy.queue_frames, policy.queue_bytes)
        self.source, self.version, self.updated = source, version, at

    # -- admission ------------------------------------------------------------------------------------------
    def admit(self, channels: Collection[str] = ()) -> float | None:
        """None: open the connection. Otherwise refuse it with :func:`busy` of the returned seconds."""
        return self.throttle.admit(len(self.hub.connections) - len(self.unauthenticated), channels)

    def admit_unauthenticated(self) -> float | None:
        """Like :meth:`admit`, for a WebSocket that has no token yet: add its id to ``unauthenticated`` once
        connected, and call :meth:`authorised` when a token comes."""
        return self.throttle.admit_unauthenticated(len(self.unauthenticated), self.settings.max_unauthenticated)

    def authorised(self, conn_id: int) -> float | None:
        """A socket's auth frame brought a valid token: :meth:`admit` it now (None) or refuse it. Its place among
        the unauthenticated is freed either way. None too for a socket that was authorised already."""
        if conn_id not in self.unauthenticated:
            return None
        retry = self.admit()  # still in `unauthenticated`, so not counted against itself
        self.unauthenticated.discard(conn_id)
        return retry

    # -- the pull endpoint ----------------------------------------------------------------------------------
    def pull(self, channel: str) -> tuple[str, bytes] | None:
        """(ETag, JSON) of the channel's state, or None if nothing was published on it; see StateCache."""
        self.stats.count("pulled", channel)
        return self.pulls.get(channel)

    # -- once a second --------------------------------------------------------------------------------------
    def housekeep(self) -> None:
        now = time.monotonic()
        for conn in self.hub.stuck(now, self.throttle.policy.stuck_timeout):
            abort, conn.abort = conn.abort, None
            if abort is not None:
                self.stuck_closed += 1
                log.info("closing connection %d: stuck in a socket write for %.0f s (its peer stopped reading)",
                         conn.id, now - (conn.writing_since or now))  # fmt: skip
                abort()
        for (name, channel), n in self.hub.take_counts().items():
            self.stats.count(name, channel, n)
        self.stats.gauge("pokes_pending", self.throttle.pokes_pending())
        self.stats.gauge("poke_spread", self.throttle.spread_seconds)
