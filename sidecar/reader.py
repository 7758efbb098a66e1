"""The shard-stream reader: the loops that read every shard's live stream and feed the hub, and their watchdog.

It remembers the last id of each shard, so a Redis blip or restart loses nothing: the next XREAD resumes there.
A reader that falls so far behind that the live stream is trimmed past its position (MAXLEN `live_len`), or a
Redis that lost the stream's tail, would lose messages: each live entry carries its shard's publish counter
`n` (store.py), and a jump in it makes the reader resynchronise every local subscriber of that shard.

On one node, one loop reads every shard with one multi-stream XREAD. On Redis Cluster, XREAD of streams in
different slots fails with CROSSSLOT even when one node owns them all, so there is one loop per shard, each a
blocking XREAD of that shard's stream on its own connection to the master that owns the shard's slot. A loop
follows MOVED (to the node it names) and failover (a connection error refreshes the slot map) and resumes from
its shard's last id. The loops are threads, greenlets under gevent (the sidecar is monkey-patched): only one
runs at a time and hub calls never yield, so several loops may dispatch to the hub without a lock.

The watchdog (one more loop) reads each shard's head (its newest entry) every `WATCH_INTERVAL` seconds. A shard
whose head stays past the reader's position for `reader_stall` seconds, or whose loop keeps failing that long,
is stuck: the watchdog closes that loop's connection (a read blocked on a deaf socket then ends) and /healthz
says not ready until it reads again. A head *behind* the position means that Redis lost entries the reader
had read (a lossy failover: the promoted replica lacked them): the shard's subscribers are resynchronised and
the position moves back to the head, so no client is told that it resumed across the loss.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, cast

import redis
from redis.cluster import RedisCluster
from redis.exceptions import AskError, MovedError, RedisClusterException

from sidecar.config import Settings
from sidecar.core.protocol import Message, stream_key
from sidecar.core.slots import key_slot
from sidecar.runtime import Spawn, spawn_thread
from sidecar.store import Store, connect, decode_entry

log = logging.getLogger(__name__)

WATCH_INTERVAL = 1.0  # seconds between the watchdog's reads of the shards' heads
WATCH_TIMEOUT = 1.0  # socket timeout of those reads: a paused node must not hold up the other nodes' checks

Entries = list[tuple[bytes, dict[bytes, bytes]]]


@dataclass
class Loop:
    """One blocking reader: its shards' live keys and, while it reads, its own connection."""

    keys: list[str]
    client: redis.Redis | None = None
    address: tuple[str, int] | None = None  # where MOVED sent it; None: the slot map's master
    kicked: bool = False  # the watchdog closed its connection on purpose
    failing_since: float | None = None
    reconnects: int = 0  # connections dropped to be made again (errors, MOVED, the watchdog), ever
    thread: threading.Thread | None = field(default=None, repr=False)


@dataclass
class Lag:
    """How far one shard's reading is from its stream's head, as the watchdog last saw it."""

    shard: int
    lag_ms: int  # head id time - position id time (0 when caught up or unknown)
    idle: float  # seconds since the shard's loop last got a reply (entries or the block's end)
    stuck: bool


class Reader:
    """``on_messages`` gets each shard's new messages in stream order; ``on_gap`` a shard whose live stream
    lost messages before this reader read them (its channels need a snapshot/reset); ``on_error`` each entry
    that is not a message (not written by our publish script), or an error ``on_messages`` let through."""

    def __init__(
        self,
        store: Store,
        settings: Settings,
        on_messages: Callable[[list[Message]], None],
        on_gap: Callable[[int], None] | None = None,
        on_error: Callable[[Message | None, Exception], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        spawn: Spawn = spawn_thread,
    ) -> None:
        self.store = store
        self.settings = settings
        self.spawn = spawn  # the runtime's (sidecar/runtime.py): its loops block in redis-py
        self.on_messages = on_messages
        self.on_gap = on_gap
        self.on_error = on_error
        self.clock = clock
        # Blocking reads get a client of their own, with a socket timeout longer than the block.
        url = settings.redis_url or ""
        self.redis = connect(url, settings, block_ms=settings.read_block_ms)
        self.watch_redis = connect(url, settings.replace(redis_socket_timeout=WATCH_TIMEOUT))
        self.cluster = isinstance(self.watch_redis, RedisCluster)
        self.last_ids: dict[str, str] = {}
        self.counters: dict[str, int] = {}  # live key -> `n` of the last entry read (absent: not known)
        self.shards = {key: shard for shard, key in enumerate(store.live_keys())}
        self.heads: dict[str, str] = {}  # live key -> id of its newest entry, as the watchdog last read it
        self.replied_at: dict[str, float] = {}  # live key -> when its loop last got a reply
        self.behind: dict[str, tuple[str, float]] = {}  # live key -> (position, since when the head is past it)
        self.stuck: set[str] = set()
        self.kicked_at: dict[str, float] = {}  # live key -> when the watchdog last closed its loop's connection
        self.gaps = 0  # times a shard's stream lost messages before they were read
        self.lost_tails = 0  # times the watchdog found a head behind the position (Redis lost read entries)
        self.kicks = 0  # connections the watchdog closed because their shard was stuck
        self.running = False
        self.reconnects = 0
        self.messages_read = 0  # ever, every channel (every replica reads every shard: this is the publish rate)
        self.read_by_channel: dict[str, int] = {}  # the same per channel, read and reset by stats
        keys = store.live_keys()
        self.loops = [Loop([key]) for key in keys] if self.cluster else [Loop(keys)]
        self.loop_of = {key: loop for loop in self.loops for key in loop.keys}
        self.thread: threading.Thread | None = None  # the first loop (on one node, the only one)
        self.watchdog: threading.Thread | None = None

    def start(self) -> None:
        """Start from the current end of every shard, then read in the background."""
        self._load_positions()
        self.running = True
        now = self.clock()
        for key in self.shards:
            self.replied_at[key] = now
        for i, loop in enumerate(self.loops):
            loop.thread = self.spawn(partial(self._run, loop), f"sidecar-reader-{i}")
        self.thread = self.loops[0].thread
        self.watchdog = self.spawn(self._watch, "sidecar-reader-watchdog")

    def stop(self) -> None:
        self.running = False

    @property
    def alive(self) -> bool:
        threads = [loop.thread for loop in self.loops] + [self.watchdog]
        return self.running and all(t is not None and t.is_alive() for t in threads)

    @property
    def healthy(self) -> bool:
        """No shard is stuck (its loop fails, or its head stays past its position, for `reader_stall` s)."""
        return not self.stuck

    @property
    def reason(self) -> str:
        """Why /healthz is not ready ("" when the reader is fine)."""
        if not self.stuck:
            return ""
        return f"shards stuck: {', '.join(str(self.shards[key]) for key in sorted(self.stuck))}"

    def lags(self) -> list[Lag]:
        """Every shard's lag, for /healthz and /metrics."""
        now, found = self.clock(), []
        for key, shard in self.shards.items():
            head, position = self.heads.get(key), self.last_ids.get(key, "0-0")
            lag = max(_ms(head) - _ms(position), 0) if head is not None else 0
            idle = round(now - self.replied_at.get(key, now), 3)
            found.append(Lag(shard, lag, idle, key in self.stuck))
        return found

    def _load_positions(self) -> None:
        # Explicit ids, not "$": a message published between our start and our first XREAD is not missed.
        for key, newest in self._heads(list(self.shards), strict=True).items():
            self.last_ids[key] = newest[0] if newest else "0-0"
            n = newest[1] if newest else None
            if n is not None:
                self.counters[key] = n

    # -- the loops ------------------------------------------------------------------------------------------
    def _run(self, loop: Loop) -> None:
        backoff = 0.05
        while self.running:
            try:
                if loop.client is None:
                    loop.client = self._client(loop)
                streams: dict[Any, Any] = {key: self.last_ids[key] for key in loop.keys}
                replies = cast(
                    "list[tuple[bytes, Entries]] | None",
                    loop.client.xread(streams, count=self.settings.read_count, block=self.settings.read_block_ms),
                )  # bytes replies: connect() leaves decode_responses off
            except MovedError as exc:  # the slot moved (migration, failover): go where Redis says
                self._drop(loop)
                loop.address = (exc.host, int(exc.port))
                log.info("shard stream %s moved to %s:%s", loop.keys[0], exc.host, exc.port)
                continue
            except AskError:  # the slot is being migrated and the stream has gone: MOVED follows shortly
                time.sleep(0.05)
                continue
            except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError, RedisClusterException) as exc:
                # ResponseError: CLUSTERDOWN, TRYAGAIN, LOADING and the like; all pass.
                kicked, loop.kicked = loop.kicked, False
                self._drop(loop)
                loop.address = None
                if kicked:
                    continue  # the watchdog closed it: reconnect at once, the slot map is fresh
                if loop.failing_since is None:
                    loop.failing_since = self.clock()
                    log.warning("reader lost Redis (%s: %s); retrying from the last ids", type(exc).__name__,
                                str(exc)[:200])  # fmt: skip
                self.reconnects += 1
                time.sleep(backoff)
                backoff = min(backoff * 2, 1.0)
                self._refresh()
                continue
            backoff = 0.05
            loop.failing_since = None
            now = self.clock()
            for key in loop.keys:
                self.replied_at[key] = now
            read = 0
            for stream, entries in replies or ():
                if entries:
                    self._read(stream.decode(), entries)
                    read = max(read, len(entries))
            if read and read < self.settings.read_count and self.settings.read_linger_ms:
                # Let entries gather: a blocking read returns with the first one, so without a linger each replica
                # makes about one call per publish, and both Redis and the relay pay per call (docs/scaling.md).
                time.sleep(self.settings.read_linger_ms / 1000)

    def _client(self, loop: Loop) -> redis.Redis:
        """A client with one connection of its own (the watchdog may close it), to the node that has the loop's
        shards, with the connect() options of the URL and a socket timeout longer than the block."""
        if self.cluster:
            cluster = cast(RedisCluster, self.watch_redis)
            node = cluster.nodes_manager.get_node_from_slot(key_slot(loop.keys[0]))
            kwargs = dict(cluster.get_redis_connection(node).connection_pool.connection_kwargs)
            kwargs["host"], kwargs["port"] = loop.address or (node.host, node.port)
            connection_class: Any = cluster.get_redis_connection(node).connection_pool.connection_class
        else:
            pool = cast(redis.Redis, self.redis).connection_pool
            kwargs, connection_class = dict(pool.connection_kwargs), pool.connection_class
        kwargs["socket_timeout"] = self.settings.redis_socket_timeout + self.settings.read_block_ms / 1000
        own = redis.ConnectionPool(connection_class=connection_class, max_connections=1, **kwargs)
        return redis.Redis(connection_pool=own, single_connection_client=True)

    def _drop(self, loop: Loop) -> None:
        client, loop.client = loop.client, None
        if client is not None:
            loop.reconnects += 1
            with contextlib.suppress(Exception):
                client.close()
                client.connection_pool.disconnect()

    def _refresh(self) -> None:
        """Re-read the cluster's slot map (after a failover the replica that took over owns the slots)."""
        if not self.cluster:
            return
        try:
            cast(RedisCluster, self.watch_redis).nodes_manager.initialize()
        except Exception as exc:  # no node answers: the next error retries
            log.debug("slot map refresh failed: %s", exc)

    def _read(self, key: str, entries: Entries) -> None:
        self.last_ids[key] = entries[-1][0].decode()
        self._check_counter(key, entries)
        messages = []
        for entry in entries:
            try:
                messages.append(decode_entry(entry))
            except Exception as exc:  # not written by our publish script: skip it, not the batch
                self._failed(exc)
        self.messages_read += len(messages)
        counts = self.read_by_channel
        for msg in messages:
            counts[msg.channel] = counts.get(msg.channel, 0) + 1
        try:
            self.on_messages(messages)
        except Exception as exc:  # a bug in dispatch must not stop the relay
            self._failed(exc)

    def _check_counter(self, key: str, entries: Entries) -> None:
        """Resynchronise the shard if its publish counter did not go on from the last entry read. Entries
        without one (from an older publisher) are not counted, so they neither break the chain nor show gaps."""
        first = next((n for n in (_counter(f) for _, f in entries) if n is not None), None)
        if first is None:
            return
        last = self.counters.get(key)
        self.counters[key] = next(n for n in (_counter(f) for _, f in reversed(entries)) if n is not None)
        if last is None or first == last + 1:
            return
        self.gaps += 1
        lost = f"{first - last - 1} messages" if first > last else "a lost tail (the counter went back)"
        log.warning(
            "shard %d: the live stream lost %s before this reader read them (it fell behind SIDECAR_LIVE_LEN=%d, "
            "or Redis lost data); resynchronising the shard's subscribers", self.shards[key], lost,
            self.settings.live_len,
        )  # fmt: skip
        if self.on_gap is not None:
            self.on_gap(self.shards[key])

    def _failed(self, exc: Exception) -> None:
        if self.on_error is not None:
            self.on_error(None, exc)
        else:
            log.error("skipped a stream entry: %s: %s", type(exc).__name__, exc)

    # -- the watchdog ---------------------------------------------------------------------------------------
    def _watch(self) -> None:
        while self.running:
            time.sleep(WATCH_INTERVAL)
            try:
                self.check()
            except Exception:  # a bug here must not stop the watchdog
                log.exception("reader watchdog failed")

    def check(self) -> None:
        """One round of the watchdog (see the module's docstring)."""
        positions = dict(self.last_ids)  # before the heads are read: the loops may read on meanwhile
        heads = self._heads(list(self.shards))
        now, stall = self.clock(), self.settings.reader_stall
        if log.isEnabledFor(logging.DEBUG):  # "unread": left out by _heads (why: its debug lines above)
            log.debug("watchdog round (shard: head id, position): %s",
                      {shard: ((h[0] if (h := heads[key]) else "empty") if key in heads else "unread", positions[key])
                       for key, shard in self.shards.items()})  # fmt: skip
        for key, shard in self.shards.items():
            loop, position = self.loop_of[key], positions[key]
            failing = loop.failing_since is not None and now - loop.failing_since >= stall
            deaf = False
            if key in heads:
                newest = heads[key]
                head = self.heads[key] = newest[0] if newest else "0-0"
                if stream_key(head) < stream_key(position):
                    if self.last_ids[key] == position:  # else the loop read on, and its counter check saw it
                        self._lost_tail(key, position, newest)
                    else:
                        log.debug("watchdog: shard %d head %s behind %s, but its loop read on to %s", shard, head,
                                  position, self.last_ids[key])  # fmt: skip
                    continue
                if stream_key(head) == stream_key(position):
                    self.behind.pop(key, None)
                else:
                    since = self.behind.get(key)
                    if since is None or since[0] != position:
                        self.behind[key] = since = (position, now)
                    deaf = now - since[1] >= stall
            if deaf and not failing and now - self.kicked_at.get(key, -stall) >= stall:
                log.warning("shard %d: its stream moved on but the reader read nothing of it for %g s; "
                            "reconnecting", shard, stall)  # fmt: skip
                self.kicks += 1
                self._kick(key, loop, now)
            elif failing and key not in self.stuck:
                log.warning("shard %d: the reader has been failing for %g s", shard, stall)
            (self.stuck.add if deaf or failing else self.stuck.discard)(key)

    def _kick(self, key: str, loop: Loop, now: float) -> None:
        """Close a loop's connection: a read blocked on it ends at once and the loop reconnects."""
        self.kicked_at[key] = now  # the next one, if still needed, after another stall
        self._refresh()
        loop.address = None
        client = loop.client
        conn = client.connection if client is not None else None
        sock = getattr(conn, "_sock", None)  # redis-py keeps it private; shutdown() wakes a blocked recv
        if sock is not None:
            loop.kicked = True
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def _lost_tail(self, key: str, position: str, newest: tuple[str, int | None] | None) -> None:
        """Redis no longer has entries this reader read: resync the shard, go on from what Redis has."""
        shard = self.shards[key]
        head = newest[0] if newest else "0-0"
        log.warning("shard %d: Redis lost the stream's tail (newest entry %s, read up to %s: a lossy failover?); "
                    "resynchronising the shard's subscribers", shard, head, position)  # fmt: skip
        self.lost_tails += 1
        self.gaps += 1
        self.last_ids[key] = head
        if newest is not None and newest[1] is not None:
            self.counters[key] = newest[1]
        else:
            self.counters.pop(key, None)
        self.behind.pop(key, None)
        if self.on_gap is not None:
            self.on_gap(shard)
        loop = self.loop_of[key]
        if loop.client is not None:  # its read in flight started from the lost position: restart it
            self._kick(key, loop, self.clock())

    def _heads(self, keys: list[str], strict: bool = False) -> dict[str, tuple[str, int | None] | None]:
        """The newest entry (id, counter) of each shard, None for an empty one; a shard whose node did not
        answer is left out (`strict`: raises)."""
        found: dict[str, tuple[str, int | None] | None] = {}
        failed = False
        if not self.cluster:
            groups: list[tuple[redis.Redis, list[str]]] = [(cast(redis.Redis, self.watch_redis), keys)]
        else:
            cluster = cast(RedisCluster, self.watch_redis)
            by_node: dict[str, tuple[redis.Redis, list[str]]] = {}
            for key in keys:
                try:
                    node = cluster.nodes_manager.get_node_from_slot(key_slot(key))
                except RedisClusterException as exc:
                    if strict:
                        raise
                    log.debug("watchdog: shard %d left out: no node for its slot (%s)", self.shards[key], exc)
                    failed = True
                    continue
                by_node.setdefault(node.name, (cluster.get_redis_connection(node), []))[1].append(key)
            groups = list(by_node.values())
        for client, group in groups:
            pipe = client.pipeline(transaction=False)
            for key in group:
                pipe.xrevrange(key, count=1)
            try:
                replies = pipe.execute(raise_on_error=False)
            except redis.RedisError as exc:
                if strict:
                    raise
                log.debug("watchdog: shards %s left out: their node did not answer (%s)",
                          [self.shards[key] for key in group], exc)  # fmt: skip
                failed = True
                continue
            for key, reply in zip(group, replies, strict=True):
                if isinstance(reply, Exception):
                    if strict:
                        raise reply
                    log.debug("watchdog: shard %d left out: %s", self.shards[key], reply)
                    failed = True  # MOVED: the slot map is stale
                    continue
                found[key] = (reply[0][0].decode(), _counter(reply[0][1])) if reply else None
        if failed:
            self._refresh()
        return found


def _counter(fields: dict[bytes, bytes]) -> int | None:
    n = fields.get(b"n")
    return int(n) if n is not None and n.isdigit() else None


def _ms(stream_id: str) -> int:
    return int(stream_id.partition("-")[0] or 0)
