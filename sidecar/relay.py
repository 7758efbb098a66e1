"""The relay of one sidecar process: the store, the hub, the reader, and the subscribe handshake between them.

The hub is single-threaded on both fronts (sidecar/runtime.py): on gevent every greenlet runs on one OS thread
and hub calls never yield; on asyncio the reader's loops are OS threads that hand their messages to the event
loop with `runtime.call_soon`. A connection's handshakes with Redis (subscribe, resync) are generators of hub
steps that yield the Redis reads they need: the gevent front runs each read where it is (it yields to other
greenlets), the asyncio front awaits it in the runtime's pool (:func:`drive` and :func:`drive_async`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Generator
from functools import partial

import orjson
import redis

from sidecar.config import Settings
from sidecar.control import Control, policy_from_settings
from sidecar.core.connection import Connection, Subscription
from sidecar.core.hub import Hub, Sync
from sidecar.core.protocol import Message, Position, shard_of
from sidecar.core.throttle import Throttle
from sidecar.live_pubsub import ChannelReader
from sidecar.reader import Reader
from sidecar.runtime import AsyncioRuntime, GeventRuntime, Runtime
from sidecar.stats import Stats
from sidecar.store import Store, connect

log = logging.getLogger(__name__)

RESYNC_ATTEMPTS = 4  # reads of a resync's snapshot before its error reaches the connection (0.2 + 0.4 + 0.6 s)

Steps = Generator[Callable[[], Sync], Sync, None]  # hub steps, yielding the Redis reads between them


def drive(steps: Steps) -> None:
    """Run `steps` here, each read where it stands (gevent: a read yields to the other greenlets)."""
    try:
        read = steps.send(None)  # type: ignore[arg-type]
        while True:
            try:
                sync = read()
            except BaseException as exc:
                read = steps.throw(exc)
            else:
                read = steps.send(sync)
    except StopIteration:
        return


async def drive_async(steps: Steps, runtime: AsyncioRuntime) -> None:
    """Run `steps` on the event loop, each read awaited in the runtime's pool (the hub steps stay on the loop)."""
    try:
        read = steps.send(None)  # type: ignore[arg-type]
        while True:
            try:
                sync = await runtime.read(read)
            except BaseException as exc:
                read = steps.throw(exc)
            else:
                read = steps.send(sync)
    except StopIteration:
        return


class Relay:
    def __init__(self, settings: Settings, store: Store | None = None, runtime: Runtime | None = None) -> None:
        if not settings.redis_url:
            raise ValueError("the relay needs a Redis URL")
        self.settings = settings
        self.runtime: Runtime = runtime or GeventRuntime()
        self.front = self.runtime.front  # "gevent" | "asyncio" (stats records and /metrics' sidecar_info)
        self.store = store or Store(connect(settings.redis_url, settings), settings)
        self.throttle = Throttle(policy_from_settings(settings), time.monotonic)
        self.hub = Hub(self.throttle)
        soon = self.runtime.call_soon  # the reader's loops hand the hub their messages on the hub's thread
        dispatch, failed = partial(soon, self.hub.dispatch), partial(soon, self.hub.failed)
        self.reader: Reader | ChannelReader
        if settings.live_read == "channels":  # only the channels this replica's clients want (docs/scaling.md)
            resync = partial(soon, self.resync_channel)
            self.reader = ChannelReader(self.store, settings, dispatch, resync, failed, spawn=self.runtime.spawn)
            self.hub.on_channel = self.reader.on_channel  # called on the hub's thread; it only queues
        elif settings.live_read == "shards":
            resync = partial(soon, self.resync_shard)
            self.reader = Reader(self.store, settings, dispatch, resync, failed, spawn=self.runtime.spawn)
        else:
            raise ValueError(f"SIDECAR_LIVE_READ must be shards or channels, not {settings.live_read!r}")
        self.hub.on_error = self._dispatch_failed
        self._causes: set[tuple[str, str, int]] = set()  # dispatch errors logged already: (type, file, line)
        self.stats = Stats(self)
        self.control = Control(self)

    def start(self) -> Relay:
        self.runtime.start()
        self.reader.start()
        self.stats.start()
        self.control.start()
        return self

    def stop(self) -> None:
        self.reader.stop()
        self.stats.stop()
        self.control.stop()
        self.runtime.stop()

    def healthy(self) -> bool:
        if not self.reader.alive or not self.reader.healthy:
            return False
        if self.reader.cluster:
            # No PING: redis-py sends it to every node, and a paused one would hold /healthz for the socket timeout.
            # The reader's watchdog reads every master each second (1 s timeouts): a lost shard makes it unhealthy.
            return True
        try:
            return bool(self.store.redis.ping())
        except Exception:
            return False

    def health(self, ok: bool) -> tuple[int, bytes]:
        """/healthz's (status, JSON body) for `ok` (healthy()'s answer, which may block: the front calls it its
        own way), built once for both fronts. Per shard: lag_ms is head id time - position id time, idle_s the
        seconds since its loop's last reply; "reason" (the channels reader's pub/sub connection, the stream
        reader's stuck shards) only while not ok."""
        lags = self.reader.lags()
        shards = [{"shard": g.shard, "lag_ms": g.lag_ms, "idle_s": g.idle, "stuck": g.stuck} for g in lags]
        body = {
            "ok": ok,
            "reader": self.reader.alive and self.reader.healthy,
            "stuck": [s["shard"] for s in shards if s["stuck"]],
            "connections": len(self.hub.connections),
            "shards": shards,
        }
        if not ok and self.reader.reason:
            body["reason"] = self.reader.reason
        return (200 if ok else 503), orjson.dumps(body)

    def connection(self, transport: str, wake: object) -> Connection:
        p = self.throttle.policy  # the queue bounds are live: ops may change them
        return self.hub.connect(Connection(transport, wake, p.queue_frames, p.queue_bytes))  # type: ignore[arg-type]

    def subscribe(self, conn: Connection, channels: list[str], mode: str, since: dict[str, Position]) -> None:
        drive(self.subscribing(conn, channels, mode, since))

    def subscribing(self, conn: Connection, channels: list[str], mode: str, since: dict[str, Position]) -> Steps:
        """Register every channel, then read and start each (see the hub's docstring). Registering all first
        keeps the connection's cursor whole from the first frame. Redis errors propagate after unregistering."""
        subs = [self.hub.subscribe(conn, channel, mode, since.get(channel)) for channel in channels]
        try:
            for sub in subs:
                sync = yield partial(self.read, sub.channel, since.get(sub.channel))
                self.hub.start(sub, sync)
        except Exception:
            for sub in subs:
                self.hub.unsubscribe(conn, sub.channel)
            raise

    def resync(self, conn: Connection) -> None:
        drive(self.resyncing(conn))

    def resyncing(self, conn: Connection) -> Steps:
        """Bring the channels whose backlog was dropped (or that saw a hole) back: snapshot or reset."""
        for channel in list(conn.resync):
            sub: Subscription | None = conn.subs.get(channel)
            if sub is None:
                conn.resync.discard(channel)
                continue
            self.hub.hold(sub)  # register first, then read: what arrives during the read is kept
            try:
                sync = yield partial(self._read_retrying, channel)
            except BaseException:
                conn.resync.add(channel)  # still owed (hold() took the request)
                raise
            sync.resumed = sync.gap = sync.resync = True
            self.hub.start(sub, sync)

    def _read_retrying(self, channel: str) -> Sync:
        """A resync's read, tried again after a lost connection: a resync often follows a failover, and on a
        cluster the first command to a lost master is the one that makes redis-py refresh its slot map."""
        for attempt in range(RESYNC_ATTEMPTS):
            try:
                return self.read(channel, None)
            except (redis.ConnectionError, redis.TimeoutError):
                if attempt == RESYNC_ATTEMPTS - 1:
                    raise
                time.sleep(0.2 * (attempt + 1))
        raise AssertionError("unreachable")

    def _dispatch_failed(self, msg: Message | None, exc: Exception) -> None:
        """Log a message the hub skipped, once per cause (a bad message may come by the thousand); the hub
        counts every one (sidecar_dispatch_errors_total)."""
        tb = exc.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        where = (tb.tb_frame.f_code.co_filename, tb.tb_lineno) if tb is not None else ("?", 0)
        cause = (type(exc).__name__, *where)
        if cause in self._causes or len(self._causes) >= 100:
            return
        self._causes.add(cause)
        what = "a stream entry that is not a message"
        if msg is not None:
            what = f"a message of {msg.channel} that could not be dispatched (its subscribers get a snapshot or reset)"
        log.error(
            "skipped %s: %s: %s (at %s:%d); errors of this kind are only counted from now on "
            "(sidecar_dispatch_errors_total)", what, type(exc).__name__, str(exc)[:200], *where,
        )  # fmt: skip

    def resync_shard(self, shard: int) -> None:
        """The reader found that messages of `shard` were lost before it read them: snapshot/reset every local
        subscriber of the shard's channels, whether or not they publish again."""
        for channel in [c for c in self.hub.channels if shard_of(c, self.settings.shards) == shard]:
            # Forget the channel's last message: after a lost tail (a lossy failover) the next one follows on
            # from what Redis kept, with a lower seq, and must not count as one more hole (a second resync).
            self.hub.channels[channel].epoch = ""
            self.hub.resync(channel)

    def resync_channel(self, channel: str) -> None:
        """The same as resync_shard() for one channel (the channels-mode reader's checks found it lost)."""
        record = self.hub.channels.get(channel)
        if record is not None:
            record.epoch = ""
            self.hub.resync(channel)

    def read(self, channel: str, since: Position | None) -> Sync:
        if since is None:
            snap = self.store.snapshot(channel)
            if snap is None:
                return Sync(Position(), 0)
            return Sync(snap.position, snap.seq, snap.state_json())
        caught = self.store.catch_up(channel, since)
        snap = caught.snapshot
        return Sync(
            snap.position, snap.seq, snap.state_json(), caught.messages, resumed=True, gap=caught.gap, since=since
        )
