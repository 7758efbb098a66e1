"""The Redis side: key layout (every key name is made here), the publish script, snapshot and history reads.

Layout for channel C in shard k (every key of one publish shares the shard's hash tag `{t}`, so the script is
valid on Redis Cluster; `t` is balanced_tags(shards)[k], or `k` itself with SIDECAR_SHARD_TAGS=bare):
    <prefix>:{t}:live        the shard's live stream, read by every sidecar replica
    <prefix>:{t}:n           the shard's publish counter: each live entry carries it as `n`, so a reader that
                             finds a jump in it knows that the stream was trimmed past it (or lost a tail)
    <prefix>:{t}:h:C         C's history stream: the same entries with the same ids, bounded by length and TTL
    <prefix>:{t}:m:C         C's meta hash: seq, epoch, id, ts, base (JSON state), gen, st (has state)
    <prefix>:{t}:p:C         C's merge patches published since `base` was written, folded by compaction
    <prefix>:{t}:c:C         a pub/sub channel, not a key: every publish PUBLISHes its live entry there (id, `n`
                             and the fields, as a JSON array), for relays in SIDECAR_LIVE_READ=channels mode
    <prefix>:stats           replicas' per-second stats records
    <prefix>:throttle        the throttle policy set by ops
    <prefix>:policy:log      ops' changes of it: who, what, when (MAXLEN ~ POLICY_LOG_LEN)
The snapshot is `base` with the pending patches applied in order, folded in Python so JSON stays exact
(Redis' Lua cjson loses empty arrays and number precision).
"""

from __future__ import annotations

import contextlib
import logging
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any, cast

import orjson
import redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode
from redis.exceptions import AskError, MovedError, NoScriptError, RedisClusterException, TryAgainError
from redis.retry import Retry

from sidecar.config import Settings
from sidecar.core import merge
from sidecar.core.protocol import Message, Position, ProtocolError, shard_of, stream_key
from sidecar.core.slots import balanced_tags

Client = redis.Redis | redis.RedisCluster
CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}
SHARD_TAGS = ("balanced", "bare")
POLICY_LOG_LEN = 1000  # policy changes kept in <prefix>:policy:log

log = logging.getLogger(__name__)

# `sb` is the bytes C's state holds in Redis (base + pending patches); a publish that would take it past
# ARGV[12] is refused before anything is written, with the number of pending patches (compaction may help).
PUBLISH_SCRIPT = """
local size = #ARGV[5]
if ARGV[2] == 'diff' then
  size = size + tonumber(redis.call('HGET', KEYS[3], 'sb') or '0')
end
if (ARGV[2] == 'diff' or ARGV[2] == 'state') and size > tonumber(ARGV[12]) then
  return redis.error_reply('STATETOOLARGE ' .. redis.call('LLEN', KEYS[4]))
end
local epoch = redis.call('HGET', KEYS[3], 'epoch')
if not epoch then
  epoch = ARGV[6]
  redis.call('HSET', KEYS[3], 'epoch', epoch)
end
local seq = redis.call('HINCRBY', KEYS[3], 'seq', 1)
local fields = {'c', ARGV[1], 'k', ARGV[2], 'e', ARGV[3], 's', seq, 'ep', epoch, 't', ARGV[7]}
if ARGV[4] ~= '' then
  fields[#fields + 1] = 'd'
  fields[#fields + 1] = ARGV[4]
end
if ARGV[5] ~= '' then
  fields[#fields + 1] = 'x'
  fields[#fields + 1] = ARGV[5]
end
local n = redis.call('INCR', KEYS[5])
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[8], '*', 'n', n, unpack(fields))
redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[9], id, unpack(fields))
redis.call('EXPIRE', KEYS[2], ARGV[10])
local pending = 0
if ARGV[2] == 'diff' then
  pending = redis.call('RPUSH', KEYS[4], ARGV[5])
  redis.call('EXPIRE', KEYS[4], ARGV[11])
  redis.call('HSET', KEYS[3], 'st', '1', 'sb', size)
elseif ARGV[2] == 'state' then
  redis.call('DEL', KEYS[4])
  redis.call('HSET', KEYS[3], 'base', ARGV[5], 'st', '1', 'sb', size)
  redis.call('HINCRBY', KEYS[3], 'gen', 1)
end
redis.call('HSET', KEYS[3], 'id', id, 'ts', ARGV[7])
redis.call('EXPIRE', KEYS[3], ARGV[11])
local live = {id, tostring(n)}
for i = 1, #fields do live[i + 2] = tostring(fields[i]) end
redis.call('PUBLISH', ARGV[13], cjson.encode(live))
return {id, seq, epoch, pending}
"""

# Fold the first ARGV[3] pending patches into base, unless a full-state publish replaced base meanwhile. The
# LTRIM comes last: it may delete the list, and on a cluster a script that touches a missing key of a migrating
# slot fails midway.
COMPACT_SCRIPT = """
if (redis.call('HGET', KEYS[1], 'gen') or '0') ~= ARGV[2] then return 0 end
local size = #ARGV[1]
for _, patch in ipairs(redis.call('LRANGE', KEYS[2], tonumber(ARGV[3]), -1)) do size = size + #patch end
redis.call('HSET', KEYS[1], 'base', ARGV[1], 'sb', size)
redis.call('HINCRBY', KEYS[1], 'gen', 1)
redis.call('LTRIM', KEYS[2], tonumber(ARGV[3]), -1)
return 1
"""

# A channel's meta and pending patches, read at one point (atomic). A script rather than MULTI, so that on a
# cluster a read is one routed command: redis-py follows MOVED and ASK for it and refreshes its slot map after a
# lost node, which it does not do for a transaction without retries.
READ_SCRIPT = """
return {redis.call('HMGET', KEYS[1], 'id', 'seq', 'epoch', 'base', 'st', 'gen'), redis.call('LRANGE', KEYS[2], 0, -1)}
"""

# The throttle policy: `doc` set (ARGV[1] == '1') or removed, `at`, and the new version.
POLICY_SCRIPT = """
if ARGV[1] == '1' then redis.call('HSET', KEYS[1], 'doc', ARGV[2]) else redis.call('HDEL', KEYS[1], 'doc') end
redis.call('HSET', KEYS[1], 'at', ARGV[3])
return redis.call('HINCRBY', KEYS[1], 'v', 1)
"""


@dataclass(frozen=True)
class Keys:
    live: str
    history: str
    meta: str
    patches: str
    counter: str


@dataclass(frozen=True)
class Published:
    channel: str
    id: str
    seq: int
    epoch: str
    replicas: int | None = None  # replicas that acknowledged it within the WAIT timeout (None: no WAIT asked)


@dataclass(frozen=True)
class Snapshot:
    """A channel's state at one point of its stream (`state` None: an event-only channel)."""

    channel: str
    id: str
    seq: int
    epoch: str
    state: Any = None
    has_state: bool = False

    @property
    def position(self) -> Position:
        return Position(self.id, self.epoch)

    def state_json(self) -> bytes | None:
        return orjson.dumps(self.state) if self.has_state else None


@dataclass(frozen=True)
class CatchUp:
    """What a client that was at `since` missed: the messages, or `gap` with a snapshot to restart from."""

    messages: list[Message]
    gap: bool
    snapshot: Snapshot


def connect(url: str, settings: Settings, block_ms: int = 0) -> Client:
    """The one way every part (relay, reader, publisher, dashboard) gets its Redis client.

    `redis+cluster://h1:p1,h2:p2` (or `rediss+cluster://`) is a Redis Cluster known by seed nodes; a plain
    `redis://` URL of a node whose INFO says cluster_enabled:1 is one too (one INFO round trip here; a node that
    cannot be reached is taken as a single Redis, since most are)."""
    scheme, _, rest = url.partition("://")
    if scheme in CLUSTER_SCHEMES:
        return _connect_cluster(CLUSTER_SCHEMES[scheme], rest, settings, block_ms)
    # redis-py's default socket timeout would cut a blocking XREAD: give blocking clients their block time.
    # No automatic retries: a publish script retried after a lost reply would run twice, and a request during
    # an outage should fail fast (503) rather than hang; callers that can retry (the reader) do it themselves.
    # A blocking pool: past `redis_pool` connections a request waits for one (a storm of subscribes queues up)
    # instead of failing at once with MaxConnectionsError, redis-py's default, which fails /healthz too.
    pool = redis.BlockingConnectionPool.from_url(
        url,
        max_connections=settings.redis_pool,
        timeout=settings.redis_socket_timeout,
        socket_timeout=settings.redis_socket_timeout + block_ms / 1000,
        socket_connect_timeout=settings.redis_socket_timeout,
        health_check_interval=30,
        retry=Retry(NoBackoff(), 0),
    )
    client = redis.Redis(connection_pool=pool)
    client.auto_close_connection_pool = True
    if scheme in ("redis", "rediss"):
        try:
            enabled = client.info("cluster").get("cluster_enabled")
        except redis.RedisError:
            enabled = 0
        if enabled in (1, "1"):
            client.close()
            return _connect_cluster(scheme, rest, settings, block_ms)
    return client


def _connect_cluster(scheme: str, rest: str, settings: Settings, block_ms: int) -> redis.RedisCluster:
    # rest is [user:pass@]h1:p1,h2:p2[/db][?options]: the first seed with the options makes a URL redis-py
    # parses (password, TLS), the others are more seeds. The same rules as connect(): no retries (MOVED and ASK
    # are still followed: a redirected command did not run), a blocking pool per node, and a lost connection
    # refreshes the topology, so the next command finds a promoted replica.
    auth, _, hosts = rest.rpartition("@")
    match = re.match(r"([^/?]*)(.*)", hosts)
    seeds, tail = (match.group(1), match.group(2)) if match else (hosts, "")
    nodes = [_seed(seed) for seed in seeds.split(",") if seed]
    if not nodes:
        raise ValueError("a Redis Cluster URL needs at least one host:port")
    first = f"{scheme}://{auth + '@' if auth else ''}{nodes[0].host}:{nodes[0].port}{tail}"
    client = redis.RedisCluster(
        url=first,
        startup_nodes=nodes[1:],
        # Retries only while the client is made: redis-py then asks its default node (the first master) for
        # COMMAND, and a dead master not yet replaced would fail every new process; a retry asks another one.
        retry=Retry(NoBackoff(), 2),
        require_full_coverage=False,  # the other masters keep serving while one shard fails over
        connection_pool_class=redis.BlockingConnectionPool,
        max_connections=settings.redis_pool,
        timeout=settings.redis_socket_timeout,
        socket_timeout=settings.redis_socket_timeout + block_ms / 1000,
        socket_connect_timeout=settings.redis_socket_timeout,
    )
    client.set_retry(Retry(NoBackoff(), 0))
    return client


def _seed(text: str) -> ClusterNode:
    # host:port, host, [v6]:port or [v6]
    host, colon, port = text.rpartition(":") if not text.endswith("]") else ("", "", "")
    if not colon:
        host, port = text, ""
    return ClusterNode(host.strip("[]"), int(port or 6379))


class PublishNotConfirmed(redis.ConnectionError):
    """A batch's node was lost: `unknown` channels may or may not have been published (the reply was lost; a
    publish is never sent twice), `not_sent` channels were not. The batch's other messages were published."""

    def __init__(self, message: str, unknown: list[str], not_sent: list[str]) -> None:
        super().__init__(message)
        self.unknown = unknown
        self.not_sent = not_sent


class Store:
    """Every Redis read and write of the relay. Thread/greenlet safe (redis-py pools connections)."""

    def __init__(self, client: Client, settings: Settings) -> None:
        self.redis = client
        self.settings = settings
        self.prefix = settings.key_prefix
        self.cluster = client if isinstance(client, redis.RedisCluster) else None
        if settings.shard_tags not in SHARD_TAGS:
            raise ValueError(f"SIDECAR_SHARD_TAGS must be one of {', '.join(SHARD_TAGS)}, not {settings.shard_tags!r}")
        # One layout on a cluster and a single node alike, so that publishers and relays always agree.
        bare = settings.shard_tags == "bare"
        self.tags = tuple(map(str, range(settings.shards))) if bare else balanced_tags(settings.shards)
        self._publish = client.register_script(PUBLISH_SCRIPT)
        self._compact = client.register_script(COMPACT_SCRIPT)
        self._read = client.register_script(READ_SCRIPT)
        self._policy = client.register_script(POLICY_SCRIPT)
        self.wait_shortfalls = 0  # publishes whose WAIT saw fewer replicas than asked (logged each time)

    # -- key names ------------------------------------------------------------------------------------------
    def shard_tag(self, shard: int) -> str:
        return f"{self.prefix}:{{{self.tags[shard]}}}"

    def live_key(self, shard: int) -> str:
        return f"{self.shard_tag(shard)}:live"

    def live_keys(self) -> list[str]:
        return [self.live_key(k) for k in range(self.settings.shards)]

    def keys(self, channel: str) -> Keys:
        tag = self.shard_tag(shard_of(channel, self.settings.shards))
        return Keys(f"{tag}:live", f"{tag}:h:{channel}", f"{tag}:m:{channel}", f"{tag}:p:{channel}", f"{tag}:n")

    def live_channel(self, channel: str) -> str:
        """The pub/sub channel the publish script PUBLISHes `channel`'s live entries to (channels mode)."""
        return f"{self.shard_tag(shard_of(channel, self.settings.shards))}:c:{channel}"

    @property
    def stats_key(self) -> str:
        return f"{self.prefix}:stats"

    @property
    def throttle_key(self) -> str:
        return f"{self.prefix}:throttle"

    @property
    def policy_log_key(self) -> str:
        return f"{self.prefix}:policy:log"

    # -- the throttle policy (a hash: `doc` the JSON ops PUT, `v` its version, `at` when) -------------------
    def read_policy(self) -> tuple[int, bytes | None, float]:
        """(version, document or None for "the settings", set at epoch seconds); (0, None, 0.0) if never set."""
        version, doc, at = self.redis.hmget(self.throttle_key, "v", "doc", "at")
        return int(version or 0), doc if isinstance(doc, bytes) else None, float(at or 0)

    def write_policy(self, doc: bytes | None, at: float) -> int:
        """Store a policy document (None: back to the settings) and return its version; replicas poll it."""
        args: list[bytes | str] = ["0", b"", repr(at)] if doc is None else ["1", doc, repr(at)]
        return int(self._policy(keys=[self.throttle_key], args=args))

    def log_policy_change(self, at: float, who: str, what: str, policy: bytes | None) -> None:
        """One entry of the policy-change log: when, who (an admin key's name), what, the new policy (JSON; None:
        back to the settings')."""
        fields: dict[Any, Any] = {"at": repr(at), "who": who, "what": what, "policy": policy or b""}
        self.redis.xadd(self.policy_log_key, fields, maxlen=POLICY_LOG_LEN, approximate=True)

    def read_policy_log(self, n: int) -> list[tuple[str, dict[str, str]]]:
        """The last ``n`` policy changes, newest first: (stream id, fields)."""
        entries = cast("list[tuple[bytes, dict[bytes, bytes]]]", self.redis.xrevrange(self.policy_log_key, count=n))
        return [(i.decode(), {k.decode(): v.decode(errors="replace") for k, v in f.items()}) for i, f in entries]

    # -- writes ---------------------------------------------------------------------------------------------
    def publish_args(
        self, channel: str, kind: str, event: str, data: bytes | None, change: bytes | None, ts: float
    ) -> tuple[list[str], list[Any]]:
        k = self.keys(channel)
        s = self.settings
        args = [
            channel, kind, event, data or b"", change or b"", secrets.token_hex(4), repr(ts),
            s.live_len, s.history_len, s.history_ttl, s.state_ttl, s.max_state_bytes, self.live_channel(channel),
        ]  # fmt: skip
        return [k.live, k.history, k.meta, k.patches, k.counter], args

    def publish_many(
        self, items: list[tuple[str, str, str, bytes | None, bytes | None, float]], wait: int = 0
    ) -> list[Published]:
        """Run the publish script once per item, all in one round trip.

        A message that would take its channel's state past `max_state_bytes` is not published (the others
        are): ProtocolError("state-too-large") once the whole batch has been sent. On a cluster, one round
        trip per master that owns some of the items; a lost master raises PublishNotConfirmed.

        `wait` > 0: each master's pipeline ends with `WAIT wait publish_wait_timeout_ms`, on the connection
        that ran the scripts, and each Published says how many replicas acknowledged it. Fewer than `wait` is
        not an error: the message is published (WAIT is a durability hint, not a transaction), it could only be
        lost if its master failed before a replica got it. The shortfall is logged and counted in
        `wait_shortfalls`."""
        acked: list[int | None] = [None] * len(items)
        replies = self._run_publishes([self.publish_args(*item) for item in items], wait, acked)
        published, refused = [], []
        for item, reply, replicas in zip(items, replies, acked, strict=True):
            if isinstance(reply, Exception):
                reply, replicas = self._retry_too_large(item, reply, wait)
                if reply is None:
                    refused.append(item[0])
                    continue
            stream_id, seq, epoch, pending = reply
            channel = item[0]
            if pending > self.settings.compact_after:
                # Housekeeping: the message is published whatever happens here (an error would invite a retry,
                # a double publish), and a failed compaction is tried again at the next publish.
                with contextlib.suppress(redis.RedisError):
                    self.compact(channel)
            published.append(Published(channel, stream_id.decode(), int(seq), epoch.decode(), replicas))
        if refused:
            raise ProtocolError(
                "state-too-large",
                f"not published: the state of {', '.join(sorted(set(refused)))} would exceed "
                f"{self.settings.max_state_bytes} bytes (publish a smaller full state to shrink it)",
            )
        return published

    def _retry_too_large(self, item: tuple, error: Exception, wait: int) -> tuple[Any, int | None]:
        """The reply of a refused publish retried once after compaction (pending patches overstate the state's
        size until folded), or None if it is still too large, and its WAIT count. Other errors propagate."""
        text = str(error)
        if not (isinstance(error, redis.ResponseError) and text.startswith("STATETOOLARGE")):
            raise error
        if text.split()[-1] == "0":
            return None, None
        self.compact(item[0])
        acked: list[int | None] = [None]
        again = self._run_publishes([self.publish_args(*item)], wait, acked)[0]
        if isinstance(again, redis.ResponseError) and str(again).startswith("STATETOOLARGE"):
            return None, None
        if isinstance(again, Exception):
            raise again
        return again, acked[0]

    def _run_publishes(
        self, calls: list[tuple[list[str], list[Any]]], wait: int = 0, acked: list[int | None] | None = None
    ) -> list[Any]:
        """The publish script's reply (or error) for each call, in one plain pipeline per node owning some of
        their slots (redis-py's cluster pipeline runs no scripts). A reply saying the script did not run (MOVED,
        ASK, TRYAGAIN during a slot migration, NOSCRIPT) is sent again where the cluster says, within the socket
        timeout. A connection lost after sending is never retried: the script may have run. `wait` > 0: each
        pipeline ends with WAIT, whose count goes to `acked[i]` for each call it ran."""
        replies: list[Any] = [None] * len(calls)
        todo: dict[int, str] = dict.fromkeys(range(len(calls)), "")  # call -> the node an ASK sent it to
        refused: set[str] = set()
        unknown: list[int] = []
        not_sent: list[int] = []
        first_error: Exception | None = None
        deadline = time.monotonic() + self.settings.redis_socket_timeout
        while todo:
            groups: dict[str, list[int]] = {}
            for i, ask in todo.items():
                groups.setdefault(ask or self._node_of(calls[i][0][0]), []).append(i)
            again: dict[int, str] = {}
            moved = busy = False
            for name, indexes in groups.items():
                client = self._node_client(name)
                try:
                    conn = client.connection_pool.get_connection()  # raises before anything is sent
                except (redis.ConnectionError, redis.TimeoutError) as exc:
                    if self.cluster is None or name in refused:
                        not_sent.extend(indexes)
                        first_error = first_error or exc
                        continue
                    refused.add(name)  # once more after a topology refresh: a replica may have taken over
                    moved = True
                    again.update(dict.fromkeys(indexes, ""))
                    continue
                pipe = client.pipeline(transaction=False)
                pipe.connection = conn
                ran: list[int] = []
                for i in indexes:
                    if todo[i]:
                        pipe.execute_command("ASKING")
                    keys, args = calls[i]
                    pipe.evalsha(self._publish.sha, len(keys), *keys, *args)
                if wait > 0:
                    # WAIT counts the replicas that have every write this connection made so far: the scripts
                    # above. It blocks the connection up to the timeout (the socket timeout must exceed it).
                    pipe.execute_command("WAIT", wait, self.settings.publish_wait_timeout_ms)
                try:
                    out = iter(pipe.execute(raise_on_error=False))
                except (redis.ConnectionError, redis.TimeoutError) as exc:
                    unknown.extend(indexes)
                    first_error = first_error or exc
                    moved = True
                    continue
                for i in indexes:
                    if todo[i]:
                        next(out)  # ASKING's OK
                    reply = next(out)
                    if isinstance(reply, NoScriptError):
                        client.script_load(PUBLISH_SCRIPT)
                        again[i] = todo[i]
                    elif isinstance(reply, MovedError | TryAgainError) and time.monotonic() < deadline:
                        # Not run. MOVED: the slot has a new owner. TRYAGAIN: a multi-key script in a slot whose
                        # keys are half migrated (it runs once the migration is over).
                        again[i] = ""
                        moved = moved or isinstance(reply, MovedError)
                        busy = busy or isinstance(reply, TryAgainError)
                    elif isinstance(reply, AskError) and time.monotonic() < deadline:
                        again[i] = f"{reply.host}:{reply.port}"  # not run: the importing node takes it, once
                    else:
                        replies[i] = reply
                        ran.append(i)
                if wait > 0:
                    count = next(out)
                    count = count if isinstance(count, int) else 0  # an error reply: nothing confirmed
                    for i in ran:
                        if acked is not None:
                            acked[i] = count
                    if count < wait and ran:
                        self.wait_shortfalls += 1
                        log.warning(
                            "WAIT %d: %d replica(s) of %s acknowledged %s within %d ms; published, but lost if "
                            "that master fails before a replica has it",
                            wait, count, name or "redis", ", ".join(sorted({calls[i][1][0] for i in ran})),
                            self.settings.publish_wait_timeout_ms,
                        )  # fmt: skip
            if moved:
                self._refresh()
            if busy:
                time.sleep(0.02)
            todo = again
        if unknown or not_sent:
            lost = sorted({calls[i][1][0] for i in unknown})
            unsent = sorted({calls[i][1][0] for i in not_sent})
            text = [f"{', '.join(lost)}: may or may not be published (not retried: it could run twice)"] if lost else []
            text += [f"{', '.join(unsent)}: not published (nothing was sent; safe to retry)"] if unsent else []
            raise PublishNotConfirmed(f"{first_error}; {'; '.join(text)}", lost, unsent) from first_error
        return replies

    def _node_of(self, key: str) -> str:
        return self.cluster.get_node_from_key(key).name if self.cluster is not None else ""

    def _node_client(self, name: str) -> redis.Redis:
        if self.cluster is None:
            return cast("redis.Redis", self.redis)
        node = self.cluster.get_node(node_name=name)
        if node is None:  # an ASK to a node not seen yet
            self._refresh()
            node = self.cluster.get_node(node_name=name)
        if node is None:
            raise redis.ConnectionError(f"Redis Cluster node {name} is unknown")
        return self.cluster.get_redis_connection(node)

    def _refresh(self) -> None:
        """Reload the cluster's slot map (after MOVED, or a lost master: its replica may have taken over)."""
        if self.cluster is not None:
            with contextlib.suppress(redis.RedisError, RedisClusterException):  # the next command tries again
                self.cluster.nodes_manager.initialize()

    def compact(self, channel: str) -> None:
        k = self.keys(channel)
        (*_, base, _, gen), patches = self._read(keys=[k.meta, k.patches])
        state = _fold(channel, base, patches)
        self._compact(keys=[k.meta, k.patches], args=[orjson.dumps(state), gen or b"0", len(patches)])

    # -- reads ----------------------------------------------------------------------------------------------
    def snapshot(self, channel: str) -> Snapshot | None:
        """The channel's current state and position; None if the channel has no meta (never published,
        expired, or lost with Redis' data)."""
        k = self.keys(channel)
        (stream_id, seq, epoch, base, has_state, _), patches = self._read(keys=[k.meta, k.patches])
        if epoch is None:
            return None
        if stream_id is None:  # a meta hash without a publish cannot happen; be safe
            return None
        state = _fold(channel, base, patches) if has_state else None
        return Snapshot(channel, stream_id.decode(), int(seq), epoch.decode(), state, bool(has_state))

    def history(self, channel: str, after: str = "0-0", count: int | None = None) -> list[Message]:
        """History entries strictly after stream id `after`, oldest first."""
        k = self.keys(channel)
        entries = self.redis.xrange(k.history, min=f"({after}" if after != "0-0" else "-", count=count)
        return decode_entries(entries)

    def catch_up(self, channel: str, since: Position) -> CatchUp:
        """What a client at `since` missed, or a gap when history no longer covers it (trimmed, expired,
        epoch changed): never a silent hole."""
        snap = self.snapshot(channel)
        if snap is None:
            # Nothing is known of the channel: fine for a client that has seen nothing, a gap otherwise.
            gap = since.id != "0-0"
            return CatchUp([], gap, Snapshot(channel, "0-0", 0, since.epoch if not gap else ""))
        if since.epoch and since.epoch != snap.epoch:
            return CatchUp([], True, snap)
        if since.id == snap.id:
            return CatchUp([], False, snap)
        if since.key > stream_key(snap.id):
            return CatchUp([], True, snap)  # a position from the future: another epoch in disguise
        k = self.keys(channel)
        entries = self.redis.xrange(k.history, min=since.id, count=self.settings.history_len + 1)
        messages = decode_entries(entries)
        if since.id == "0-0":
            complete = bool(messages) and messages[0].seq == 1
        elif messages and messages[0].id == since.id:
            complete = True  # the entry at `since` is still there, so nothing after it was trimmed
            messages = messages[1:]
        else:
            # Trimmed from history, but nothing is lost if the oldest entry kept is the one right after it.
            complete = bool(messages) and self._seq_at(k.live, snap, since.id) == messages[0].seq - 1
        if not complete or not messages or messages[-1].key < stream_key(snap.id):
            return CatchUp([], True, snap)
        return CatchUp(messages, False, snap)

    def _seq_at(self, live: str, snap: Snapshot, stream_id: str) -> int | None:
        """The seq of the channel's message `stream_id` in the snapshot's epoch, from the shard's live stream
        (it has the same ids as the channel's history, and often more of them); None if it is not there."""
        found = decode_entries(self.redis.xrange(live, min=stream_id, max=stream_id, count=1))
        if not found or found[0].channel != snap.channel or found[0].epoch != snap.epoch:
            return None
        return found[0].seq


def redis_address(client: object) -> str:
    """``redis host:port/db`` (or ``redis unix:/path``) of a client, for logs: never the password (the pool keeps
    it apart; it is not in what we print)."""
    pool = getattr(client, "connection_pool", None)
    kwargs = getattr(pool, "connection_kwargs", None) or {}
    if kwargs.get("path"):
        return f"redis unix:{kwargs['path']}"
    return f"redis {kwargs.get('host', '?')}:{kwargs.get('port', '?')}/{kwargs.get('db', 0)}"


def decode_entries(entries: object) -> list[Message]:
    # connect() leaves decode_responses off, so ids and fields are bytes; redis-py's types also allow str
    # (for decoding clients) and None, which this client never gets.
    rows = cast("list[tuple[bytes, dict[bytes, bytes]]]", entries or [])
    return [decode_entry(row) for row in rows]


def decode_entry(entry: tuple[bytes, dict[bytes, bytes]]) -> Message:
    return Message.from_fields(entry[0].decode(), entry[1])


def decode_published(payload: bytes) -> tuple[int, Message]:
    """A live entry as the publish script PUBLISHes it (`[id, n, field, value, ...]`): its shard counter and
    message. ValueError (or KeyError) when the payload was not written by the script."""
    items = orjson.loads(payload)
    if not isinstance(items, list) or len(items) < 2 or len(items) % 2 or not all(isinstance(x, str) for x in items):
        raise ValueError("not a published live entry")
    fields = {items[i].encode(): items[i + 1].encode() for i in range(2, len(items), 2)}
    return int(items[1]), Message.from_fields(items[0], fields)


_skipped: set[str] = set()  # channels whose unappliable patch was logged (bounded below)


def _fold(channel: str, base: bytes | None, patches: list[bytes]) -> Any:
    """`base` with the pending patches applied in order. A patch that cannot be applied (nested deeper than
    merge.MAX_DEPTH: publishers before depth was checked at publish accepted those) is skipped, as the
    next compaction then drops it for good, so state reads answer instead of failing (docs/protocol.md)."""
    state = orjson.loads(base) if base else {}
    for patch in patches:
        try:
            state = merge.apply(state, orjson.loads(patch))
        except ValueError as exc:  # MergeError, or JSON that is not JSON
            if channel not in _skipped and len(_skipped) < 1000:
                _skipped.add(channel)
                log.warning("%s: skipped a pending patch that cannot be applied (%s)", channel, exc)
    return state
