"""One connection's protocol, for every front: events in, actions out. Pure: the front owns the socket, Redis
and the clock (h11's way: the session never touches a socket or reads the time).

The front runs one loop per connection, the same for SSE and WebSocket::

    session = Session(conn, hub, settings, grant, now)
    while True:
        action = session.next(now, owed=sink.owed)      # owed: the sink holds the rest of an unfinished write
        if isinstance(action, Write): sink.write(action.data)
        elif action is RESYNC: relay.resync(conn)        # reads Redis: snapshot/reset the channels it names
        elif isinstance(action, Wait):                   # sleep until action.deadline, or until woken
            if timed_out: session.timer_fired()
            for raw in client_frames: act on session.receive(raw, now)  # WebSocket only
        elif isinstance(action, Close): close with action.code and action.reason (SSE: write action.data)

An SSE stream is made once its channels are subscribed, and `stream()` queues its `ready` event; its first
Write is the body's head (the `retry:` line), which the front may need to write with the response headers.
`receive` queues its replies on the connection (they go out with the next Write) and may ask for what needs
the front: a Subscribe (a Redis read), an Authenticate (the front checks the token, then hands its verdict to
`authenticate`, which decides: authorized, or a Close), or a Close. Refusals are decided here too: `admission`
(a WebSocket at its upgrade), `busy` (the 503 body of an SSE request, the close reason), `STORE_DOWN`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import orjson

from sidecar.core.connection import SSE, WS, Connection
from sidecar.core.limits import TokenBucket
from sidecar.core.protocol import (
    SSE_KEEPALIVE,
    WS_PING,
    Position,
    ProtocolError,
    dumps,
    parse_client_frame,
    parse_cursor,
    sse_frame,
    sse_id_line,
    sse_retry,
    stream_key,
    validate_channel,
    validate_mode,
    ws_text_frame,
)

# RFC 6455 section 7.4.1 close codes.
CLOSE_UNSUPPORTED = 1003
CLOSE_INVALID = 1007
CLOSE_POLICY = 1008
CLOSE_TRY_AGAIN = 1013
CLOSE_UNAUTHORIZED = 3000  # IANA WebSocket close code registry: "Unauthorized"

FORBIDDEN = "the token does not grant this channel"
TOKEN_EXPIRED = orjson.dumps({"type": "error", "code": "token-expired", "message": "reconnect with a fresh token"})


def busy(retry: float) -> tuple[bytes, str, str]:
    """A refused connection: the 503's JSON body, the WebSocket close reason (RFC 6455: <= 123 bytes; clients
    read its "retry in N ms"), and the 503's Retry-After (whole seconds, rounded up)."""
    ms = max(1, round(retry * 1000))
    reason = f"too many connections; retry in {ms} ms"
    body = orjson.dumps({"error": "busy", "message": reason, "retry_ms": ms})
    return body, reason, str(max(1, math.ceil(retry)))


class Grant(Protocol):
    @property
    def expires(self) -> float | None: ...

    def allows(self, channel: str) -> bool: ...
    def expired(self, now: float) -> bool: ...
    def wait(self, longest: float, now: float) -> float: ...


class Limits(Protocol):  # sidecar.config.Settings
    @property
    def keepalive(self) -> float: ...
    @property
    def auth_timeout(self) -> float: ...
    @property
    def subscribe_rate(self) -> float: ...
    @property
    def subscribe_burst(self) -> int: ...
    @property
    def max_frame_bytes(self) -> int: ...
    @property
    def max_channels(self) -> int: ...
    @property
    def sse_retry_ms(self) -> int: ...


class Hub(Protocol):
    def unsubscribe(self, conn: Connection, channel: str) -> None: ...


@dataclass(frozen=True, slots=True)
class Write:
    """Write `data` (may be empty: only what the sink owes). `frames`: it holds queued frames (count a write)."""

    data: bytes
    frames: bool = False


@dataclass(frozen=True, slots=True)
class Wait:
    """Sleep until `deadline` (the front's clock) or until woken; call `timer_fired` if the deadline came."""

    deadline: float


@dataclass(frozen=True, slots=True)
class Close:
    """End the connection: a WebSocket with this close code and reason; an SSE stream after writing `data`."""

    code: int
    reason: str
    data: bytes = b""


class _Resync:
    def __repr__(self) -> str:
        return "RESYNC"


RESYNC = _Resync()  # read Redis for the channels in conn.resync (the relay's resync), then ask again


@dataclass(frozen=True, slots=True)
class Subscribe:
    """Subscribe the connection to `channel` (registers, reads Redis, starts: the relay's subscribe)."""

    channel: str
    mode: str
    since: Position | None


@dataclass(frozen=True, slots=True)
class Authenticate:
    """The client sent a token: check it and admit the connection, then call `authorized`, or Close."""

    token: str | None


Action = Write | Wait | Close | _Resync
Request = Subscribe | Authenticate | Close

STORE_DOWN = Close(CLOSE_TRY_AGAIN, "store unavailable, retry shortly")  # a WebSocket's Redis read failed


def admission(retry: float | None) -> Close | None:
    """The admission verdict of a WebSocket (the throttle's retry hint, None: admitted) as its close, if any:
    1013 "try again later" (RFC 6455 section 7.4.1), saying when."""
    return None if retry is None else Close(CLOSE_TRY_AGAIN, busy(retry)[1])


class Session:
    """One connection's deadlines (keepalive, auth, token expiry), its writes and, for a WebSocket, its client
    frames: auth, subscribe (rate-limited), unsubscribe, ping."""

    __slots__ = ("conn", "hub", "limits", "grant", "auth_deadline", "subscribes", "keepalive", "idle", "head")

    def __init__(self, conn: Connection, hub: Hub, limits: Limits, grant: Grant | None, now: float) -> None:
        self.conn = conn
        self.hub = hub
        self.limits = limits
        self.grant = grant  # None until an auth frame brings a valid token (WebSocket only)
        self.auth_deadline = now + limits.auth_timeout
        # Made at the first subscribe (an SSE stream never has one): a full bucket then is the same bucket.
        self.subscribes: TokenBucket | None = None
        self.keepalive = SSE_KEEPALIVE if conn.transport == SSE else WS_PING
        self.idle = False  # the last wait ran to its deadline: a keepalive is due if nothing else is written
        self.head = b""  # what the first Write sends before any frame (an SSE stream's `retry:` line)

    def stream(self, channels: list[str], mode: str, jitter: float) -> None:
        """An SSE stream whose channels are subscribed: queue its `ready` event (after the subscribe's frames,
        with the cursor as its `id:`), and start its body with `retry:` (the SSE spec's reconnection time),
        `sse_retry_ms` times 1 + `jitter` (the front's random number in [0, 1)): no synchronized reconnects."""
        ready = orjson.dumps({"type": "ready", "channels": channels, "mode": mode})
        self.conn.push(sse_id_line(self.conn.cursor()) + sse_frame("ready", ready))
        self.head = sse_retry(int(self.limits.sse_retry_ms * (1.0 + jitter)))

    # -- the loop -------------------------------------------------------------------------------------------
    def next(self, now: float, owed: bool = False) -> Action:
        """What to do now. `owed`: the sink has the rest of a write to finish (or found its peer gone)."""
        conn = self.conn
        if self.head:  # written on its own: the front may have to send it with the response's headers
            head, self.head = self.head, b""
            return Write(head)
        if conn.transport == WS:  # a WebSocket closes on its deadline before writing anything more
            close = self._deadline(now)
            if close is not None:
                return close
        if conn.resync:
            return RESYNC
        frames = conn.drain()
        if frames or owed:
            self.idle = False
            return Write(b"".join(frames), bool(frames))
        if conn.transport == SSE:  # a stream writes what it has, then ends on the token's expiry
            close = self._deadline(now)
            if close is not None:
                return close
        if self.idle:  # idle: keep intermediaries from closing us, and learn if the peer left
            self.idle = False
            return Write(self.keepalive)
        if self.grant is None:
            return Wait(now + max(0.0, min(self.limits.keepalive, self.auth_deadline - now)))
        return Wait(now + self.grant.wait(self.limits.keepalive, now))

    def timer_fired(self) -> None:
        """The last Wait reached its deadline without a wake."""
        self.idle = True

    def _deadline(self, now: float) -> Close | None:
        # A connection never outlives its token: the client reconnects (and resumes exactly) with a fresh one,
        # or (WebSocket) sends a fresh one as an auth frame before this one expires.
        if self.grant is None:
            if now >= self.auth_deadline:
                return Close(CLOSE_UNAUTHORIZED, f"no token within {self.limits.auth_timeout:g} s")
        elif self.grant.expired(now):
            data = sse_frame("error", TOKEN_EXPIRED) if self.conn.transport == SSE else b""
            return Close(CLOSE_UNAUTHORIZED, "the token has expired", data)
        return None

    # -- client frames (WebSocket) --------------------------------------------------------------------------
    def receive(self, raw: str | bytes, now: float) -> Request | None:
        """A client frame. Replies are queued on the connection; what the front must do is returned."""
        try:
            frame = parse_client_frame(raw, self.limits.max_frame_bytes)
        except ProtocolError as exc:
            code = CLOSE_UNSUPPORTED if exc.code == "bad-frame" and isinstance(raw, bytes) else CLOSE_INVALID
            return Close(code, exc.message)
        op = frame["op"]
        try:
            if op == "subscribe":
                return self._subscribe(frame, now)
            if op == "unsubscribe":
                channel = validate_channel(frame.get("channel"))
                self.hub.unsubscribe(self.conn, channel)
                self.reply({"type": "unsubscribed", "channel": channel})
            elif op == "ping":
                self.reply({"type": "pong", "ts": now * 1000})
            elif op == "auth":
                token = frame.get("token")
                return Authenticate(token if isinstance(token, str) else None)
            else:
                raise ProtocolError("unknown-op", "op must be auth, subscribe, unsubscribe or ping")
        except ProtocolError as exc:
            self.error(exc, frame.get("channel"))
        return None

    def error(self, exc: ProtocolError, channel: object = None) -> None:
        """Queue an error reply (also for a Subscribe the front could not carry out)."""
        body = {"type": "error", "code": exc.code, "message": exc.message}
        if isinstance(channel, str):
            body["channel"] = channel[:200]
        self.reply(body)

    def authenticate(self, verdict: Grant | str, admit: Callable[[], float | None]) -> Close | None:
        """The front's verdict on an Authenticate's token: its grant, or why it is refused (the close reason).
        A valid token then needs `admit()` (the admission verdict, asked only for a valid token: None or the
        retry hint), and holds from now on; otherwise the Close to end the socket with."""
        if isinstance(verdict, str):
            return Close(CLOSE_UNAUTHORIZED, verdict)
        close = admission(admit())
        if close is None:
            self.authorized(verdict)
        return close

    def authorized(self, grant: Grant) -> None:
        """The token of an Authenticate is valid and the connection admitted: it holds from now on."""
        self.grant = grant
        for channel in [c for c in self.conn.subs if not grant.allows(c)]:  # a fresh token may grant less
            self.hub.unsubscribe(self.conn, channel)
            self.reply({"type": "error", "code": "forbidden", "channel": channel, "message": FORBIDDEN})
        self.reply({"type": "authorized", "expires": grant.expires})

    def reply(self, body: dict) -> None:
        self.conn.push(ws_text_frame(dumps(body)))

    def _subscribe(self, frame: dict, now: float) -> Subscribe:
        if self.subscribes is None:
            self.subscribes = TokenBucket(self.limits.subscribe_rate, self.limits.subscribe_burst, now)
        wait = self.subscribes.take(now)
        if wait:
            raise ProtocolError("rate-limited", f"too many subscribes; retry in {wait:.2f} s")
        channel = validate_channel(frame.get("channel"))
        if self.grant is None:
            raise ProtocolError("unauthorized", 'send {"op": "auth", "token": ...} first')
        if not self.grant.allows(channel):
            raise ProtocolError("forbidden", FORBIDDEN)
        mode = validate_mode(frame.get("mode", "diff"))
        since = frame.get("since")
        position = None
        if since is not None:
            epoch = frame.get("epoch", "")
            if not isinstance(since, str) or not isinstance(epoch, str):
                raise ProtocolError("bad-since", '"since" is a stream id and "epoch" a string')
            stream_key(since)
            position = Position.parse(f"{since}~{epoch}")
        limit = self.limits.max_channels
        if channel not in self.conn.subs and len(self.conn.subs) >= limit:
            raise ProtocolError("too-many-channels", f"at most {limit} channels per connection")
        return Subscribe(channel, mode, position)



def sse_request(
    channels: Sequence[object], mode: object, cursor: str | None, max_channels: int,
    authorize: Callable[[list[str]], None],
) -> tuple[list[str], str, dict[str, Position]]:  # fmt: skip
    """The checks of an SSE request (`?channel=` repeated, `?mode=`, the cursor of `Last-Event-ID`): its sorted
    channels, its mode and where each resumes. ProtocolError for a bad one; `authorize` (the front's grant
    check, all or nothing) runs on the valid channels before the cursor is read."""
    names = sorted({validate_channel(c) for c in channels})
    if not names:
        raise ProtocolError("no-channel", "give at least one ?channel=")
    if len(names) > max_channels:
        raise ProtocolError("too-many-channels", f"at most {max_channels} channels per connection")
    mode = validate_mode(mode)
    authorize(names)
    return names, mode, parse_cursor(cursor, names) if cursor else {}
