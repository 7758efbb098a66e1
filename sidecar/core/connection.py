"""One client connection: its subscriptions, its bounded outgoing queue, and the SSE cursor. Pure.

The hub (hub.py) fills the queue; the caller's writer drains it. A connection that falls behind its budget has
its backlog dropped and its channels marked for a resync (snapshot/reset), so it never grows memory.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

from sidecar.core.protocol import ZERO_KEY, Message, Position, StreamKey, encode_cursor, sse_id_line

NO_POSITION = Position()  # a channel's position before anything was queued for it

SSE, WS = "sse", "ws"


@dataclass(slots=True)  # one per subscription of every idle connection: no __dict__
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

    # One per idle connection: slots, not a __dict__ (docs/performance.md, RSS per idle connection).
    __slots__ = (
        "id", "transport", "wake", "max_frames", "max_bytes", "subs", "queue", "queued_channels", "queue_ts",
        "batch_ts", "queue_at", "batch_at", "queue_channel", "batch_channel", "queued_bytes", "positions", "sent",
        "resync", "dropped", "drops", "writing_since", "abort", "sse_frames",
    )  # fmt: skip
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
        # Frames only, and what the drop of a backlog needs beside them: the hot path allocates no tuples
        # (every container it makes is work for the cyclic GC, whose full passes stall every socket).
        self.queue: list[bytes] = []
        self.queued_channels: dict[str, int] = {}  # channel -> frames of it in the queue
        self.queue_ts = 0.0  # publish time (ms) of the oldest message queued; 0: none
        self.batch_ts = 0.0  # publish time (ms) of the oldest message in the last drained batch; 0: none
        # The same message's channel and when it was queued (the hub's clock), for the stats' stage histograms.
        self.queue_at = self.batch_at = 0.0
        self.queue_channel: str | None = None
        self.batch_channel: str | None = None
        self.queued_bytes = 0
        self.positions: dict[str, Position] = {}  # SSE cursor: position of the newest queued frame
        self.sent: dict[str, Position] = {}  # position of the newest frame handed to the socket
        self.resync: set[str] = set()  # channels whose backlog was dropped: snapshot/reset them
        self.dropped = 0  # frames dropped for slowness, ever
        self.drops: dict[str, int] = {}  # the same per channel, read and reset by the hub's owner
        self.writing_since: float | None = None  # when the socket write in progress began (see writing())
        self.abort: Callable[[], None] | None = None  # set by the caller: ends a socket stuck in a write
        self.sse_frames: SseFrames | None = None  # its hub's, shared by all its connections

    def cursor(self) -> str:
        return encode_cursor([self.positions.get(c, NO_POSITION) for c in sorted(self.subs)])

    def push(
        self, frame: bytes, channel: str | None = None, position: Position | None = None, ts: float = 0.0,
        at: float = 0.0,
    ) -> None:  # fmt: skip
        if channel is not None and channel in self.resync:
            return  # its backlog was dropped; the resync will bring it up to date
        if position is not None and channel is not None:
            self.positions[channel] = position
            if self.transport == SSE:
                shared = self.sse_frames
                if shared is None:
                    frame = sse_id_line(self.cursor()) + frame
                elif len(self.subs) == 1 and channel in self.subs:
                    # The fan-out's hot path: the frame the connection before this one got, read without a call.
                    if frame is shared.frame and position is shared.position:
                        frame = shared.out
                    else:
                        frame = shared(frame, position)
                else:
                    positions = self.positions
                    frame = shared.cursor(frame, tuple([positions.get(c, NO_POSITION) for c in sorted(self.subs)]))
        queue = self.queue
        was_empty = not queue
        queue.append(frame)
        if channel is not None:
            self.queued_channels[channel] = self.queued_channels.get(channel, 0) + 1
        if ts and not self.queue_ts:
            self.queue_ts, self.queue_at, self.queue_channel = ts, at, channel
        self.queued_bytes += len(frame)
        if len(self.queue) > self.max_frames or self.queued_bytes > self.max_bytes:
            self._drop_backlog()
        elif was_empty:
            self.wake()

    def drain(self) -> list[bytes]:
        """Everything queued, to be written in one go."""
        frames = self.queue
        self.batch_ts, self.batch_at, self.batch_channel = self.queue_ts, self.queue_at, self.queue_channel
        if not frames:
            return []
        self.queue = []
        self.queue_ts = self.queue_at = 0.0
        self.queued_channels.clear()
        # Whatever was queued is handed over now, so the newest queued position of each channel is sent.
        self.sent.update(self.positions)
        self.queued_bytes = 0
        return frames

    def writing(self, now: float) -> AbstractContextManager[None]:
        """Wrap each socket write: a write that lasts (the peer stopped reading) makes the connection stuck."""
        self.writing_since = now
        return self  # its own context (no allocation per write, no object per connection)

    def __enter__(self) -> None:
        return None

    def __exit__(self, *_: object) -> None:
        self.writing_since = None

    def _drop_backlog(self) -> None:
        # A slow consumer must not grow memory: drop what it has not read and resynchronise it instead.
        for channel, n in self.queued_channels.items():
            self.resync.add(channel)
            self.drops[channel] = self.drops.get(channel, 0) + n
        self.dropped += len(self.queue)
        self.queue.clear()
        self.queued_channels.clear()
        self.queue_ts = self.queue_at = 0.0
        self.queued_bytes = 0
        self.positions = dict(self.sent)
        # Nothing is held for these channels until the resync's read begins (Hub.hold): a peer that stopped
        # reading may keep its writer blocked for long, and holding live messages meanwhile grows without bound.
        self.wake()


class SseFrames:
    """SSE frames with their `id:` line, shared by the connections of a hub whose cursors are the same: a
    connection's cursor is its positions in the order of its sorted channels, so every connection with one channel
    gets the message's position alone, and connections with several channels at the same positions the same line.
    One frame at a time is enough: the deliveries of one frame come one after the other."""

    __slots__ = ("frame", "position", "out", "cursors_of", "cursors")
    MAX_CURSORS = 256

    def __init__(self) -> None:
        self.frame: bytes | None = None  # the one-channel entry: its frame, position, and the frame with its id line
        self.position = NO_POSITION
        self.out = b""
        self.cursors_of: bytes | None = None  # the frame of `cursors`: positions (in channel order) -> framed
        self.cursors: dict[tuple[Position, ...], bytes] = {}

    def __call__(self, frame: bytes, position: Position) -> bytes:
        """`frame` for a connection whose one channel is at `position`."""
        if frame is not self.frame or (position is not self.position and position != self.position):
            self.frame, self.position = frame, position
            self.out = sse_id_line(position.encode()) + frame
        return self.out

    def cursor(self, frame: bytes, positions: tuple[Position, ...]) -> bytes:
        """`frame` for a connection whose channels, sorted, are at `positions`."""
        if frame is not self.cursors_of:
            self.cursors_of, self.cursors = frame, {}
        out = self.cursors.get(positions)
        if out is None:
            out = sse_id_line(encode_cursor(list(positions))) + frame
            if len(self.cursors) < self.MAX_CURSORS:  # cursors that differ (per-user channels) share nothing:
                self.cursors[positions] = out  # held until the next frame, so a bounded few
        return out
