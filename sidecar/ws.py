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

from sidecar.app import answer, error
from sidecar.auth import AuthError, Grant, presented_token
from sidecar.core.connection import WS
from sidecar.core.http_api import MALFORMED_UPGRADE, NOT_WEBSOCKET, upgrade_refusal
from sidecar.core.protocol import ProtocolError
from sidecar.core.session import (
    STORE_DOWN,
    Authenticate,
    Close,
    Request,
    Session,
    Subscribe,
    Wait,
    Write,
    admission,
)
from sidecar.writer import drop_read_buffer, writer

log = logging.getLogger(__name__)
sock = Sock()

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
    # A socket without a token yet is admitted as a connection only when its auth frame brings one (_request).
    refused = admission(relay.control.admit() if grant is not None else relay.control.admit_unauthenticated())
    if refused is not None:
        ws.close(reason=refused.code, message=refused.reason)
        drop_read_buffer(request.environ)
        return
    conn = relay.connection(WS, ws.event.set)
    if grant is None:
        relay.control.unauthenticated.add(conn.id)
    session = Session(conn, relay.hub, settings, grant, time.time())
    # Queued frames are written by the writer's pass (sidecar/writer.py); we write what it could not finish.
    sink = writer.sink(conn, ws.sock, ws.event.set, relay.stats.observe_write, send=ws.sock.sendall)
    drop_read_buffer(request.environ)  # simple-websocket reads the socket itself
    close: Close | None = None
    try:
        try:
            while ws.connected and close is None:
                action = session.next(time.time(), sink.owed)
                if isinstance(action, Write):
                    with conn.writing(time.monotonic()):  # a write that lasts is a stuck peer (control.py)
                        sink.write(action.data)
                    if action.frames:
                        relay.stats.observe_write(conn)
                elif isinstance(action, Wait):
                    if not ws.event.wait(max(0.0, action.deadline - time.time())):
                        session.timer_fired()
                    ws.event.clear()
                    while ws.input_buffer and close is None:
                        close = _request(relay, session, session.receive(ws.input_buffer.pop(0), time.time()))
                elif isinstance(action, Close):
                    close = action
                else:
                    relay.resync(conn)
        finally:
            sink.close()  # no more writes from the pass: a close frame must be the last thing sent
        if close is not None:
            ws.close(reason=close.code, message=close.reason)
    except redis.RedisError:
        ws.close(reason=STORE_DOWN.code, message=STORE_DOWN.reason)
    except OSError:
        pass  # the client went away
    finally:
        relay.control.unauthenticated.discard(conn.id)
        relay.hub.disconnect(conn)
        # gevent.pywsgi keeps the connection for a next request once the route returns, and would parse what
        # the client still sends (its close reply, the rest of a too-large frame) as HTTP and log it as an error.
        drop_read_buffer(request.environ)


def _request(relay: Any, session: Session, asked: Request | None) -> Close | None:
    """Carry out what a client frame asked for; a Close ends the socket."""
    if isinstance(asked, Subscribe):
        since = {asked.channel: asked.since} if asked.since else {}
        try:
            relay.subscribe(session.conn, [asked.channel], asked.mode, since)
        except ProtocolError as exc:
            session.error(exc, asked.channel)
    elif isinstance(asked, Authenticate):
        verdict: Grant | str
        try:
            verdict = current_app.extensions["auth"].grant(asked.token)
        except AuthError as exc:
            verdict = exc.message
        # Its first token: from now on it counts as a connection (or it is refused, the replica being full).
        return session.authenticate(verdict, lambda: relay.control.authorised(session.conn.id))
    return asked if isinstance(asked, Close) else None


@sock.bp.app_errorhandler(WebsocketMismatch)
def not_websocket(exc: WebsocketMismatch) -> Response:
    # Werkzeug's router takes a request without `Connection: Upgrade` + `Upgrade: websocket` for plain HTTP.
    if request.path != "/ws":
        return error(400, "bad-request", exc.description or "")  # a WebSocket to a plain HTTP route
    return answer(NOT_WEBSOCKET)


@sock.bp.before_request
def handshake() -> Response | None:
    """Checks before the upgrade (RFC 6455 section 4.2.2 lets a server refuse with any HTTP status): a plain GET
    or a malformed upgrade gets a 400, a version other than 13 a 426, a foreign Origin a 403 (cross-site
    WebSocket hijacking), a bad or expired token a 401. Without a token the socket opens, and must send
    {"op": "auth", "token": ...} within `auth_timeout`."""
    if request.headers.get("Upgrade", "").lower() != "websocket":
        raise ProtocolError(NOT_WEBSOCKET.code, NOT_WEBSOCKET.message)
    refused = upgrade_refusal({name.lower(): value for name, value in request.headers.items()})
    if refused is not None:  # the same checks as the asgi front's (sidecar/core/http_api.py)
        return answer(refused)
    problem = _malformed(request.environ)
    if problem:
        raise ProtocolError("bad-handshake", problem)
    auth = current_app.extensions["auth"]
    if not auth.origin_allowed(request.headers.get("Origin"), request.host):
        raise AuthError(403, "forbidden-origin", "WebSockets from this origin are not allowed")
    token = presented_token(request.headers.get("Authorization"), request.args.getlist("token"))
    g.grant = auth.grant(token) if token or not auth.tokens_required else None
    if not current_app.config["SETTINGS"].ws_deflate:
        # simple-websocket accepts every permessage-deflate offer it sees (RFC 7692): hide the offer, and the
        # upgrade is answered without the extension. Our frames are never compressed (docs/performance.md).
        request.environ.pop("HTTP_SEC_WEBSOCKET_EXTENSIONS", None)
    return None


def _malformed(environ: dict[str, Any]) -> str | None:
    """What simple-websocket's handshake would fail on (a traceback and a 500), checked before it runs (after
    upgrade_refusal)."""
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
        return MALFORMED_UPGRADE
    return None
