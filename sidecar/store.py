"""The Redis side: key layout (every key name is made here), the publish script, snapshot and history reads.

Layout for channel C in shard k (every key of one publish shares the hash tag `{k}`, so the script is valid on
Redis Cluster):
    <prefix>:{k}:live        the shard's live stream, read by every sidecar replica
    <prefix>:{k}:n           the shard's publish counter: each live entry carries it as `n`, so a reader that
                             finds a jump in it knows that the stream was trimmed past it (or lost a tail)
    <prefix>:{k}:h:C         C's history stream: the same entries with the same ids, bounded by length and TTL
    <prefix>:{k}:m:C         C's meta hash: seq, epoch, id, ts, base (JSON state), gen, st (has state)
    <prefix>:{k}:p:C         C's merge patches published since `base` was written, folded by compaction
    <prefix>:stats           replicas' per-second stats records
    <prefix>:throttle        the throttle policy set by ops
The snapshot is `base` with the pending patches applied in order, folded in Python so JSON stays exact
(Redis' Lua cjson loses empty arrays and number precision).
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass
from typing import Any, cast

import orjson
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from sidecar.config import Settings
from sidecar.core import merge
from sidecar.core.protocol import Message, Position, ProtocolError, shard_of, stream_key

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
return {id, seq, epoch, pending}
"""

# Fold the first ARGV[3] pending patches into base, unless a full-state publish replaced base meanwhile.
COMPACT_SCRIPT = """
if (redis.call('HGET', KEYS[1], 'gen') or '0') ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], 'base', ARGV[1])
redis.call('HINCRBY', KEYS[1], 'gen', 1)
redis.call('LTRIM', KEYS[2], tonumber(ARGV[3]), -1)
local size = #ARGV[1]
for _, patch in ipairs(redis.call('LRANGE', KEYS[2], 0, -1)) do size = size + #patch end
redis.call('HSET', KEYS[1], 'sb', size)
return 1
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


def connect(url: str, settings: Settings, block_ms: int = 0) -> redis.Redis:
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
    return client


class Store:
    """Every Redis read and write of the relay. Thread/greenlet safe (redis-py pools connections)."""

    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        self.redis = client
        self.settings = settings
        self.prefix = settings.key_prefix
        self._publish = client.register_script(PUBLISH_SCRIPT)
        self._compact = client.register_script(COMPACT_SCRIPT)

    # -- key names ------------------------------------------------------------------------------------------
    def shard_tag(self, shard: int) -> str:
        return f"{self.prefix}:{{{shard}}}"

    def live_key(self, shard: int) -> str:
        return f"{self.shard_tag(shard)}:live"

    def live_keys(self) -> list[str]:
        return [self.live_key(k) for k in range(self.settings.shards)]

    def keys(self, channel: str) -> Keys:
        tag = self.shard_tag(shard_of(channel, self.settings.shards))
        return Keys(f"{tag}:live", f"{tag}:h:{channel}", f"{tag}:m:{channel}", f"{tag}:p:{channel}", f"{tag}:n")

    @property
    def stats_key(self) -> str:
        return f"{self.prefix}:stats"

    @property
    def throttle_key(self) -> str:
        return f"{self.prefix}:throttle"

    # -- the throttle policy (a hash: `doc` the JSON ops PUT, `v` its version, `at` when) -------------------
    def read_policy(self) -> tuple[int, bytes | None, float]:
        """(version, document or None for "the settings", set at epoch seconds); (0, None, 0.0) if never set."""
        version, doc, at = self.redis.hmget(self.throttle_key, "v", "doc", "at")
        return int(version or 0), doc if isinstance(doc, bytes) else None, float(at or 0)

    def write_policy(self, doc: bytes | None, at: float) -> int:
        """Store a policy document (None: back to the settings) and return its version; replicas poll it."""
        pipe = self.redis.pipeline(transaction=True)
        if doc is None:
            pipe.hdel(self.throttle_key, "doc")
        else:
            pipe.hset(self.throttle_key, "doc", doc)
        pipe.hset(self.throttle_key, "at", repr(at))
        pipe.hincrby(self.throttle_key, "v", 1)
        return int(pipe.execute()[-1])

    # -- writes ---------------------------------------------------------------------------------------------
    def publish_args(
        self, channel: str, kind: str, event: str, data: bytes | None, change: bytes | None, ts: float
    ) -> tuple[list[str], list[Any]]:
        k = self.keys(channel)
        s = self.settings
        args = [
            channel, kind, event, data or b"", change or b"", secrets.token_hex(4), repr(ts),
            s.live_len, s.history_len, s.history_ttl, s.state_ttl, s.max_state_bytes,
        ]  # fmt: skip
        return [k.live, k.history, k.meta, k.patches, k.counter], args

    def publish_many(self, items: list[tuple[str, str, str, bytes | None, bytes | None, float]]) -> list[Published]:
        """Run the publish script once per item, all in one round trip.

        A message that would take its channel's state past `max_state_bytes` is not published (the others
        are): ProtocolError("state-too-large") once the whole batch has been sent."""
        pipe = self.redis.pipeline(transaction=False)
        for item in items:
            keys, args = self.publish_args(*item)
            self._publish(keys=keys, args=args, client=pipe)
        replies = pipe.execute(raise_on_error=False)
        published, refused = [], []
        for item, reply in zip(items, replies, strict=True):
            if isinstance(reply, Exception):
                reply = self._retry_too_large(item, reply)
                if reply is None:
                    refused.append(item[0])
                    continue
            stream_id, seq, epoch, pending = reply
            channel = item[0]
            if pending > self.settings.compact_after:
                self.compact(channel)
            published.append(Published(channel, stream_id.decode(), int(seq), epoch.decode()))
        if refused:
            raise ProtocolError(
                "state-too-large",
                f"not published: the state of {', '.join(sorted(set(refused)))} would exceed "
                f"{self.settings.max_state_bytes} bytes (publish a smaller full state to shrink it)",
            )
        return published

    def _retry_too_large(self, item: tuple, error: Exception) -> Any:
        """The reply of a refused publish retried once after compaction (pending patches overstate the state's
        size until folded), or None if it is still too large. Other errors propagate."""
        text = str(error)
        if not (isinstance(error, redis.ResponseError) and text.startswith("STATETOOLARGE")):
            raise error
        if text.split()[-1] == "0":
            return None
        self.compact(item[0])
        keys, args = self.publish_args(*item)
        try:
            return self._publish(keys=keys, args=args)
        except redis.ResponseError as again:
            if str(again).startswith("STATETOOLARGE"):
                return None
            raise

    def compact(self, channel: str) -> None:
        k = self.keys(channel)
        pipe = self.redis.pipeline(transaction=True)
        pipe.hmget(k.meta, "base", "gen")
        pipe.lrange(k.patches, 0, -1)
        (base, gen), patches = pipe.execute()
        state = _fold(channel, base, patches)
        self._compact(keys=[k.meta, k.patches], args=[orjson.dumps(state), gen or b"0", len(patches)])

    # -- reads ----------------------------------------------------------------------------------------------
    def snapshot(self, channel: str) -> Snapshot | None:
        """The channel's current state and position; None if the channel has no meta (never published,
        expired, or lost with Redis' data)."""
        k = self.keys(channel)
        pipe = self.redis.pipeline(transaction=True)
        pipe.hmget(k.meta, "id", "seq", "epoch", "base", "st")
        pipe.lrange(k.patches, 0, -1)
        (stream_id, seq, epoch, base, has_state), patches = pipe.execute()
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


def decode_entries(entries: object) -> list[Message]:
    # connect() leaves decode_responses off, so ids and fields are bytes; redis-py's types also allow str
    # (for decoding clients) and None, which this client never gets.
    rows = cast("list[tuple[bytes, dict[bytes, bytes]]]", entries or [])
    return [decode_entry(row) for row in rows]


def decode_entry(entry: tuple[bytes, dict[bytes, bytes]]) -> Message:
    return Message.from_fields(entry[0].decode(), entry[1])


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
