"""The channels-mode live reader (SIDECAR_LIVE_READ=channels): a replica receives only the channels its clients
want, over Redis pub/sub, instead of reading every shard's live stream (docs/scaling.md says when to use it).

The publish script PUBLISHes every live entry to the channel's pub/sub channel (store.py, `<prefix>:{t}:c:C`).
This reader keeps one pub/sub connection (on a cluster classic pub/sub is cluster-wide, so any node will do),
SUBSCRIBEs a channel when it gets its first local subscriber and UNSUBSCRIBEs after its last (the hub's
on_channel hook calls want()/unwant(), which only queue; the loop sends them, batched). Messages go through the
same decode and hub dispatch as the stream reader's, so the hub's per-subscription seq checks still catch holes.

Pub/sub is at-most-once, so three checks make sure no hole is silent:
- on every (re)subscribe, once Redis confirmed it, each channel catches up through its history from the last
  message this reader delivered (a channel with none: its newest entries; the hub drops what a client has);
- a position check every `reader_stall` seconds reads each wanted channel's head (its meta hash, pipelined per
  node) and compares it with the last message delivered: ahead -> catch up from history (nothing there: resync);
  behind or another epoch -> Redis lost what was delivered (a lossy failover): resync the channel;
- a liveness probe: a connection that received nothing for `reader_stall / 2` seconds publishes to its own
  service channel, and one that does not hear it within as long again is reconnected. /healthz is not ready
  while the connection is down, with the reason in its body.
The subscribe handshake stays race-free: the hub registers first (its hook queues the SUBSCRIBE), then the relay
reads the snapshot, and the catch-up after the confirmation covers whatever was published between the two.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from typing import Any, cast

import redis
from redis.cluster import RedisCluster
from redis.exceptions import RedisClusterException

from sidecar.config import Settings
from sidecar.core.protocol import Message, StreamKey, stream_key
from sidecar.core.slots import key_slot
from sidecar.reader import WATCH_TIMEOUT, Lag
from sidecar.runtime import Spawn, spawn_thread
from sidecar.store import Store, connect, decode_entries, decode_published

log = logging.getLogger(__name__)

POLL = 0.05  # seconds the loop waits for a message before it sends queued (un)subscribes
BATCH = 512  # channels per SUBSCRIBE / UNSUBSCRIBE, and confirmations caught up at once
TAIL = 16  # newest entries dispatched to a channel with no delivered position (the hub drops what it has)
ERRORS = (redis.ConnectionError, redis.TimeoutError, redis.ResponseError, RedisClusterException)

Last = tuple[StreamKey, str, str]  # (stream key, id, epoch) of the last message delivered of a channel


class ChannelReader:
    """``on_messages`` gets live messages (each channel in publish order); ``resync_channel`` a channel whose
    subscribers need a snapshot/reset (Redis lost what they got); ``on_error`` each payload that is not a live
    entry, or an error ``on_messages`` let through. The same public face as the stream reader (relay, stats)."""

    def __init__(
        self,
        store: Store,
        settings: Settings,
        on_messages: Callable[[list[Message]], None],
        resync_channel: Callable[[str], None],
        on_error: Callable[[Message | None, Exception], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        spawn: Spawn = spawn_thread,
    ) -> None:
        self.store = store
        self.settings = settings
        self.spawn = spawn  # the runtime's (sidecar/runtime.py): its loops block in redis-py
        self.on_messages = on_messages
        self.resync_channel = resync_channel
        self.on_error = on_error
        self.clock = clock
        url = settings.redis_url or ""
        self.redis = connect(url, settings.replace(redis_socket_timeout=max(WATCH_TIMEOUT, 2.0)))
        self.cluster = isinstance(self.redis, RedisCluster)
        self.service = f"{settings.key_prefix}:svc:{uuid.uuid4().hex}"  # this reader's own probe channel
        self.queue: deque[tuple[str, bool]] = deque()  # want()/unwant() from any thread; the loop applies them
        self.wanted: set[str] = set()
        self.names: dict[bytes, str] = {}  # pub/sub channel name -> channel, for the wanted ones
        self.subscribed: set[str] = set()  # SUBSCRIBE sent on the current connection
        self.dirty = False  # wanted and subscribed may differ (a want queued, or a new connection)
        self.confirmed: list[str] = []  # subscriptions Redis confirmed, waiting for their catch-up
        self.live: set[str] = set()  # confirmed and caught up on the current connection: the periodic check's
        self.last: dict[str, Last] = {}
        self.pubsub: redis.client.PubSub | None = None
        self.prober: redis.Redis | None = None
        self.node = 0  # which cluster node the next connection goes to (rotates on failure)
        self.up = False  # the service channel's subscription is confirmed
        self.down_since: float | None = None
        self.down_reason = "not connected yet"
        self.heard_at = clock()
        self.probe_at: float | None = None  # when the pending probe was published
        self.kicked_at = -1e9  # when the checker last shut a deaf connection's socket down
        self.running = False
        self.thread: threading.Thread | None = None
        self.checker: threading.Thread | None = None
        # The stream reader's counters, for stats and /metrics (no shard positions in this mode).
        self.last_ids: dict[str, str] = {}
        self.messages_read = 0
        self.read_by_channel: dict[str, int] = {}
        self.reconnects = 0
        self.kicks = 0  # connections the liveness probe found deaf
        self.lost_tails = 0  # channels whose head was behind what was delivered (Redis lost it)
        self.caught_up = 0  # messages delivered from history by the checks (pub/sub lost or raced them)

    # -- the hub's hook (any thread: only queues) -----------------------------------------------------------
    def want(self, channel: str) -> None:
        self.queue.append((channel, True))

    def unwant(self, channel: str) -> None:
        self.queue.append((channel, False))

    def on_channel(self, channel: str, wanted: bool) -> None:
        self.queue.append((channel, wanted))

    # -- lifecycle and health -------------------------------------------------------------------------------
    def start(self) -> None:
        self.running = True
        self.down_since = self.clock()
        self.thread = self.spawn(self._run, "sidecar-live-pubsub")
        self.checker = self.spawn(self._check_loop, "sidecar-live-check")

    def stop(self) -> None:
        self.running = False

    @property
    def alive(self) -> bool:
        threads = [self.thread, self.checker]
        return self.running and all(t is not None and t.is_alive() for t in threads)

    @property
    def healthy(self) -> bool:
        return self.up

    @property
    def reason(self) -> str:
        """Why /healthz is not ready ("" when it is)."""
        if self.up:
            return ""
        since = round(self.clock() - self.down_since, 1) if self.down_since is not None else 0
        return f"live pub/sub connection down for {since} s: {self.down_reason}"

    def lags(self) -> list[Lag]:
        return []  # no shard is read in this mode

    # -- the pub/sub loop -----------------------------------------------------------------------------------
    def _run(self) -> None:
        backoff = 0.05
        while self.running:
            try:
                if self.pubsub is None:
                    self._open()
                self._apply_wants()
                msg = self.pubsub.get_message(timeout=POLL) if self.pubsub is not None else None
                now = self.clock()
                batch: list[Message] = []
                held: list[Message] = []  # of channels just confirmed: after their catch-up, so in order
                while msg is not None and len(batch) + len(held) < 1000 and len(self.confirmed) < BATCH:
                    self.heard_at, self.probe_at = now, None
                    self._handle(msg, batch, held)
                    msg = self.pubsub.get_message(timeout=0) if self.pubsub is not None else None
                if batch:
                    self._deliver(batch)
                if self.confirmed:
                    confirmed, self.confirmed = self.confirmed, []
                    self.check(confirmed)
                    self.live.update(confirmed)
                if held:
                    self._deliver(held)
                self._probe(now)
                backoff = 0.05
            except ERRORS as exc:
                self._close(f"{type(exc).__name__}: {str(exc)[:200]}")
                self.reconnects += 1
                time.sleep(backoff)
                backoff = min(backoff * 2, 1.0)
                self._refresh()
            except Exception:  # a bug must not stop live delivery: reconnect and catch up
                log.exception("live pub/sub loop failed")
                self._close("internal error")
                time.sleep(backoff)

    def _open(self) -> None:
        client = self._client(self.settings.redis_socket_timeout)
        self.prober = self._client(WATCH_TIMEOUT)  # the probe goes to the node the subscriptions are on
        pubsub = client.pubsub()
        self.pubsub = pubsub
        pubsub.subscribe(self.service)
        self.subscribed, self.live = set(), set()
        self.confirmed = []
        self.heard_at, self.probe_at = self.clock(), None

    def _client(self, timeout: float) -> redis.Redis:
        """A client with one connection of its own to a node (on a cluster: the next one, any will do)."""
        if self.cluster:
            cluster = cast(RedisCluster, self.redis)
            nodes = sorted(cluster.get_nodes(), key=lambda n: n.name)
            node = nodes[self.node % len(nodes)]
            pool = cluster.get_redis_connection(node).connection_pool
            kwargs = dict(pool.connection_kwargs)
            kwargs["host"], kwargs["port"] = node.host, node.port
        else:
            pool = cast(redis.Redis, self.redis).connection_pool
            kwargs = dict(pool.connection_kwargs)
        kwargs["socket_timeout"] = timeout
        kwargs["health_check_interval"] = 0  # the liveness probe stands for it
        own = redis.ConnectionPool(connection_class=pool.connection_class, max_connections=1, **kwargs)
        return redis.Redis(connection_pool=own)

    def _close(self, reason: str) -> None:
        pubsub, self.pubsub = self.pubsub, None
        if self.up or self.down_since is None:
            self.down_since = self.clock()
        if self.up:
            log.warning("live pub/sub connection lost (%s); reconnecting, then catching up every channel", reason)
        self.up, self.down_reason = False, reason
        self.node += 1
        prober, self.prober = self.prober, None
        if pubsub is not None:
            with contextlib.suppress(Exception):
                pubsub.reset()
                pubsub.connection_pool.disconnect()
        if prober is not None:
            with contextlib.suppress(Exception):
                prober.close()
                prober.connection_pool.disconnect()

    def _refresh(self) -> None:
        if self.cluster:
            with contextlib.suppress(Exception):
                cast(RedisCluster, self.redis).nodes_manager.initialize()

    def _apply_wants(self) -> None:
        if not self.queue and not self.dirty:
            return
        while self.queue:
            channel, on = self.queue.popleft()
            if on:
                self.wanted.add(channel)
                self.names[self.store.live_channel(channel).encode()] = channel
            else:
                self.wanted.discard(channel)
                self.last.pop(channel, None)
                if channel not in self.subscribed:
                    self.names.pop(self.store.live_channel(channel).encode(), None)
        self.dirty = True
        if self.pubsub is None or not self.up:
            return  # the service channel first: then every wanted channel at once
        self.dirty = False
        add = [c for c in self.wanted if c not in self.subscribed]
        drop = [c for c in self.subscribed if c not in self.wanted]
        for i in range(0, len(add), BATCH):
            self.pubsub.subscribe(*[self.store.live_channel(c) for c in add[i : i + BATCH]])
        for i in range(0, len(drop), BATCH):
            names = [self.store.live_channel(c) for c in drop[i : i + BATCH]]
            self.pubsub.unsubscribe(*names)
            for name in names:
                self.names.pop(name.encode(), None)
        self.subscribed.update(add)
        self.subscribed.difference_update(drop)
        self.live.difference_update(drop)

    def _handle(self, msg: dict[str, Any], batch: list[Message], held: list[Message]) -> None:
        kind, name = msg["type"], msg["channel"]
        if name == self.service.encode():
            if kind == "subscribe" and not self.up:
                self.up, self.down_since, self.dirty = True, None, True
                log.info("live pub/sub connected; subscribing %d channels", len(self.wanted))
            return  # a probe's echo: heard, which is all it is for
        channel = self.names.get(name)
        if kind == "subscribe" and channel is not None:
            self.confirmed.append(channel)
        elif kind == "message":
            try:
                message = decode_published(msg["data"])[1]
            except Exception as exc:  # not written by our publish script: skip it
                self._failed(exc)
                return
            (held if channel is not None and channel in self.confirmed else batch).append(message)

    def _probe(self, now: float) -> None:
        """Publish to the service channel after `reader_stall / 2` s of silence; reconnect if not heard back."""
        if self.pubsub is None:
            return
        interval = max(self.settings.reader_stall / 2, 0.2)
        if self.probe_at is not None:
            if now - self.probe_at >= interval:
                self.kicks += 1
                raise redis.ConnectionError(f"the liveness probe was not heard back; silent for "
                                            f"{round(now - self.heard_at, 1)} s")  # fmt: skip
            return
        if now - self.heard_at >= interval and self.prober is not None:
            self.probe_at = now
            try:
                self.prober.publish(self.service, b"probe")
            except ERRORS as exc:  # that node does not answer: reconnect elsewhere
                self.kicks += 1
                raise redis.ConnectionError(f"the liveness probe could not be sent ({exc})") from exc

    # -- delivery and catch-up ------------------------------------------------------------------------------
    def _deliver(self, messages: list[Message]) -> None:
        last = self.last
        counts = self.read_by_channel
        for msg in messages:
            counts[msg.channel] = counts.get(msg.channel, 0) + 1
            if msg.channel in self.wanted:
                known = last.get(msg.channel)
                if known is None or known[2] != msg.epoch or msg.key > known[0]:
                    last[msg.channel] = (msg.key, msg.id, msg.epoch)
        self.messages_read += len(messages)
        try:
            self.on_messages(messages)
        except Exception as exc:  # a bug in dispatch must not stop the relay
            self._failed(exc)

    def _check_loop(self) -> None:
        interval = max(self.settings.reader_stall, 0.2)
        due = self.clock() + interval
        while self.running:
            time.sleep(min(interval / 4, 0.25))
            self._deadline(self.clock())
            if self.clock() < due:
                continue
            due = self.clock() + interval
            if not self.up:
                continue  # the reconnect catches every channel up
            try:
                wanted, live = list(self.wanted), set(self.live)  # copies: the pub/sub loop changes them
                self.check([c for c in wanted if c in live])
            except Exception:  # a bug here must not stop the checks
                log.exception("live position check failed")

    def _deadline(self, now: float) -> None:
        """The probe's deadline, kept here too: a loop blocked in a read on a deaf socket never gets to it.
        Shutting the socket down ends that read, and the loop reconnects."""
        interval = max(self.settings.reader_stall / 2, 0.2)
        pubsub = self.pubsub
        if pubsub is None or now - self.heard_at < 3 * interval or now - self.kicked_at < 3 * interval:
            return
        log.warning("live pub/sub connection silent for %g s, the liveness probe not heard back; reconnecting",
                    round(now - self.heard_at, 1))  # fmt: skip
        self.kicks += 1
        self.kicked_at = now
        sock = getattr(pubsub.connection, "_sock", None)  # redis-py keeps it private; shutdown() wakes a recv
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def check(self, channels: list[str]) -> None:
        """The position check: each channel's head in Redis against the last message delivered of it."""
        if not channels:
            return
        # Positions before the heads are read: a message delivered meanwhile is not "behind the head", and a head
        # behind a position delivered before it was read can only be Redis having lost it.
        delivered = {channel: self.last.get(channel) for channel in channels}
        heads = self._run_per_node(channels, lambda pipe, c: pipe.hmget(self.store.keys(c).meta, "id", "epoch"))
        if log.isEnabledFor(logging.DEBUG):  # "unread": its node did not answer
            log.debug("live check (channel: head id, delivered id): %s",
                      {c: (heads[c][0] if c in heads else "unread", d[1] if (d := delivered[c]) else None)
                       for c in channels})  # fmt: skip
        behind: list[tuple[str, str | None]] = []  # (channel, the id to read history after; None: the tail)
        for channel in channels:
            if channel not in heads or channel not in self.wanted:
                continue  # its node did not answer: the next round
            head_id, epoch = heads[channel]
            known = delivered[channel]
            if head_id is None or epoch is None:
                if known is not None:  # the channel is gone from Redis (lost data, or expired)
                    self._lost(channel, None)
                continue
            head = (stream_key(head_id.decode()), head_id.decode(), epoch.decode())
            if known is None:
                behind.append((channel, None))
            elif known[2] != head[2] or head[0] < known[0]:
                self._lost(channel, head)
            elif head[0] > known[0]:
                behind.append((channel, known[1]))
        if behind:
            self._catch_up(behind)

    def _catch_up(self, behind: list[tuple[str, str | None]]) -> None:
        def read(pipe: Any, channel: str) -> None:
            key = self.store.keys(channel).history
            after = dict(behind)[channel]
            if after is None:
                pipe.xrevrange(key, count=TAIL)
            else:
                pipe.xrange(key, min=f"({after}", count=self.settings.history_len)

        found = self._run_per_node([c for c, _ in behind], read)
        messages: list[Message] = []
        for channel, after in behind:
            if channel not in found:
                continue
            entries = decode_entries(found[channel])
            if after is None:
                entries.reverse()
            elif not entries:  # the head is past what was delivered, and history has none of it
                self._lost(channel, None)
                continue
            messages.extend(entries)
        if messages:
            self.caught_up += len(messages)
            self._deliver(messages)

    def _lost(self, channel: str, head: Last | None) -> None:
        log.warning("%s: Redis no longer has what this replica delivered (a lossy failover, or lost data); "
                    "resynchronising its subscribers", channel)  # fmt: skip
        self.lost_tails += 1
        if head is None:
            self.last.pop(channel, None)
        else:
            self.last[channel] = head
        self.resync_channel(channel)

    def _run_per_node(self, channels: list[str], add: Callable[[Any, str], None]) -> dict[str, Any]:
        """One pipeline per node for `add(pipe, channel)`; the replies by channel (none for a node that failed)."""
        if not self.cluster:
            groups = [(cast(redis.Redis, self.redis), channels)]
        else:
            cluster = cast(RedisCluster, self.redis)
            by_node: dict[str, tuple[redis.Redis, list[str]]] = {}
            for channel in channels:
                try:
                    node = cluster.nodes_manager.get_node_from_slot(key_slot(self.store.keys(channel).meta))
                except RedisClusterException:
                    continue
                by_node.setdefault(node.name, (cluster.get_redis_connection(node), []))[1].append(channel)
            groups = list(by_node.values())
        found: dict[str, Any] = {}
        failed = False
        for client, group in groups:
            pipe = client.pipeline(transaction=False)
            for channel in group:
                add(pipe, channel)
            try:
                replies = pipe.execute(raise_on_error=False)
            except redis.RedisError as exc:
                log.debug("live check: a node did not answer (%s)", exc)
                failed = True
                continue
            for channel, reply in zip(group, replies, strict=True):
                if isinstance(reply, Exception):
                    failed = True  # MOVED: the slot map is stale
                else:
                    found[channel] = reply
        if failed:
            self._refresh()
        return found

    def _failed(self, exc: Exception) -> None:
        if self.on_error is not None:
            self.on_error(None, exc)
        else:
            log.error("skipped a live message: %s: %s", type(exc).__name__, exc)
