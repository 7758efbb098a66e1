"""The Flask app: SSE, the state (pull) endpoint, the publish API and health. WebSocket lives in ws.py.

Example::

    app = create_app(Settings.from_env())      # the relay starts with the first request's process
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Iterator
from http import HTTPStatus
from pathlib import Path

import redis
from flask import Blueprint, Flask, Response, current_app, request
from werkzeug.exceptions import HTTPException
from werkzeug.wsgi import get_input_stream

from sidecar.auth import Auth, AuthError, Grant, bearer, presented_token
from sidecar.config import Settings
from sidecar.core.connection import SSE
from sidecar.core.http_api import (
    UNAVAILABLE,
    UNKNOWN_CHANNEL,
    Refusal,
    cors_headers,
    publish_items,
    refusal,
)
from sidecar.core.http_api import too_large as too_large_body
from sidecar.core.protocol import ProtocolError, dumps, loads_exact, validate_channel
from sidecar.core.session import Close, Session, Wait, Write, busy, sse_request
from sidecar.publish import Publisher
from sidecar.relay import Relay
from sidecar.stats import CONTENT_TYPE_LATEST, exposition
from sidecar.writer import Sink, drop_read_buffer, request_socket, writer

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"
api = Blueprint("api", __name__)

def create_app(settings: Settings, relay: Relay | None = None) -> Flask:
    app = Flask(__name__, static_folder=str(STATIC), static_url_path="/static")
    relay = relay or Relay(settings)
    app.extensions["relay"] = relay
    app.extensions["publisher"] = Publisher(relay.store)
    app.extensions["auth"] = Auth(settings)
    app.config["SETTINGS"] = settings
    app.config["MAX_CONTENT_LENGTH"] = settings.max_publish_bytes * 2  # every body: see read_body()
    # OPTIONS only where CORS is offered (the routes below that name it): elsewhere a 405, as on the asgi front.
    app.config["PROVIDE_AUTOMATIC_OPTIONS"] = False
    app.register_blueprint(api)
    from sidecar.admin import admin

    app.register_blueprint(admin)
    from sidecar.ws import sock

    sock.init_app(app)
    app.config["SOCK_SERVER_OPTIONS"] = {"max_message_size": settings.max_frame_bytes}
    app.register_error_handler(ProtocolError, lambda e: error(400, e.code, e.message))
    app.register_error_handler(redis.RedisError, _redis_down)
    app.register_error_handler(AuthError, lambda e: error(e.status, e.code, e.message, **e.headers))
    app.register_error_handler(HTTPException, _http_error)
    app.after_request(_cors)
    return app


def relay_of() -> Relay:
    return current_app.extensions["relay"]


def settings_of() -> Settings:
    return current_app.config["SETTINGS"]


def answer(refused: Refusal) -> Response:
    """A core error answer (sidecar/core/http_api.py) as a Flask response."""
    return Response(refused.body, status=refused.status, mimetype="application/json", headers=list(refused.headers))


def error(status: int, code: str, message: str, **headers: str) -> Response:
    return answer(refusal(status, code, message, **headers))


def read_body() -> bytes | None:
    """The request body, or None when it is over MAX_CONTENT_LENGTH (413). Werkzeug's own limit cuts a chunked
    body at the limit without a word, so this reads one byte past it to know."""
    limit = current_app.config["MAX_CONTENT_LENGTH"]
    if request.content_length is not None and request.content_length > limit:
        return None
    stream = get_input_stream(request.environ, max_content_length=None)  # both our servers end chunked input
    chunks, size = [], 0
    while size <= limit:
        chunk = stream.read(min(65_536, limit + 1 - size))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return None if size > limit else b"".join(chunks)


def too_large() -> Response:
    return answer(too_large_body(current_app.config["MAX_CONTENT_LENGTH"]))


def _http_error(exc: HTTPException) -> Response:
    headers = {k: v for k, v in exc.get_headers() if k.lower() != "content-type"}
    status = exc.code or 500
    # The reason phrase as the message (Werkzeug's descriptions are addressed to a person at a browser), the same
    # answer as the asgi front's: {"error": "not-found", "message": "Not Found"}.
    return error(status, (exc.name or "error").lower().replace(" ", "-"), HTTPStatus(status).phrase, **headers)


CORS_ENDPOINTS = ("api.sse", "api.channel_state")
CORS_METHODS: dict = {"methods": ["GET", "OPTIONS"], "provide_automatic_options": True}  # Flask answers preflights


def _cors(response: Response) -> Response:
    """CORS for the browser-facing reads (allowlist: SIDECAR_CORS_ORIGINS); preflights come as OPTIONS."""
    if request.endpoint not in CORS_ENDPOINTS:
        return response
    response.vary.add("Origin")
    if request.method == "OPTIONS":
        del response.headers["Content-Type"]  # no body: Flask's default answer says text/html
    allow = current_app.extensions["auth"].cors_origin(request.headers.get("Origin"))
    for name, value in cors_headers(allow, preflight=request.method == "OPTIONS"):
        response.headers[name] = value
    return response


def request_grant() -> Grant:
    """The grant of the request's token: `Authorization: Bearer`, or `?token=` (EventSource sets no headers)."""
    token = presented_token(request.headers.get("Authorization"), request.args.getlist("token"))
    return current_app.extensions["auth"].grant(token)


def _redis_down(exc: redis.RedisError) -> Response:
    log.warning("Redis unavailable: %s", type(exc).__name__)
    return answer(UNAVAILABLE)


@api.get("/metrics")
def metrics() -> Response:
    """Prometheus exposition of this process's counters (labelled by configured pattern: bounded, no ids).
    Needs the metrics or admin key, like every endpoint that is not public (docs/security.md)."""
    current_app.extensions["auth"].require_metrics(bearer(request.headers.get("Authorization")))
    return Response(exposition(relay_of().stats), content_type=CONTENT_TYPE_LATEST)


@api.get("/healthz")
def healthz() -> Response:
    relay = relay_of()
    status, body = relay.health(relay.healthy())
    return Response(body, status=status, mimetype="application/json")


@api.route("/sse", **CORS_METHODS)
def sse() -> Response:
    """Server-Sent Events: `?channel=a&channel=b&mode=diff`, resumed by `Last-Event-ID` (or `last_event_id`)."""
    settings, relay = settings_of(), relay_of()
    grant = request_grant()
    cursor = request.headers.get("Last-Event-ID") or request.args.get("last_event_id")
    channels, mode, positions = sse_request(
        request.args.getlist("channel"), request.args.get("mode", "diff"), cursor, settings.max_channels,
        lambda names: Auth.authorize(grant, names),  # all or nothing: 403 if any channel is outside the grant
    )  # fmt: skip

    retry = relay.control.admit(channels)  # before any Redis read: a refused client costs next to nothing
    if retry is not None:
        body, _, after = busy(retry)
        return Response(body, status=503, mimetype="application/json", headers={"Retry-After": after})
    wakeup = threading.Event()
    conn = relay.connection(SSE, wakeup.set)
    client = request_socket(request.environ)  # take it before drop_read_buffer
    try:
        relay.subscribe(conn, channels, mode, positions)
    except BaseException:
        relay.hub.disconnect(conn)
        raise
    session = Session(conn, relay.hub, settings, grant, time.time())
    session.stream(channels, mode, random.random())
    direct = request.method == "GET"  # a HEAD's body is not written
    drop_read_buffer(request.environ)  # 8 KB per stream, never read again
    chunked = request.environ.get("SERVER_PROTOCOL") == "HTTP/1.1"  # both gevent.pywsgi and gunicorn chunk then

    def stream() -> Iterator[bytes]:
        sink: Sink | None = None
        # A client that leaves is gone now, not at the next keepalive.
        peer = writer.watch(client, wakeup.set) if direct else None
        try:
            while peer is None or not peer.gone:
                action = session.next(time.time(), sink is not None and sink.owed)
                if sink is None:  # the head (`retry:`): the WSGI server writes it with the headers
                    assert isinstance(action, Write)
                    yield action.data
                    # The headers are out: from here on the writer's pass writes our frames (sidecar/writer.py).
                    sink = writer.sink(conn, client, wakeup.set, relay.stats.observe_write, chunked=chunked,
                                       direct=direct)  # fmt: skip
                elif isinstance(action, Write):
                    with conn.writing(time.monotonic()):  # a write that lasts is a stuck peer (control.py)
                        sink.write(action.data)
                        out = sink.take()
                        if out:
                            yield out
                    if action.frames:
                        relay.stats.observe_write(conn)
                elif isinstance(action, Wait):
                    if not wakeup.wait(max(0.0, action.deadline - time.time())):
                        session.timer_fired()
                    wakeup.clear()
                elif isinstance(action, Close):
                    sink.write(action.data)  # never outlive the token
                    out = sink.take()
                    if out:
                        yield out
                    return
                else:
                    relay.resync(conn)
        except OSError:
            pass  # a direct write found the client gone
        finally:
            if sink is not None:
                sink.close()
            if peer is not None:
                peer.stop()
            relay.hub.disconnect(conn)

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return Response(stream(), mimetype="text/event-stream", headers=headers, direct_passthrough=True)


@api.route("/channels/<channel>/state", **CORS_METHODS)
def channel_state(channel: str) -> Response:
    """The pull of poke/pull: the channel's snapshot, with an ETag of its position. N pulls of one version cost
    one Redis read (sidecar/state_cache.py)."""
    grant = request_grant()
    Auth.authorize(grant, [validate_channel(channel)])  # 403 before 404: no oracle for what exists
    pulled = relay_of().control.pull(channel)
    if pulled is None:
        return answer(UNKNOWN_CHANNEL)
    etag, body = pulled
    if_none_match = request.headers.get("If-None-Match", "")
    if etag in if_none_match or if_none_match.strip() == "*":
        return Response(status=304, headers={"ETag": etag})
    return Response(body, mimetype="application/json", headers={"ETag": etag})


@api.post("/publish")
def publish() -> Response:
    """The publisher API over HTTP: one message object, or {"messages": [...]} for a batch."""
    publisher: Publisher = current_app.extensions["publisher"]
    current_app.extensions["auth"].require_publisher(bearer(request.headers.get("Authorization")))
    data = read_body()
    if data is None:
        return too_large()
    encoded = publish_items(loads_exact(data), publisher.item)  # ProtocolError (PublishError too): a 400
    published = publisher._send(encoded)
    body = [{"channel": p.channel, "id": p.id, "seq": p.seq, "epoch": p.epoch} for p in published]  # protocol.md
    return Response(dumps({"published": body}), mimetype="application/json")
