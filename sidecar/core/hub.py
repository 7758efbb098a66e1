"""Subscriptions, dispatch, and bounded per-connection queues. Pure: the caller owns sockets, Redis and time.

The subscribe handshake has no race with the live stream (docs/protocol.md, "Subscribing"):
1. :meth:`Hub.subscribe` registers the subscription; live messages for it are buffered from then on;
2. the caller reads the channel from Redis (a snapshot, or the history after the client's position);
3. :meth:`Hub.start` queues what that read produced, then the buffered messages newer than it.

Frames are encoded once per (message, mode, transport) and shared by every connection receiving them; a
connection only prefixes its own SSE `id:` line. With a :class:`~sidecar.core.throttle.Throttle`, dispatch offers
each message to it and sends what it returns; :meth:`Hub.flush` sends what it held once :meth:`Hub.due` comes.
A coalesced delivery is encoded once per (messages, mode, transport), shared the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from sidecar.core import merge
from sidecar.core.connection import SSE, WS, Connection, SseFrames, Subscription
from sidecar.core.protocol import (
    ZERO_KEY,
    Message,
    Position,
    StreamKey,
    control_body,
    dumps,
    message_body,
    sse_frame,
    ws_text_frame,
)
from sidecar.core.throttle import Outgoing, Throttle

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
    since: Position | None = None  # the client's position, when it gave one




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
    """``throttle`` None: every message goes out at once, as its own frame. ``on_timer`` (set by the caller)
    is called with :meth:`due` whenever dispatch left something for a later :meth:`flush`; ``on_error`` with
    each message whose dispatch raised (see :meth:`failed`). ``clock`` (default: the throttle's) is read once
    per dispatch, flush and start: the frames they queue carry that time (``Connection.queue_at``, for the
    stats' queue stage); None: not stamped."""

    def __init__(self, throttle: Throttle | None = None, clock: Callable[[], float] | None = None) -> None:
        self.throttle = throttle
        self.clock = clock if clock is not None or throttle is None else throttle.clock
        self.now = 0.0  # the clock at the current dispatch, flush or start
        self.on_timer: Callable[[float], None] | None = None
        self.on_error: Callable[[Message | None, Exception], None] | None = None
        # Called with (channel, True) when a channel gets its first subscriber, (channel, False) after its last
        # left: a reader in channels mode (SIDECAR_LIVE_READ) subscribes to what this replica's clients want.
        self.on_channel: Callable[[str, bool], None] | None = None
        self.dispatch_errors = 0  # messages skipped because they could not be dispatched (or decoded), ever
        self.channels: dict[str, ChannelRecord] = {}
        self.connections: dict[int, Connection] = {}
        self.frames_encoded = 0
        self.delivered = 0  # frames queued for connections, ever
        self.delivered_by_channel: dict[str, int] = {}  # the same, per channel (read and reset by stats)
        self.sse_frames = SseFrames()  # SSE frames with the id lines its connections share (connection.py)

    # -- connections and subscriptions -------------------------------------------------------------------
    def connect(self, conn: Connection) -> Connection:
        conn.sse_frames = self.sse_frames
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
        record = self.channels.get(channel)
        if record is None:
            record = self.channels[channel] = ChannelRecord()
            if self.on_channel is not None:
                self.on_channel(channel, True)
        record.subs[conn.id] = sub
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
            if self.throttle is not None:
                self.throttle.forget(channel)
            if self.on_channel is not None:
                self.on_channel(channel, False)
        elif not any(s.mode == "state" for s in record.subs.values()):
            record.state = record.state_json = record.state_key = None

    def start(self, sub: Subscription, sync: Sync) -> None:
        """Queue what the read produced (step 3), then the buffered live messages newer than it."""
        conn, channel, mode = sub.conn, sub.channel, sub.mode
        if conn.subs.get(channel) is not sub:
            return  # unsubscribed meanwhile
        self._stamp()
        # A resync asked for while the read was in flight (a hole the hub or the reader found) may be newer than
        # what was read: it is done after this one, not forgotten (hold() cleared the requests the read covers).
        again = channel in conn.resync
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
        if not frames:
            conn.positions[channel] = conn.sent[channel] = last  # the cursor starts at the read, not at 0-0
        for msg in buffered:
            try:
                if mode == "state" and record.state_key is not None and msg.key > record.state_key:
                    self._advance_state(record, msg)
                self._deliver(sub, (msg,), {})
            except Exception as exc:  # see dispatch()
                self.failed(msg, exc)
                return
        if again:
            self._resync_sub(sub)

    def _sync_frames(self, sub: Subscription, sync: Sync) -> list[tuple[dict, Position]]:
        pos, mode, channel = sync.position, sub.mode, sub.channel
        frames: list[tuple[dict, Position]] = []
        with_state = sync.state is not None and mode in STATEFUL_MODES
        if sub.conn.transport == WS and not sync.resync:
            extra: dict[str, Any] = {"mode": sub.mode}
            if with_state and not sync.resumed:
                extra["state"] = sync.state
            at, at_seq = pos, sync.seq
            if sync.since is not None and not sync.gap and sync.messages:
                at, at_seq = sync.since, sync.messages[0].seq - 1  # the catch-up continues from the client's position
            frames.append((control_body("subscribed", channel, at, at_seq, **extra), at))
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
        """Hand messages read from the live streams to the matching subscriptions, in stream order.

        A message whose dispatch raises is skipped, its channel resynchronised and ``on_error`` told; the
        other messages go on as if it had not been there."""
        self._stamp()
        for msg in messages:
            try:
                self._dispatch(msg)
            except Exception as exc:  # one bad message must not take the rest of the batch with it
                self.failed(msg, exc)
        self._timer()

    def _dispatch(self, msg: Message) -> None:
        record = self.channels.get(msg.channel)
        if record is None:
            return
        if record.epoch == msg.epoch and msg.key <= record.last:
            return  # already seen (a reader restarted from an older id)
        hole = bool(record.epoch) and (record.epoch != msg.epoch or msg.seq != record.seq + 1)
        record.epoch, record.seq, record.last = msg.epoch, msg.seq, msg.key
        for sub in record.subs.values():
            if sub.buffer is not None:
                sub.buffer.append(msg)  # the handshake's start() checks it against what its read saw
        if hole:
            # Something between the last message and this one never reached us (the live stream was
            # trimmed past a lagging reader, or Redis lost its data): never a silent hole.
            self._resync_channel(record, msg.channel)
            return
        if record.state_key is not None:
            self._advance_state(record, msg)
        if self.throttle is None:
            self._send(Outgoing(msg.channel, (msg,)))
            return
        pokes: list[int] = []
        if self.throttle.spreads(msg.channel):
            pokes = [cid for cid, s in record.subs.items() if s.mode == "poke" and _live(s)]
        for out in self.throttle.offer(msg, pokes):
            self._send(out)

    def failed(self, msg: Message | None, exc: Exception) -> None:
        """Count a message skipped because it raised `exc` (None: an entry that was not even a message) and
        resynchronise its channel: its subscribers did not get it, and must not miss it silently."""
        self.dispatch_errors += 1
        record = self.channels.get(msg.channel) if msg is not None else None
        if msg is not None and record is not None:
            self._resync_channel(record, msg.channel)
        if self.on_error is not None:
            self.on_error(msg, exc)

    def resync(self, channel: str) -> None:
        """Snapshot/reset every subscription of ``channel``: messages of it may have been lost on the way to us
        (the reader fell behind its shard's live stream)."""
        record = self.channels.get(channel)
        if record is not None:
            self._resync_channel(record, channel)

    def due(self) -> float | None:
        """When :meth:`flush` has something to send (None: nothing is held)."""
        return self.throttle.due() if self.throttle is not None else None

    def flush(self) -> None:
        """Send what the throttle held and is now due: ended coalescing windows, spread pokes."""
        self._stamp()
        if self.throttle is not None:
            for out in self.throttle.flush():
                self._send(out)
        self._timer()

    def _stamp(self) -> None:
        if self.clock is not None:
            self.now = self.clock()

    def _timer(self) -> None:
        due = self.due()
        if due is not None and self.on_timer is not None:
            self.on_timer(due)

    def _send(self, out: Outgoing) -> None:
        record = self.channels.get(out.channel)
        if record is None:
            return
        if out.conn is None and len(out.messages) == 1:
            self._broadcast(record, out.messages[0], out.pokes)
            return
        cache: dict[tuple, Any] = {}  # frames of this delivery, shared by every subscription that gets them
        if out.conn is not None:
            sub = record.subs.get(out.conn)
            if sub is not None and _live(sub) and sub.mode == "poke":
                self._deliver(sub, out.messages, cache, spread=True)
            return
        for sub in list(record.subs.values()):
            if _live(sub) and (out.pokes or sub.mode != "poke"):
                self._deliver(sub, out.messages, cache)

    def _broadcast(self, record: ChannelRecord, msg: Message, pokes: bool) -> None:
        """One message to every live subscription of its channel: the hot path of fan-out. The same as
        :meth:`_deliver` for a single message, without the per-subscription lists and tuples (bench/)."""
        key, epoch, seq, channel, ts = msg.key, msg.epoch, msg.seq, msg.channel, msg.ts
        position, prev, at = msg.position, seq - 1, self.now  # every subscription must have got `prev` last
        sse_frames: dict[str, bytes] = {}  # mode -> frame (no tuple keys: no allocation per subscription)
        ws_frames: dict[str, bytes] = {}
        n = 0
        for sub in list(record.subs.values()):
            if sub.buffer is not None or (sub.mode == "poke" and not pokes):
                continue
            if sub.epoch == epoch:
                if key <= sub.last:
                    continue
                if sub.seq != prev:
                    self._hole(record, sub)
                    continue
            elif sub.epoch or sub.seq != prev:
                self._hole(record, sub)
                continue
            sub.last, sub.seq, sub.epoch = key, seq, epoch
            conn = sub.conn
            frames = sse_frames if conn.transport == SSE else ws_frames
            frame = frames.get(sub.mode)
            if frame is None:
                frame = frames[sub.mode] = self._frame(sub, (msg,), seq, {})[0]
            conn.push(frame, channel, position, ts, at)
            n += 1
        if n:
            self.delivered += n
            self.delivered_by_channel[channel] = self.delivered_by_channel.get(channel, 0) + n

    def _deliver(self, sub: Subscription, messages: Sequence[Message], cache: dict, spread: bool = False) -> None:
        fresh = [m for m in messages if not (m.epoch == sub.epoch and m.key <= sub.last)]
        if not fresh:
            return
        first_seq = fresh[0].seq
        if (sub.epoch and any(m.epoch != sub.epoch for m in fresh)) or (not spread and first_seq != sub.seq + 1):
            self._hole(self.channels[sub.channel], sub)
            return
        if spread and sub.seq and fresh[0].epoch == sub.epoch:
            first_seq = sub.seq + 1  # a spread poke stands for every change since the last one it got
        last = fresh[-1]
        sub.last, sub.seq, sub.epoch = last.key, last.seq, last.epoch
        for frame, msg, ts in self._frames(sub, fresh, first_seq, cache):
            sub.conn.push(frame, sub.channel, msg.position, ts, self.now)
            self.delivered += 1
            self.delivered_by_channel[sub.channel] = self.delivered_by_channel.get(sub.channel, 0) + 1

    def _frames(
        self, sub: Subscription, fresh: list[Message], first_seq: int, cache: dict
    ) -> list[tuple[bytes, Message, float]]:
        """The frames of `fresh` (oldest first) for `sub`'s mode: one per message unless coalesced, where
        `event` keeps every message, `state` sends the latest state, `poke` one poke, and `diff` the composed
        merge patch (more than one frame only where RFC 7386 cannot say two patches as one)."""
        mode = sub.mode
        if mode == "event" or (len(fresh) == 1 and first_seq == fresh[0].seq):
            return [self._frame(sub, (m,), m.seq, cache) for m in fresh]
        if mode != "diff":
            return [self._frame(sub, fresh, first_seq, cache)]
        groups = cache.get(("groups", fresh[0].key, fresh[-1].key))
        if groups is None:
            groups = cache[("groups", fresh[0].key, fresh[-1].key)] = _diff_groups(fresh)
        return [self._frame(sub, group, group[0].seq, cache, change) for group, change in groups]

    def _frame(
        self, sub: Subscription, group: Sequence[Message], first_seq: int, cache: dict, change: Any = None
    ) -> tuple[bytes, Message, float]:
        last, transport = group[-1], sub.conn.transport
        key = (sub.mode, transport, first_seq, last.key)
        frame = cache.get(key)
        if frame is None:
            state = self.channels[sub.channel].state_json if sub.mode == "state" else None
            if len(group) == 1 or change is None:
                body = message_body(last, sub.mode, state, seq_from=first_seq)
            else:
                body = message_body(last, "poke", seq_from=first_seq)  # the fields every mode has
                if last.data is not None:
                    body["data"] = orjson.Fragment(last.data)
                if change[0] is not None:
                    body[change[0]] = change[1]
            frame = cache[key] = self._encode(transport, body)
        return frame, last, group[0].ts

    def _advance_state(self, record: ChannelRecord, msg: Message) -> None:
        if record.state_key is not None and msg.key <= record.state_key:
            return
        if msg.kind == "diff" and msg.change is not None:
            record.state = merge.apply(record.state, orjson.loads(msg.change))
            record.state_json = orjson.dumps(record.state)
        elif msg.kind == "state" and msg.change is not None:
            record.state, record.state_json = orjson.loads(msg.change), msg.change
        record.state_key = msg.key

    def _hole(self, record: ChannelRecord, sub: Subscription) -> None:
        """`sub` got a message that is not the next after what it last got (its snapshot included): those
        between were lost on the way to the hub. Never a silent hole."""
        if sub.channel in sub.conn.resync:
            return  # it is waiting for its resync already (what it missed meanwhile was dropped for it)
        if sub.mode == "state":
            self._resync_channel(record, sub.channel)  # the hub's copy of the state missed them too
        else:
            self._resync_sub(sub)

    def _resync_channel(self, record: ChannelRecord, channel: str) -> None:
        record.state = record.state_json = record.state_key = None
        if self.throttle is not None:
            self.throttle.forget(channel)  # what it holds is from before the hole; the resync covers it
        for sub in list(record.subs.values()):
            self._resync_sub(sub)

    def _resync_sub(self, sub: Subscription) -> None:
        conn = sub.conn
        if sub.channel in conn.resync:
            return
        conn.resync.add(sub.channel)
        conn.wake()

    def hold(self, sub: Subscription) -> None:
        """A resync's step 1 (see the module docstring): buffer live messages from now, then read, then start().
        The read covers every resync asked for until now; one asked for during it is done after it."""
        sub.conn.resync.discard(sub.channel)
        if sub.buffer is None:
            sub.buffer = []

    def _encode(self, transport: str, body: dict) -> bytes:
        self.frames_encoded += 1
        payload = dumps(body)
        return sse_frame(body["type"], payload) if transport == SSE else ws_text_frame(payload)

    # -- budgets and stuck connections ----------------------------------------------------------------------
    def set_budget(self, max_frames: int, max_bytes: int) -> None:
        """New per-connection queue bounds, for every connection (a queue over them is cut at its next push)."""
        for conn in self.connections.values():
            conn.max_frames, conn.max_bytes = max_frames, max_bytes

    def stuck(self, now: float, timeout: float) -> list[Connection]:
        """Connections in one socket write for longer than `timeout` seconds: the peer stopped reading."""
        return [c for c in self.connections.values() if c.writing_since is not None and now - c.writing_since > timeout]

    # -- introspection --------------------------------------------------------------------------------------
    def subscriber_counts(self) -> dict[str, int]:
        return {channel: len(record.subs) for channel, record in self.channels.items()}

    def take_counts(self) -> dict[tuple[str, str], int]:
        """What the hub and its throttle counted since the last call: (counter, channel) -> n."""
        counts = self.throttle.take_counts() if self.throttle is not None else {}
        for conn in self.connections.values():
            if conn.drops:
                drops, conn.drops = conn.drops, {}
                for channel, n in drops.items():
                    counts[("dropped", channel)] = counts.get(("dropped", channel), 0) + n
        return counts


def _live(sub: Subscription) -> bool:
    """Not in a handshake or resync read (those buffer), nor waiting for a resync (that drops)."""
    return sub.buffer is None and sub.channel not in sub.conn.resync


def _diff_groups(messages: list[Message]) -> list[tuple[list[Message], tuple[str | None, Any]]]:
    """`messages` cut into runs whose changes compose into one: (run, (body key, change)) with key "diff" (a
    merge patch), "state" (a full state: a state publish in the run replaces all before it) or None (no change)."""
    groups: list[tuple[list[Message], tuple[str | None, Any]]] = []
    run: list[Message] = []
    kind: str | None = None
    value: Any = None
    for msg in messages:
        if msg.change is not None and msg.kind in STATEFUL_MODES:
            change = orjson.loads(msg.change)
            if msg.kind == "state":
                kind, value = "state", change
            elif kind is None:
                kind, value = "diff", change
            elif kind == "state":
                value = _apply(value, change)
            else:
                composed = _compose(value, change)
                if composed is None:
                    # No one patch says both (or `change` is the null patch, which compose() also reports
                    # as None): this frame ends here and the next starts with `msg`.
                    groups.append((run, (kind, value)))
                    run, value = [], change
                else:
                    value = composed
        run.append(msg)
    groups.append((run, (kind, value)))
    return groups


def _compose(first: Any, second: Any) -> Any:
    if second is None:
        return None
    try:
        return merge.compose(first, second)
    except merge.MergeError:
        return None  # too deep to fold: sent as it came


def _apply(state: Any, patch: Any) -> Any:
    try:
        return merge.apply(state, patch)
    except merge.MergeError:
        return state
