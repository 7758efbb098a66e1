"""Every setting of the sidecar, read from the environment in one place.

Nothing else in the package reads ``os.environ``: processes build a :class:`Settings` with
:meth:`Settings.from_env` and pass it down.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields

ENV_PREFIX = "SIDECAR_"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


@dataclass(frozen=True)
class Settings:
    redis_url: str | None = None  # None: start the embedded redis-server (dev and demo only)
    host: str = "127.0.0.1"
    port: int = 8000
    dev: bool = False  # dev mode: may run without auth secrets, says so loudly
    data_dir: str = ".sidecar"  # embedded redis-server's data dir (AOF on)
    workers: int = 1  # gunicorn worker processes (sidecar/gunicorn.conf.py), each a gevent worker with its own relay
    worker_connections: int = 10_000  # connections per gunicorn gevent worker (gunicorn's own default, 1000, is few)
    log_level: str = "INFO"  # the least severe line logged: DEBUG, INFO, WARNING or ERROR (any case)

    # Redis layout
    key_prefix: str = "rt"
    shards: int = 16
    shard_tags: str = "balanced"  # shards' hash tags: spread evenly over a cluster's slots; "bare": {0}..{n-1}
    live_len: int = 10_000  # entries kept in each shard's live stream
    history_len: int = 1_000  # entries kept in each channel's history stream
    history_ttl: int = 86_400  # seconds a channel's history survives without a publish
    state_ttl: int = 7 * 86_400  # seconds a channel's snapshot/seq/epoch survive without a publish
    compact_after: int = 64  # pending merge patches before the snapshot is folded
    redis_socket_timeout: float = 10.0  # for plain commands; blocking reads add their block time
    redis_pool: int = 100  # Redis connections per process; past that, requests wait for one (<= the timeout)

    # Reader
    read_block_ms: int = 1_000
    read_count: int = 1_000
    read_linger_ms: float = 0.0  # after a read that brought entries, wait this long before the next; 0: read at once
    reader_stall: float = 5.0  # seconds a shard's stream may move on while its reader reads none of it
    live_read: str = "shards"  # "shards": read every shard's live stream; "channels": pub/sub of wanted channels

    # Connections
    keepalive: float = 15.0  # seconds between SSE comments / WebSocket pings on an idle socket
    header_timeout: float = 10.0  # seconds a new connection has to send its first request's line and headers
    body_timeout: float = 30.0  # seconds a request's body has to arrive whole, from the end of its headers
    idle_timeout: float = 75.0  # seconds a kept-alive HTTP connection may take to send its next request whole
    close_timeout: float = 2.0  # seconds a WebSocket the server closed waits for the client's close frame
    ws_deflate: bool = False  # accept permessage-deflate (RFC 7692) offers; see docs/performance.md
    sse_retry_ms: int = 2_000  # base of the SSE retry: hint (jittered)
    queue_frames: int = 1_000  # per-connection queue bound (frames)
    queue_bytes: int = 1_048_576  # per-connection queue bound (bytes)
    max_channels: int = 100  # channels per connection
    max_frame_bytes: int = 65_536  # largest client->server WebSocket frame
    max_publish_bytes: int = 262_144  # largest published message body
    max_state_bytes: int = 1_048_576  # largest state a channel may hold in Redis (base + pending patches)
    subscribe_rate: float = 20.0  # subscribes per second per connection, sustained ...
    subscribe_burst: int = 100  # ... after a burst of this many (a page subscribing to all it shows at once)

    # Celery workers (docs/celery.md): what a notification may cost a task when Redis hangs
    task_publish_timeout: float = 0.25  # seconds: the hooks' Redis socket timeout (connect, send, reply)
    task_publish_cooldown: float = 5.0  # seconds the hooks stop publishing after a failure, before one trial
    publish_wait_replicas: int = 0  # the hooks' outcome events wait for this many replicas (Redis WAIT); 0: never
    publish_wait_timeout_ms: int = 100  # the longest a WAIT blocks (a publish with wait=N; the hooks' outcomes)

    # Auth (docs/security.md). Secrets are kept out of repr() so that logging settings cannot leak them.
    jwt_secret: str | None = dataclasses.field(default=None, repr=False)  # HS256 shared secret, >= 32 bytes
    jwt_public_key: str | None = None  # PEM text or a PEM file's path: RS256/ES256 tokens
    jwt_algorithms: str = ""  # comma-separated; empty: HS256 with a secret, RS256 and ES256 with a public key
    jwt_audience: str | None = None  # when set, tokens must carry this `aud`
    jwt_issuer: str | None = None  # when set, tokens must carry this `iss`
    jwt_channels_claim: str = "channels"  # the claim listing channel patterns (`user:{sub}`, `sprint:*`)
    jwt_leeway: float = 5.0  # seconds of clock skew tolerated on `exp`
    publisher_key: str | None = dataclasses.field(default=None, repr=False)  # POST /publish; comma: several
    admin_key: str | None = dataclasses.field(default=None, repr=False)  # /admin/*; comma: several
    admin_keys: str | None = dataclasses.field(default=None, repr=False)  # named: "ops-anna:<key>,ops-bo:<key>"
    metrics_key: str | None = dataclasses.field(default=None, repr=False)  # GET /metrics (or the admin key)
    allowed_origins: str = ""  # WebSocket Origin allowlist (comma); empty: same origin only (dev: any)
    cors_origins: str = ""  # CORS for /sse and the state endpoint (comma, or *); empty: none (dev: *)
    auth_timeout: float = 10.0  # seconds a WebSocket without a token may take to send {"op": "auth"}
    max_unauthenticated: int = 100  # WebSockets waiting for that frame, per replica (apart from max_connections)

    # Herd control (docs/operations.md): the policy's defaults until ops PUT /admin/throttle. Off or gentle.
    coalesce_window: float = 0.0  # seconds: at most one frame per channel per window per connection; 0: off
    poke_rate: float = 0.0  # pulls/s a change's pokes are spread to (per channel, per replica); 0: off
    poke_floor: float = 0.0  # seconds: the least a change's pokes are spread over (with poke_rate on)
    admit_rate: float = 0.0  # new connections and resumes per second per replica; 0: unlimited
    admit_burst: int = 0  # admitted at once before admit_rate applies; 0: one second's worth
    max_connections: int = 0  # connections per replica; 0: unlimited
    stuck_timeout: float = 30.0  # seconds a connection may sit in one socket write before it is closed
    throttle: str = ""  # a whole policy document (JSON, as PUT /admin/throttle takes) over the values above
    policy_poll: float = 0.5  # seconds between a replica's checks for a policy change in Redis

    # Stats
    stats_interval: float = 1.0
    stats_len: int = 3_600  # records kept in the stats stream
    stats_patterns: str = ""  # channel patterns (comma) to count by, besides the throttle policy's; the rest: *
    stats_channel_names: bool = False  # count unmatched channels by name: exposes them in /metrics and the stream

    # Dashboard (docs/dashboard.md)
    url: str | None = None  # a sidecar (or the proxy) whose admin API the throttle controls call; None: host:port
    dashboard_window: float = 600.0  # seconds the dashboard shows at first (60-3600)

    def __post_init__(self) -> None:
        level = self.log_level.upper()
        if level not in LOG_LEVELS:
            allowed = ", ".join(LOG_LEVELS)
            raise ValueError(f"{ENV_PREFIX}LOG_LEVEL: {self.log_level!r} is not one of {allowed} (any case)")
        object.__setattr__(self, "log_level", level)  # frozen: the one normalisation, so every user sees DEBUG

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ, **overrides: object) -> Settings:
        """Settings from ``SIDECAR_<NAME>`` variables (and ``REDIS_URL``), then ``overrides``."""
        values: dict[str, object] = {}
        if environ.get("REDIS_URL"):
            values["redis_url"] = environ["REDIS_URL"]
        for field in fields(cls):
            raw = environ.get(ENV_PREFIX + field.name.upper())
            if raw is None or raw == "":
                continue
            values[field.name] = _parse(field.type, raw, field.name)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)  # type: ignore[arg-type]

    def replace(self, **changes: object) -> Settings:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


def _parse(kind: object, raw: str, name: str) -> object:
    kind = str(kind)
    try:
        if kind == "bool":
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
    except ValueError:
        raise ValueError(f"{ENV_PREFIX}{name.upper()}: cannot read {raw!r} as {kind}") from None
    return raw
