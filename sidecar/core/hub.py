"""Subscriptions, dispatch, and bounded per-connection queues. Pure: the caller owns sockets, Redis and time.

The subscribe handshake has no race with the live stream (docs/protocol.md, "Subscribing"):
1. :meth:`Hub.subscribe` registers the subscription; live messages for it are buffered from then on;
2. the caller reads the channel from Redis (a snapshot, or the history after the client's position);
3. :meth:`Hub.start` queues what that read produced, then the buffered messages newer than it.

Frames are encoded once per (message, mode, transport) and shared by every connection receiving them; a
connection only prefixes its own SSE `id:` line.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson

from sidecar.core import merge
from sidecar.core.protocol import (
    ZERO_KEY,
    Message,
    Position,
    StreamKey,
    control_body,
    dumps,
    encode_cursor,
    message_body,
    sse_frame,
    sse_id_line,
    ws_text_frame,
)

SSE, WS = "sse", "ws"
STATEFUL_MODES = ("diff", "state")


@dataclass
class Sync:
    """What the caller read from Redis for one subscription (see the module docstring, step 2)."""

    position: Position  # the channel's position at the read
    seq: int
    state: bytes | None = None  # the snapshot (JSON), for channels with state
    messages: list[Message] = field(default_factory=list)  # catch-up after the client's position
    resumed: bool = False  # the client gave a position
    gap: bool = False  # the client's position is no longer covered by history: snapshot or reset
    resync: bool = False  # the hub asked for this read (slow consumer, hole): no new `subscribed`


@dataclass
class Subscription:
    conn: Connection
    channel: str
    mode: str
    last: StreamKey = ZERO_KEY  # newest id queued for this subscription: older ones are duplicates
    epoch: str = ""
    seq: int = 0
    buffer: list[Message] | None = field(default_factory=list)  # live messages held until start()


class Connection:
    """One client connection's subscriptions and its bounded outgoing queue.

    `wake` is called (from the dispatching side) when the queue goes from empty to non-empty or the
    connection needs the caller's attention (a resync); the caller's writer then calls :meth:`drain`.
    """

    _ids = itertools.count(1)

    def __init__(
        self, transport: str, wake: Callable[[], None], max_frames: int = 1000, max_bytes: int = 1 << 20
    ) -> None:
        self.id = next(self._ids)
        self.transport = transport
        self.wake = wake
        self.max_frames = max_frames
        self.max_bytes = max_bytes
        self.subs: dict[str, Subscription] = {}
        self.queue: deque[tuple[bytes, str | None, Position | None, float]] = deque()
        self.batch_ts = 0.0  # publish time (ms) of the oldest message in the last drained batch; 0: none
        self.queued_bytes = 0
        self.positions: dict[str, Position] = {}  # SSE cursor: position of the newest queued frame
        self.sent: dict[str, Position] = {}  # position of the newest frame handed to the socket
        self.resync: set[str] = set()  # channels whose backlog was dropped: snapshot/reset them
        self.dropped = 0  # frames dropped for slowness, ever

    def cursor(self) -> str:
        return encode_cursor([self.positions.get(c, Position()) for c in sorted(self.subs)])

    def push(
        self, frame: bytes, channel: str | None = None, position: Position | None = None, ts: float = 0.0
    ) -> None:
        if channel is not None and channel in self.resync:
            return  # its backlog was dropped; the resync will bring it up to date
        if position is not None and channel is not None:
            self.positions[channel] = position
            if self.transport == SSE:
                frame = sse_id_line(self.cursor()) + frame
        was_empty = not self.queue
        self.queue.append((frame, channel, position, ts))
        self.queued_bytes += len(frame)
        if len(self.queue) > self.max_frames or self.queued_bytes > self.max_bytes:
            self._drop_backlog()
        elif was_empty:
            self.wake()

    def drain(self) -> list[bytes]:
        """Everything queued, to be written in one go."""
        frames = []
        self.batch_ts = 0.0
        while self.queue:
            frame, channel, position, ts = self.queue.popleft()
            frames.append(frame)
            if ts and not self.batch_ts:
                self.batch_ts = ts
            if position is not None and channel is not None:
                self.sent[channel] = position
        self.queued_bytes = 0
        return frames

    def _drop_backlog(self) -> None:
        # A slow consumer must not grow memory: drop what it has not read and resynchronise it instead.
        for _, channel, _, _ in self.queue:
            if channel is not None:
                self.resync.add(channel)
        self.dropped += len(self.queue)
        self.queue.clear()
        self.queued_bytes = 0
        self.positions = dict(self.sent)
        for channel in self.resync:
            sub = self.subs.get(channel)
            if sub is not None:
                sub.buffer = []  # hold live messages until the resync's read
        self.wake()


@dataclass
class ChannelRecord:
    subs: dict[int, Subscription] = field(default_factory=dict)  # connection id -> subscription
    last: StreamKey = ZERO_KEY
    epoch: str = ""
    seq: int = 0
    state: Any = None  # kept only while state-mode subscribers exist
    state_json: bytes | None = None
    state_key: StreamKey | None = None


class Hub:
    def __init__(self) -> None:
        self.channels: dict[str, ChannelRecord] = {}
        self.connections: dict[int, Connection] = {}
        self.frames_encoded = 0
        self.delivered = 0  # frames queued for connections, ever
        self.delivered_by_channel: dict[str, int] = {}  # the same, per channel (read and reset by stats)

    # -- connections and subscriptions -------------------------------------------------------------------
    def connect(self, conn: Connection) -> Connection:
        self.connections[conn.id] = conn
        return conn

    def disconnect(self, conn: Connection) -> None:
        for channel in list(conn.subs):
            self.unsubscribe(conn, channel)
        self.connections.pop(conn.id, None)

    def subscribe(self, conn: Connection, channel: str, mode: str, since: Position | None = None) -> Subscription:
        """Register first (step 1); live messages for the subscription are buffered until :meth:`start`."""
        old = conn.subs.get(channel)
        if old is not None:
            self.unsubscribe(conn, channel)
        sub = Subscription(conn, channel, mode)
        conn.subs[channel] = sub
        conn.positions[channel] = conn.sent[channel] = since or Position()
        self.channels.setdefault(channel, ChannelRecord()).subs[conn.id] = sub
        return sub

    def unsubscribe(self, conn: Connection, channel: str) -> None:
        conn.subs.pop(channel, None)
        conn.resync.discard(channel)
        conn.positions.pop(channel, None)
        conn.sent.pop(channel, None)
        record = self.channels.get(channel)
        if record is None:
            return
        record.subs.pop(conn.id, None)
        if not record.subs:
            del self.channels[channel]
        elif not any(s.mode == "state" for s in record.subs.values()):
            record.state = record.state_json = record.state_key = None

    def start(self, sub: Subscription, sync: Sync) -> None:
        """Queue what the read produced (step 3), then the buffered live messages newer than it."""
        conn, channel, mode = sub.conn, sub.channel, sub.mode
        if conn.subs.get(channel) is not sub:
            return  # unsubscribed meanwhile
        conn.resync.discard(channel)
        record = self.channels[channel]
        if mode == "state" and record.state_key is None:
            # A channel with no state yet starts from null: RFC 7386 merges a first patch into {}.
            record.state_json = sync.state or b"null"
            record.state, record.state_key = orjson.loads(record.state_json), sync.position.key
        frames = self._sync_frames(sub, sync)
        last, seq = sync.position, sync.seq
        if mode != "state" and not sync.gap and sync.messages and sync.messages[-1].key > last.key:
            last, seq = sync.messages[-1].position, sync.messages[-1].seq  # history read after the snapshot
        sub.last, sub.epoch, sub.seq = last.key, last.epoch, seq
        buffered, sub.buffer = sub.buffer or [], None
        for body, position in frames:
            conn.push(self._encode(conn.transport, body), channel, position)
        for msg in buffered:
            if mode == "state" and record.state_key is not None and msg.key > record.state_key:
                self._advance_state(record, msg)
            self._deliver(sub, msg, {})

    def _sync_frames(self, sub: Subscription, sync: Sync) -> list[tuple[dict, Position]]:
        pos, mode, channel = sync.position, sub.mode, sub.channel
        frames: list[tuple[dict, Position]] = []
        with_state = sync.state is not None and mode in STATEFUL_MODES
        if sub.conn.transport == WS and not sync.resync:
            extra: dict[str, Any] = {"mode": sub.mode}
            if with_state and not sync.resumed:
                extra["state"] = sync.state
            frames.append((control_body("subscribed", channel, pos, sync.seq, **extra), pos))
        elif with_state and not sync.resumed:
            frames.append((control_body("snapshot", channel, pos, sync.seq, state=sync.state), pos))
        if sync.gap:
            if with_state:
                body = control_body("snapshot", channel, pos, sync.seq, state=sync.state, reason="gap")
            else:
                body = control_body("reset", channel, pos, sync.seq, reason="gap")
            frames.append((body, pos))
        elif sync.messages:
            missed = sync.messages
            if mode == "state":
                frames.append((control_body("snapshot", channel, pos, sync.seq, state=sync.state), pos))
            elif mode == "poke":
                last = missed[-1]
                frames.append((message_body(last, mode, seq_from=missed[0].seq), last.position))
            else:
                frames.extend((message_body(m, mode), m.position) for m in missed)
        return frames

    # -- dispatch -------------------------------------------------------------------------------------------
    def dispatch(self, messages: Iterable[Message]) -> None:
        """Hand messages read from the live streams to the matching subscriptions, in stream order."""
        for msg in messages:
            record = self.channels.get(msg.channel)
            if record is None:
                continue
            if record.epoch == msg.epoch and msg.key <= record.last:
                continue  # already seen (a reader restarted from an older id)
            hole = bool(record.epoch) and (record.epoch != msg.epoch or msg.seq != record.seq + 1)
            record.epoch, record.seq, record.last = msg.epoch, msg.seq, msg.key
            if hole:
                # Something between the last message and this one never reached us (the live stream was
                # trimmed past a lagging reader, or Redis lost its data): never a silent hole.
                self._resync_channel(record, msg.channel)
                continue
            if record.state_key is not None:
                self._advance_state(record, msg)
            frames: dict[tuple[str, str], bytes] = {}
            for sub in list(record.subs.values()):
                if sub.buffer is not None:
                    sub.buffer.append(msg)
                else:
                    self._deliver(sub, msg, frames)

    def _deliver(self, sub: Subscription, msg: Message, frames: dict[tuple[str, str], bytes]) -> None:
        if msg.epoch == sub.epoch and msg.key <= sub.last:
            return
        if sub.epoch and msg.epoch != sub.epoch:
            self._resync_sub(sub)
            return
        sub.last, sub.seq, sub.epoch = msg.key, msg.seq, msg.epoch
        transport = sub.conn.transport
        frame = frames.get((sub.mode, transport))
        if frame is None:
            record = self.channels[sub.channel]
            state = record.state_json if sub.mode == "state" else None
            frame = frames[(sub.mode, transport)] = self._encode(transport, message_body(msg, sub.mode, state))
        sub.conn.push(frame, sub.channel, msg.position, msg.ts)
        self.delivered += 1
        self.delivered_by_channel[sub.channel] = self.delivered_by_channel.get(sub.channel, 0) + 1

    def _advance_state(self, record: ChannelRecord, msg: Message) -> None:
        if record.state_key is not None and msg.key <= record.state_key:
            return
        if msg.kind == "diff" and msg.change is not None:
            record.state = merge.apply(record.state, orjson.loads(msg.change))
            record.state_json = orjson.dumps(record.state)
        elif msg.kind == "state" and msg.change is not None:
            record.state, record.state_json = orjson.loads(msg.change), msg.change
        record.state_key = msg.key

    def _resync_channel(self, record: ChannelRecord, channel: str) -> None:
        record.state = record.state_json = record.state_key = None
        for sub in list(record.subs.values()):
            self._resync_sub(sub)

    def _resync_sub(self, sub: Subscription) -> None:
        conn = sub.conn
        if sub.channel in conn.resync:
            return
        conn.resync.add(sub.channel)
        sub.buffer = []
        conn.wake()

    def _encode(self, transport: str, body: dict) -> bytes:
        self.frames_encoded += 1
        payload = dumps(body)
        return sse_frame(body["type"], payload) if transport == SSE else ws_text_frame(payload)

    # -- introspection --------------------------------------------------------------------------------------
    def subscriber_counts(self) -> dict[str, int]:
        return {channel: len(record.subs) for channel, record in self.channels.items()}
