"""The asyncio front's WebSocket: `/ws`, and the uvicorn protocol that carries it (sidecar/asgi/__init__.py)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import redis
from starlette.requests import Request
from starlette.responses import Response
from starlette.websockets import WebSocket, WebSocketDisconnect
from uvicorn.protocols.utils import ClientDisconnected
from uvicorn.protocols.websockets.wsproto_impl import WSProtocol as _UvicornWSProtocol
from wsproto.connection import ConnectionState
from wsproto.events import CloseConnection
from wsproto.handshake import H11Handshake

from sidecar.asgi.front import (
    HANDSHAKE_DONE,
    Front,
    LeanDeque,
    LeanEvent,
    LeanQueue,
    Wake,
    canceller,
    error,
    front_of,
    stand_in,
    woken,
)
from sidecar.asgi.writer import Sink, offer, outlet_of
from sidecar.auth import AuthError, Grant
from sidecar.config import Settings
from sidecar.core.connection import WS
from sidecar.core.http_api import head_fields, upgrade_refusal
from sidecar.core.protocol import ProtocolError
from sidecar.core.session import (
    STORE_DOWN,
    Authenticate,
    Close,
    Session,
    Subscribe,
    Wait,
    Write,
    admission,
)
from sidecar.relay import Relay, drive_async

log = logging.getLogger(__name__)


async def websocket(ws: WebSocket) -> None:
    """The WebSocket: the same checks and Session as sidecar/ws.py (uvicorn checked the upgrade itself)."""
    front = front_of(ws)
    settings = front.settings
    if not front.auth.origin_allowed(ws.headers.get("origin"), ws.headers.get("host")):
        await _deny(ws, AuthError(403, "forbidden-origin", "WebSockets from this origin are not allowed"))
        return
    try:
        grant = await front.grant(ws, required=False)
    except AuthError as exc:
        await _deny(ws, exc)
        return
    relay = await front.ready()
    # A socket without a token yet is admitted as a connection only when its auth frame brings one (_request).
    refused = admission(relay.control.admit() if grant is not None else relay.control.admit_unauthenticated())
    await ws.accept()
    if refused is not None:
        await ws.close(refused.code, refused.reason)
        return
    wake = Wake()
    conn = relay.connection(WS, wake.set)
    if grant is None:
        relay.control.unauthenticated.add(conn.id)
    session = Session(conn, relay.hub, settings, grant, time.time())
    inbox: list[str | bytes] = []  # lists, not deques or Events: every idle socket holds these
    gone = False
    task = asyncio.current_task()
    conn.abort = canceller(task)  # a stuck write (control.py)

    async def receive() -> None:
        nonlocal gone
        try:
            while True:
                message = await ws.receive()
                if message["type"] == "websocket.disconnect":
                    break
                raw = message.get("text")
                inbox.append(raw if raw is not None else message.get("bytes") or b"")
                wake.set()
        finally:
            gone = True
            wake.set()

    receiver = asyncio.create_task(receive())
    close: Close | None = None
    # Queued frames go to the transport in the writer's pass (sidecar/asgi/writer.py); we write the rest.
    outlet = outlet_of(ws.scope)
    sink: Sink | None = None
    if outlet is not None and front.writer is not None:
        sink = front.writer.sink(conn, outlet, wake.set, relay.stats.observe_write)
        # A stuck write: the task's drain then ends, as a disconnect.
        conn.abort = outlet.abort if isinstance(outlet, _WSOutlet) else outlet.transport.abort
    try:
        while not gone and close is None:
            if sink is not None and sink.paused:  # flow control: the frames wait in the queue, under its bounds
                with conn.writing(time.monotonic()):  # a drain that lasts is a stuck peer (control.py)
                    await sink.drained()
                continue
            action = session.next(time.time())
            if isinstance(action, Write):
                if sink is not None:
                    sink.write(action.data)
                else:
                    with conn.writing(time.monotonic()):
                        await _send_frames(ws, action.data)
                if action.frames:
                    relay.stats.observe_write(conn)
            elif isinstance(action, Wait):
                if not await woken(wake, action.deadline - time.time(), front.ticks):
                    session.timer_fired()  # its keepalive is a ping frame (dropped on the ASGI send path)
                wake.clear()
                while inbox and close is None:
                    close = await _request(front, relay, session, session.receive(inbox.pop(0), time.time()))
            elif isinstance(action, Close):
                close = action
            else:
                await drive_async(relay.resyncing(conn), front.runtime)  # type: ignore[arg-type]
        if sink is not None:
            sink.close()  # no more writes from the pass: a close frame must be the last thing sent
        if close is not None:
            await ws.close(close.code, close.reason)
    except redis.RedisError:
        if sink is not None:
            sink.close()
        with contextlib.suppress(Exception):
            await ws.close(STORE_DOWN.code, STORE_DOWN.reason)
    except (WebSocketDisconnect, OSError, RuntimeError):
        pass  # the client went away (Starlette raises RuntimeError for a send after the close)
    finally:
        if sink is not None:
            sink.close()
        receiver.cancel()
        conn.abort = None
        relay.control.unauthenticated.discard(conn.id)
        relay.hub.disconnect(conn)


async def not_websocket(_request: Request) -> Response:
    return error(400, "not-websocket", "this endpoint speaks WebSocket only (RFC 6455)")


async def _deny(ws: WebSocket, exc: AuthError) -> None:
    """Refuse the upgrade with the HTTP status and JSON body the Flask front gives."""
    if "websocket.http.response" in ws.scope.get("extensions", {}):
        await ws.send_denial_response(error(exc.status, exc.code, exc.message, **exc.headers))
    else:
        await ws.close(1008, exc.message)


FRAMES = "sidecar.websocket.frames"  # the ASGI extension of WSProtocol below: pre-built frames in one send


async def _send_frames(ws: WebSocket, data: bytes) -> None:
    """The hub's WebSocket frames are whole RFC 6455 frames (shared by every socket on the gevent front). On
    WSProtocol (its FRAMES extension) they go to the transport as they are, one write per Write action. ASGI
    itself sends messages, so elsewhere each frame's payload goes as one message, and ping frames are left to the
    server's own."""
    if FRAMES in ws.scope.get("extensions", {}):
        await ws.send({"type": "websocket.send", FRAMES: data})
        return
    i, n = 0, len(data)
    while i < n:
        opcode, size = data[i] & 0x0F, data[i + 1] & 0x7F
        i += 2
        if size == 126:
            size, i = int.from_bytes(data[i : i + 2], "big"), i + 2
        elif size == 127:
            size, i = int.from_bytes(data[i : i + 8], "big"), i + 8
        payload, i = data[i : i + size], i + size
        if opcode == 0x1:
            await ws.send({"type": "websocket.send", "text": payload.decode()})
        elif opcode == 0x2:
            await ws.send({"type": "websocket.send", "bytes": payload})


async def _request(front: Front, relay: Relay, session: Session, asked: object) -> Close | None:
    """Carry out what a client frame asked for (sidecar/ws.py's _request, with the Redis read awaited)."""
    if isinstance(asked, Subscribe):
        since = {asked.channel: asked.since} if asked.since else {}
        try:
            steps = relay.subscribing(session.conn, [asked.channel], asked.mode, since)
            await drive_async(steps, front.runtime)  # type: ignore[arg-type]
        except ProtocolError as exc:
            session.error(exc, asked.channel)
    elif isinstance(asked, Authenticate):
        verdict: Grant | str
        try:
            verdict = front.auth.grant(asked.token)
        except AuthError as exc:
            verdict = exc.message
        # Its first token: from now on it counts as a connection (or it is refused, the replica being full).
        return session.authenticate(verdict, lambda: relay.control.authorised(session.conn.id))
    return asked if isinstance(asked, Close) else None


_BEFORE_CLOSE = (ConnectionState.CONNECTING, ConnectionState.OPEN)


class _WSOutlet:
    """The WebSocket's transport for the writer's pass (sidecar/asgi/writer.py's Outlet): writable once the
    handshake is sent, until a close frame is sent or the connection is lost."""

    __slots__ = ("protocol", "transport", "ended")

    def __init__(self, protocol: WSProtocol) -> None:
        self.protocol = protocol
        self.transport: asyncio.WriteTransport = protocol.transport
        # Set by the protocol wherever the socket can end (WSProtocol.note_end): gone() is read for every socket at
        # every message of the fan-out, and asking wsproto for its state there was ~9% of it (docs/performance.md).
        self.ended = False

    def chunked(self) -> bool:
        return False

    def when_lost(self, callback: Callable[[], None] | None) -> None:
        raise NotImplementedError("a WebSocket's client leaving comes through its receive()")

    def paused(self) -> bool:
        return not self.protocol.writable.is_set()

    async def drained(self) -> None:
        await self.protocol.writable.wait()  # set again by connection_lost too

    def gone(self) -> bool:
        return self.ended

    def abort(self) -> None:
        """End a socket stuck in a write (the stuck check, control.py)."""
        self.ended = True
        self.transport.abort()


class WSProtocol(_UvicornWSProtocol):
    """uvicorn's wsproto protocol, answering a frame wsproto cannot parse (invalid UTF-8 in a text frame, say)
    with its close frame (1007) instead of dropping the connection: RFC 6455 section 7.1.7, and what the gevent
    front does. wsproto reports such a frame as a CloseConnection while the connection is still open (a real
    close from the client is REMOTE_CLOSING), and uvicorn then closed TCP without a close frame. For uvicorn's
    command line: `--ws sidecar.asgi:WSProtocol` (docs/deployment.md).

    Its FRAMES extension (offered only without permessage-deflate, which compresses each message itself): a
    `websocket.send` carrying FRAMES is written to the transport as it is, after uvicorn's own checks (flow
    control, disconnect, close sent): the relay's pre-built frames, one write for all frames of a Write action
    instead of one ASGI send, one wsproto encoding and one transport write per frame. Its `sidecar.direct` extension
    (under the same condition): the transport itself, for the writer's pass (sidecar/asgi/writer.py).

    It also refuses a malformed upgrade with the JSON errors of docs/protocol.md, as the Flask front does (wsproto
    answers some with an empty 400 and accepts others), and waits `close_after` seconds for the client's close
    frame instead of uvicorn's 10 (SIDECAR_CLOSE_TIMEOUT: `ws_protocol(settings)` is this class with the
    setting; the class itself has the setting's default)."""

    close_after = 2.0  # the default of SIDECAR_CLOSE_TIMEOUT
    _head_checked = False
    outlet: _WSOutlet | None = None

    def note_end(self) -> None:
        """Tell the outlet if the socket ended: a close frame sent or received (wsproto's state), the connection
        lost, or the transport closing. Called after every method of uvicorn's that can end it: those that take
        the socket's bytes, the app's sends, the keepalive's timeout, the server's shutdown, the app's end."""
        outlet = self.outlet
        if outlet is not None and not outlet.ended:
            closing = self.conn.state not in _BEFORE_CLOSE  # the outlet exists from the upgrade, before the accept
            outlet.ended = bool(self.disconnected or self.close_sent or closing or self.transport.is_closing())

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self.note_end()

    def shutdown(self) -> None:
        super().shutdown()
        self.note_end()

    def keepalive_timeout(self) -> None:
        super().keepalive_timeout()
        self.note_end()

    async def run_asgi(self) -> None:
        try:
            await super().run_asgi()
        finally:
            self.note_end()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.close_timeout = self.close_after
        # uvicorn uses its queue's put_nowait/get/empty and its event's is_set/set/clear/wait: lean stand-ins,
        # ~4 KB less per socket (sidecar/asgi/front.py).
        stand_in(self, "queue", asyncio.Queue, lambda _: LeanQueue())  # empty: nothing came yet
        stand_in(self, "writable", asyncio.Event, lambda event: LeanEvent(event.is_set()))

    def data_received(self, data: bytes) -> None:
        if not self._head_checked:  # uvicorn hands over the whole request head in the first call
            self._head_checked = True
            refused = upgrade_refusal(head_fields(data))
            if refused is not None:
                self.transport.write(refused.http_response())
                self.transport.close()
                return
        super().data_received(data)  # its events: a close, a message too big, a protocol error
        self.note_end()

    def handle_connect(self, event: Any) -> None:
        super().handle_connect(event)
        if not self.config.ws_per_message_deflate:
            self.scope["extensions"][FRAMES] = {}
            self.outlet = _WSOutlet(self)
            offer(self.scope, self.outlet)

    async def send(self, message: Any) -> None:
        frames = message.get(FRAMES)
        if frames is None or message["type"] != "websocket.send":
            try:
                await super().send(message)  # a close, a refusal
            finally:
                self.note_end()
            if message["type"] == "websocket.accept" and self.conn.connection is not None:
                # Accepted: wsproto's handshake (its h11 connection, its event deque) has nothing more to do, but
                # WSConnection keeps it for the socket's life (~2 KB); its events() only asks it for none.
                stand_in(self.conn, "handshake", H11Handshake, lambda _: HANDSHAKE_DONE)
                stand_in(self.conn.connection, "_events", deque, LeanDeque)  # append, popleft
            return
        await self.writable.wait()
        if self.disconnected or self.close_sent or self.conn.state != ConnectionState.OPEN:
            raise ClientDisconnected()
        if not self.transport.is_closing():
            self.transport.write(frames)

    def handle_close(self, event: CloseConnection) -> None:
        if not self.close_sent and self.conn.state == ConnectionState.OPEN:
            reason = (event.reason or "").encode()[:123].decode(errors="ignore")
            self.transport.write(self.conn.send(CloseConnection(event.code, reason)))
            self.close_sent = True
            self.queue.put_nowait({"type": "websocket.disconnect", "code": event.code, "reason": reason})
            self.transport.close()
            return
        super().handle_close(event)


def ws_protocol(settings: Settings) -> type[WSProtocol]:
    """WSProtocol waiting SIDECAR_CLOSE_TIMEOUT for a client's close frame (uvicorn takes a class, not settings)."""
    return type("WSProtocol", (WSProtocol,), {"close_after": settings.close_timeout})
