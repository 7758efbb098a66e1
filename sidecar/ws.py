"""The WebSocket route (the only flask_sock import).

One greenlet per socket waits on one event, set when the client sent a frame (simple-websocket's reader sets
`ws.event`) or when the writer's pass needs it (sidecar/writer.py: the rest of a partial write, a resync); it
answers the client's frames and writes what the pass could not. Queued frames are otherwise written by the
pass, one write per socket per turn of the event loop. flask-sock's `send` has no lock, so nothing else writes
to the socket (but simple-websocket's own pong/close replies).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import re
import socket
import time
from collections.abc import Callable
from typing import Any

import redis
from flask import Response, current_app, g, request
from flask_sock import Sock
from werkzeug.routing import WebsocketMismatch
from wsproto import ConnectionType, WSConnection
from wsproto.events import Request as WSRequest
from wsproto.extensions import PerMessageDeflate
from wsproto.utilities import RemoteProtocolError

from sidecar.app import error
from sidecar.auth import AuthError, Grant, presented_token
from sidecar.control import busy, socket_aborter
from sidecar.core.connection import WS, Connection
from sidecar.core.limits import TokenBucket
from sidecar.core.protocol import (
    WS_PING,
    Position,
    ProtocolError,
    dumps,
    parse_client_frame,
    stream_key,
    validate_channel,
    validate_mode,
    ws_text_frame,
)
from sidecar.writer import drop_read_buffer, writer

log = logging.getLogger(__name__)
sock = Sock()

# RFC 6455 section 7.4.1 close codes.
CLOSE_UNSUPPORTED = 1003
CLOSE_INVALID = 1007
CLOSE_POLICY = 1008
CLOSE_TRY_AGAIN = 1013
CLOSE_UNAUTHORIZED = 3000  # IANA WebSocket close code registry: "Unauthorized"


FORBIDDEN = "the token does not grant this channel"


class Closed(Exception):
    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def _closes_tcp(route: Callable[[Any], None]) -> Callable[[Any], None]:
    """After the route, the server ends the TCP connection itself (RFC 6455 section 5.5.1: once it has sent and
    received a close frame; section 7.1.1: the server closes first), at most `close_timeout` after its own close
    frame. simple-websocket works on a dup() of the socket under gevent.pywsgi, and its reader holds that
    descriptor until the client speaks or leaves, so the WSGI server's close alone does not end the connection."""

    @functools.wraps(route)
    def run(ws: Any) -> None:
        try:
            route(ws)
        finally:
            ws.thread.join(current_app.config["SETTINGS"].close_timeout)  # it ends on the client's close frame
            with contextlib.suppress(AttributeError, OSError):
                getattr(ws.sock, "_sock", ws.sock).shutdown(socket.SHUT_RDWR)  # the OS socket: FIN to the peer

    return run


@sock.route("/ws")
@_closes_tcp
def websocket(ws: Any) -> None:
    relay = current_app.extensions["relay"]
    settings = current_app.config["SETTINGS"]
    grant = g.get("grant")
    # Admission control: 1013 is "try again later" (RFC 6455 section 7.4.1). A socket without a token yet is
    # admitted as a connection only when its auth frame brings one (Session.authenticate).
    retry = relay.control.admit() if grant is not None else relay.control.admit_unauthenticated()
    if retry is not None:
        ws.close(reason=CLOSE_TRY_AGAIN, message=busy(retry)[1])
        _no_keepalive()
        return
    conn = relay.connection(WS, ws.event.set)
    if grant is None:
        relay.control.unauthenticated.add(conn.id)
    conn.abort = socket_aborter(ws.sock)
    session = Session(relay, settings, conn, current_app.extensions["auth"], grant)
    # Queued frames are written by the writer's pass (sidecar/writer.py); we write what it could not finish.
    direct = writer.attach(conn, ws.sock, False, ws.event.set, relay.stats.observe_write)
    drop_read_buffer(request.environ)  # simple-websocket reads the socket itself
    send = ws.sock.sendall if direct is None else direct.send_all
    try:
        try:
            while ws.connected:
                woke = ws.event.wait(session.wait(settings.keepalive, time.time()))
                ws.event.clear()
                while ws.input_buffer:
                    session.handle(ws.input_buffer.pop(0))
                session.check(time.time())
                if conn.resync:
                    relay.resync(conn)
                frames = conn.drain()
                if frames or (direct is not None and (direct.pending or direct.broken)):
                    with conn.writing(time.monotonic()):  # a write that lasts is a stuck peer (control.py)
                        send(b"".join(frames))
                    if frames:
                        relay.stats.observe_write(conn)
                elif not woke:
                    with conn.writing(time.monotonic()):
                        send(WS_PING)  # idle: keep intermediaries from closing us, learn if the peer left
        finally:
            conn.wake = ws.event.set  # no more direct writes: a close frame must be the last thing sent
    except Closed as closed:
        ws.close(reason=closed.code, message=closed.reason)
    except redis.RedisError:
        ws.close(reason=CLOSE_TRY_AGAIN, message="store unavailable, retry shortly")
    except OSError:
        pass  # the client went away
    finally:
        relay.control.unauthenticated.discard(conn.id)
        relay.hub.disconnect(conn)
        _no_keepalive()


def _no_keepalive() -> None:
    # gevent.pywsgi keeps the connection for a next request once the route returns, and would parse what the
    # client still sends (its close reply, the rest of a too-large frame) as HTTP and log it as an error. It
    # stops at a closed rfile, which it hands to upgrade requests as wsgi.input.
    if request.environ.get("SERVER_SOFTWARE", "").startswith("gevent"):
        stream: Any = request.environ.get("wsgi.input")
        with contextlib.suppress(AttributeError, OSError):
            getattr(stream, "rfile", stream).close()


NOT_WEBSOCKET = "this endpoint speaks WebSocket only (RFC 6455)"
KEY = re.compile(r"[A-Za-z0-9+/]{21}[AQgw]==")  # base64 of 16 bytes (RFC 6455 section 4.1)


@sock.bp.app_errorhandler(WebsocketMismatch)
def not_websocket(exc: WebsocketMismatch) -> Response:
    # Werkzeug's router takes a request without `Connection: Upgrade` + `Upgrade: websocket` for plain HTTP.
    if request.path != "/ws":
        return error(400, "bad-request", exc.description or "")  # a WebSocket to a plain HTTP route
    return error(400, "not-websocket", NOT_WEBSOCKET)


@sock.bp.before_request
def handshake() -> Response | None:
    """Checks before the upgrade (RFC 6455 section 4.2.2 lets a server refuse with any HTTP status): a plain GET
    or a malformed upgrade gets a 400, a version other than 13 a 426, a foreign Origin a 403 (cross-site
    WebSocket hijacking), a bad or expired token a 401. Without a token the socket opens, and must send
    {"op": "auth", "token": ...} within `auth_timeout`."""
    if request.headers.get("Upgrade", "").lower() != "websocket":
        raise ProtocolError("not-websocket", NOT_WEBSOCKET)
    if request.headers.get("Sec-WebSocket-Version") != "13":
        message = "this server speaks WebSocket version 13 (RFC 6455)"
        return error(426, "unsupported-version", message, **{"Sec-WebSocket-Version": "13"})
    problem = _malformed(request.environ)
    if problem:
        raise ProtocolError("bad-handshake", problem)
    auth = current_app.extensions["auth"]
    if not auth.origin_allowed(request.headers.get("Origin"), request.host):
        raise AuthError(403, "forbidden-origin", "WebSockets from this origin are not allowed")
    token = presented_token(request.headers.get("Authorization"), request.args.getlist("token"))
    g.grant = auth.grant(token) if token or not auth.tokens_required else None
    return None


def _malformed(environ: dict[str, Any]) -> str | None:
    """What simple-websocket's handshake would fail on (a traceback and a 500), checked before it runs."""
    if not KEY.fullmatch(environ.get("HTTP_SEC_WEBSOCKET_KEY", "")):
        return "Sec-WebSocket-Key must be 16 bytes in base64 (RFC 6455 section 4.2.1)"
    # simple-websocket hands wsproto a request it rebuilds from the environ's headers; wsproto (h11) refuses
    # what HTTP/1.1 does not allow there (a bad header value, a Host that is not a hostname, ...), and its
    # permessage-deflate fails on a parameter that is not a number (RFC 7692 section 7.1).
    head = "".join(
        f"{'-'.join(part.capitalize() for part in name[5:].split('_'))}: {value}\r\n"
        for name, value in environ.items()
        if name.startswith("HTTP_")
    )
    connection = WSConnection(ConnectionType.SERVER)
    try:
        connection.receive_data(f"GET / HTTP/1.1\r\n{head}\r\n".encode())
        for event in connection.events():
            if isinstance(event, WSRequest):
                for offer in event.extensions:
                    if str(offer).split(";", 1)[0].strip() == "permessage-deflate":
                        PerMessageDeflate().accept(str(offer))
    except RemoteProtocolError as exc:
        return f"not a valid WebSocket upgrade: {exc}"
    except ValueError:  # UnicodeError included
        return "not a valid WebSocket upgrade: a header value or a permessage-deflate parameter is malformed"
    return None


class Session:
    """One socket's client frames: auth, subscribe, unsubscribe, ping; and its token's deadlines."""

    def __init__(self, relay: Any, settings: Any, conn: Connection, auth: Any, grant: Grant | None) -> None:
        self.relay = relay
        self.settings = settings
        self.conn = conn
        self.auth = auth
        self.grant = grant  # None until an auth frame brings a valid token
        self.auth_deadline = time.time() + settings.auth_timeout
        self.subscribes = TokenBucket(settings.subscribe_rate, settings.subscribe_burst, time.monotonic())

    def wait(self, longest: float, now: float) -> float:
        """How long the socket may sleep before a deadline (auth timeout, token expiry) needs a look."""
        if self.grant is None:
            return max(0.0, min(longest, self.auth_deadline - now))
        return self.grant.wait(longest, now)

    def check(self, now: float) -> None:
        # A connection never outlives its token: the client reconnects (and resumes exactly) with a fresh one,
        # or sends a fresh one as an auth frame before this one expires.
        if self.grant is None and now >= self.auth_deadline:
            raise Closed(CLOSE_UNAUTHORIZED, f"no token within {self.settings.auth_timeout:g} s")
        if self.grant is not None and self.grant.expired(now):
            raise Closed(CLOSE_UNAUTHORIZED, "the token has expired")

    def authenticate(self, token: object) -> None:
        try:
            grant = self.auth.grant(token if isinstance(token, str) else None)
        except AuthError as exc:
            raise Closed(CLOSE_UNAUTHORIZED, exc.message) from None
        retry = self.relay.control.authorised(self.conn.id)  # its first token: now it counts as a connection
        if retry is not None:
            raise Closed(CLOSE_TRY_AGAIN, busy(retry)[1])
        self.grant = grant
        for channel in [c for c in self.conn.subs if not grant.allows(c)]:  # a fresh token may grant less
            self.relay.hub.unsubscribe(self.conn, channel)
            self.reply({"type": "error", "code": "forbidden", "channel": channel, "message": FORBIDDEN})
        self.reply({"type": "authorized", "expires": grant.expires})

    def reply(self, body: dict) -> None:
        self.conn.push(ws_text_frame(dumps(body)))

    def handle(self, raw: str | bytes) -> None:
        try:
            frame = parse_client_frame(raw, self.settings.max_frame_bytes)
        except ProtocolError as exc:
            code = CLOSE_UNSUPPORTED if exc.code == "bad-frame" and isinstance(raw, bytes) else CLOSE_INVALID
            raise Closed(code, exc.message) from None
        op = frame["op"]
        try:
            if op == "subscribe":
                self.subscribe(frame)
            elif op == "unsubscribe":
                channel = validate_channel(frame.get("channel"))
                self.relay.hub.unsubscribe(self.conn, channel)
                self.reply({"type": "unsubscribed", "channel": channel})
            elif op == "ping":
                self.reply({"type": "pong", "ts": time.time() * 1000})
            elif op == "auth":
                self.authenticate(frame.get("token"))
            else:
                raise ProtocolError("unknown-op", "op must be auth, subscribe, unsubscribe or ping")
        except ProtocolError as exc:
            body = {"type": "error", "code": exc.code, "message": exc.message}
            if isinstance(frame.get("channel"), str):
                body["channel"] = frame["channel"][:200]
            self.reply(body)

    def subscribe(self, frame: dict) -> None:
        wait = self.subscribes.take(time.monotonic())
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
        if channel not in self.conn.subs and len(self.conn.subs) >= self.settings.max_channels:
            raise ProtocolError("too-many-channels", f"at most {self.settings.max_channels} channels per connection")
        self.relay.subscribe(self.conn, [channel], mode, {channel: position} if position else {})
