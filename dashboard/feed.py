"""Reading the stats stream from Redis, and the dashboard's settings. The aggregation is in ``sources``.

Example::

    config = DashboardConfig.from_env()
    feed = StatsFeed(redis_client(config), config.stats_key)
    feed.poll(time.time())          # then feed.window has the records of the last minutes
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sidecar.config import Settings
from sidecar.control import policy_from_settings
from sidecar.core.throttle import Policy
from sidecar.embedded import recorded_url
from sidecar.store import connect

from .policy import PolicyChange, PolicyView, read_changes, read_policy
from .sources import Record, Window, parse_record

META_EVERY = 2.0  # seconds between reads of the policy and its change log (shared by every session)


def read_records(client: Any, key: str, after: str | None = None, since: float | None = None) -> list[Record]:
    """Records of the stream ``key`` after stream id ``after`` (exclusive), or from unix time ``since``."""
    if after is not None:
        start = f"({after}"
    elif since is not None:
        start = f"{max(int(since * 1000), 0)}-0"
    else:
        start = "-"
    records: list[Record] = []
    while True:
        entries = client.xrange(key, min=start, count=5000)
        for stream_id, fields in entries:
            record = parse_record(stream_id, fields)
            if record is not None:
                records.append(record)
        if len(entries) < 5000:
            return records
        last = entries[-1][0]
        start = "(" + (last.decode() if isinstance(last, bytes) else last)


class StatsFeed:
    """A :class:`Window` kept up to date from the stats stream: :meth:`poll` reads what is new.

    Redis errors are kept in ``error`` (and the window keeps what it had), never raised.
    """

    def __init__(
        self,
        client: Any,
        key: str,
        span: float = 900.0,
        stale_after: float = 5.0,
        throttle_key: str | None = None,
        log_key: str | None = None,
    ) -> None:
        self.client = client
        self.key = key
        self.throttle_key, self.log_key = throttle_key, log_key
        self.policy = PolicyView()  # the policy ops set (read every META_EVERY s)
        self.changes: list[PolicyChange] = []  # the last changes, newest first
        self.meta_error: str | None = None
        self.meta_at = -META_EVERY
        self.window = Window(span, stale_after)
        self.last_id: str | None = None
        self.error: str | None = None
        self.attempted_at = 0.0
        self.retry_at = 0.0  # after an error, wait a little: every session polls through this feed

    def poll(self, now: float) -> int:
        """Read the new records into the window; returns how many were new."""
        if now < self.retry_at:
            return 0
        self.attempted_at = now
        try:
            if self.last_id is None:
                records = read_records(self.client, self.key, since=now - self.window.span - 60)
            else:
                records = read_records(self.client, self.key, after=self.last_id)
        except Exception as exc:  # Redis down: show it, keep the window
            self.error = f"{type(exc).__name__}: {exc}"
            self.retry_at = now + 2.0
            return 0
        self.error = None
        if records:
            self.last_id = records[-1].id
        return self.window.add(records)

    def poll_meta(self, now: float, force: bool = False) -> None:
        """Read the throttle policy and its change log, at most every META_EVERY s (``force``: now)."""
        if not force and now - self.meta_at < META_EVERY:
            return
        self.meta_at = now
        try:
            if self.throttle_key:
                self.policy = read_policy(self.client, self.throttle_key)
            if self.log_key:
                self.changes = read_changes(self.client, self.log_key)
        except Exception as exc:  # Redis down: the status line says so already
            self.meta_error = type(exc).__name__
            return
        self.meta_error = None


# -- configuration ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DashboardConfig:
    """What the dashboard needs: the sidecar's settings (``REDIS_URL``, else the URL a running ``sidecar demo``
    recorded in ``SIDECAR_DATA_DIR``, ``SIDECAR_KEY_PREFIX``,
    ``SIDECAR_STATS_INTERVAL``, ``SIDECAR_ADMIN_KEY``: enables the throttle controls, and the throttle settings
    ``SIDECAR_COALESCE_WINDOW``... for the policy in force while ops set none), and its own two,
    ``SIDECAR_URL`` (a sidecar, for the admin API) and ``SIDECAR_DASHBOARD_WINDOW`` (seconds shown): all read by
    ``Settings``."""

    redis_url: str
    stats_key: str
    throttle_key: str
    log_key: str = "rt:policy:log"  # the policy change log (PUT/DELETE /admin/throttle append to it)
    interval: float = 1.0
    window: float = 600.0
    sidecar_url: str = "http://127.0.0.1:8000"
    admin_key: str | None = None
    defaults: Policy = Policy()  # the settings' policy: what replicas run while ops set none

    @property
    def stale_after(self) -> float:
        return max(5.0, 3 * self.interval)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> DashboardConfig:
        settings = Settings.from_env(environ)
        return cls(
            redis_url=settings.redis_url or recorded_url(settings.data_dir) or "redis://127.0.0.1:6379/0",
            stats_key=f"{settings.key_prefix}:stats",
            throttle_key=f"{settings.key_prefix}:throttle",
            log_key=f"{settings.key_prefix}:policy:log",
            interval=settings.stats_interval,
            window=min(max(settings.dashboard_window, 60.0), 3600.0),
            sidecar_url=(settings.url or f"http://{settings.host}:{settings.port}").rstrip("/"),
            admin_key=_admin_key(settings),
            defaults=policy_from_settings(settings),
        )


def _admin_key(settings: Settings) -> str | None:
    """The key the controls use: SIDECAR_ADMIN_KEY's first, else the first named key of SIDECAR_ADMIN_KEYS
    (``name:key``; the change log then names that key's owner)."""
    key = (settings.admin_key or "").split(",")[0].strip()
    if not key and settings.admin_keys:
        key = settings.admin_keys.split(",")[0].partition(":")[2].strip()
    return key or None


def redis_client(config: DashboardConfig, timeout: float = 5.0) -> Any:
    """A client of the sidecar's Redis, one node or a cluster, made as the sidecar makes its own."""
    return connect(config.redis_url, Settings(redis_url=config.redis_url, redis_socket_timeout=timeout, redis_pool=4))


def recent_records(config: DashboardConfig, seconds: float = 600.0) -> list[Record]:
    """The records of the last ``seconds``, straight from Redis (for notebooks and scripts)."""
    client = redis_client(config, timeout=5.0)
    try:
        return read_records(client, config.stats_key, since=time.time() - seconds)
    finally:
        client.close()
