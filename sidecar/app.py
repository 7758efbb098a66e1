"""The Flask app: SSE, the state (pull) endpoint, the publish API and health. WebSocket lives in ws.py.

Example::

    app = create_app(Settings.from_env())      # the relay starts with the first request's process
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import redis
from flask import Blueprint, Flask, Response, current_app, request

from sidecar.config import Settings
from sidecar.core.hub import SSE
from sidecar.core.protocol import (
    SSE_KEEPALIVE,
    ProtocolError,
    dumps,
    parse_cursor,
    sse_frame,
    sse_id_line,
    sse_retry,
    validate_channel,
    validate_mode,
)
from sidecar.publish import Publisher, PublishError
from sidecar.relay import Relay

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"
api = Blueprint("api", __name__)

PUBLISH_KINDS = {"event": None, "diff": "changes", "state": "state", "poke": None}


def create_app(settings: Settings, relay: Relay | None = None) -> Flask:
    app = Flask(__name__, static_folder=str(STATIC), static_url_path="/static")
    relay = relay or Relay(settings)
    app.extensions["relay"] = relay
    app.extensions["publisher"] = Publisher(relay.store)
    app.config["SETTINGS"] = settings
    app.register_blueprint(api)
    from sidecar.ws import sock

    sock.init_app(app)
    app.config["SOCK_SERVER_OPTIONS"] = {"max_message_size": settings.max_frame_bytes}
    app.register_error_handler(ProtocolError, lambda e: error(400, e.code, e.message))
    app.register_error_handler(redis.RedisError, _redis_down)
    return app


def relay_of() -> Relay:
    return current_app.extensions["relay"]


def settings_of() -> Settings:
    return current_app.config["SETTINGS"]


def error(status: int, code: str, message: str, **headers: str) -> Response:
    body = orjson.dumps({"error": code, "message": message})
    return Response(body, status=status, mimetype="application/json", headers=headers)


def _redis_down(exc: redis.RedisError) -> Response:
    log.warning("Redis unavailable: %s", type(exc).__name__)
    return error(503, "unavailable", "the relay cannot reach its store; retry shortly", **{"Retry-After": "1"})


@api.get("/healthz")
def healthz() -> Response:
    relay = relay_of()
    ok = relay.healthy()
    body = {
        "ok": ok,
        "reader": relay.reader.alive and relay.reader.healthy,
        "connections": len(relay.hub.connections),
    }
    return Response(orjson.dumps(body), status=200 if ok else 503, mimetype="application/json")


@api.get("/sse")
def sse() -> Response:
    """Server-Sent Events: `?channel=a&channel=b&mode=diff`, resumed by `Last-Event-ID` (or `last_event_id`)."""
    settings, relay = settings_of(), relay_of()
    channels = sorted({validate_channel(c) for c in request.args.getlist("channel")})
    if not channels:
        raise ProtocolError("no-channel", "give at least one ?channel=")
    if len(channels) > settings.max_channels:
        raise ProtocolError("too-many-channels", f"at most {settings.max_channels} channels per connection")
    mode = validate_mode(request.args.get("mode", "diff"))
    cursor = request.headers.get("Last-Event-ID") or request.args.get("last_event_id")
    positions = parse_cursor(cursor, channels) if cursor else {}

    wakeup = threading.Event()
    conn = relay.connection(SSE, wakeup.set)
    try:
        relay.subscribe(conn, channels, mode, positions)
    except BaseException:
        relay.hub.disconnect(conn)
        raise
    ready = orjson.dumps({"type": "ready", "channels": channels, "mode": mode})
    conn.push(sse_id_line(conn.cursor()) + sse_frame("ready", ready))
    retry_ms = int(settings.sse_retry_ms * random.uniform(1.0, 2.0))  # jittered: no synchronized reconnects

    def stream() -> Iterator[bytes]:
        try:
            yield sse_retry(retry_ms)
            while True:
                if conn.resync:
                    relay.resync(conn)
                frames = conn.drain()
                if frames:
                    yield b"".join(frames)
                    relay.stats.observe_write(conn)
                    continue
                if not wakeup.wait(settings.keepalive):
                    yield SSE_KEEPALIVE
                wakeup.clear()
        finally:
            relay.hub.disconnect(conn)

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return Response(stream(), mimetype="text/event-stream", headers=headers, direct_passthrough=True)


@api.get("/channels/<channel>/state")
def channel_state(channel: str) -> Response:
    """The pull of poke/pull: the channel's snapshot, with an ETag of its position."""
    snap = relay_of().store.snapshot(validate_channel(channel))
    if snap is None:
        return error(404, "unknown-channel", "nothing has been published on this channel (or it expired)")
    etag = f'"{snap.epoch}:{snap.id}"'
    if etag in request.headers.get("If-None-Match", ""):
        return Response(status=304, headers={"ETag": etag})
    body = {"channel": channel, "id": snap.id, "seq": snap.seq, "epoch": snap.epoch, "state": snap.state}
    return Response(orjson.dumps(body), mimetype="application/json", headers={"ETag": etag})


@api.post("/publish")
def publish() -> Response:
    """The publisher API over HTTP: one message object, or {"messages": [...]} for a batch."""
    publisher: Publisher = current_app.extensions["publisher"]
    if request.content_length is not None and request.content_length > settings_of().max_publish_bytes * 2:
        return error(413, "too-large", "request body too large")
    try:
        body = orjson.loads(request.get_data())
    except orjson.JSONDecodeError:
        return error(400, "bad-json", "the body must be JSON")
    items = body.get("messages") if isinstance(body, dict) and "messages" in body else [body]
    if not isinstance(items, list) or not items:
        return error(400, "bad-request", '"messages" must be a non-empty list')
    try:
        encoded = [_publish_item(publisher, i, item) for i, item in enumerate(items)]
    except PublishError as exc:
        return error(400, exc.code, exc.message)
    published = publisher._send(encoded)
    return Response(dumps({"published": [p.__dict__ for p in published]}), mimetype="application/json")


def _publish_item(publisher: Publisher, index: int, item: Any) -> Any:
    where = f"message {index}: " if index else ""
    if not isinstance(item, dict):
        raise PublishError("bad-request", f"{where}each message is a JSON object")
    kind = item.get("kind", "diff" if "changes" in item else "state" if "state" in item else "event")
    if kind not in PUBLISH_KINDS:
        raise PublishError("bad-kind", f"{where}kind must be one of {', '.join(PUBLISH_KINDS)}")
    field = PUBLISH_KINDS[kind]
    if field and field not in item:
        raise PublishError("bad-request", f'{where}a {kind} message needs "{field}"')
    unknown = set(item) - {"channel", "event", "kind", "data", "changes", "state"}
    if unknown:
        raise PublishError("bad-request", f"{where}unknown fields: {', '.join(sorted(unknown))}")
    try:
        return publisher.item(
            item.get("channel"), kind, item.get("event", "changed" if kind == "poke" else None),
            item.get("data"), item.get(field) if field else None,
        )  # fmt: skip
    except PublishError as exc:
        raise PublishError(exc.code, where + exc.message) from None
