"""The WebSocket route (the only flask_sock import).

One greenlet per socket does everything that writes: it waits on one event, set both when the client sent a
frame (simple-websocket's reader sets `ws.event`) and when the hub queued frames for us (`conn.wake`), then
answers the client's frames and writes every queued frame in a single `sendall`. flask-sock's `send` has no
lock, so nothing else writes to the socket (but simple-websocket's own pong/close replies).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import redis
from flask import current_app
from flask_sock import Sock

from sidecar.core.hub import WS, Connection
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

log = logging.getLogger(__name__)
sock = Sock()

# RFC 6455 section 7.4.1 close codes.
CLOSE_UNSUPPORTED = 1003
CLOSE_INVALID = 1007
CLOSE_POLICY = 1008
CLOSE_TRY_AGAIN = 1013


class Closed(Exception):
    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


@sock.route("/ws")
def websocket(ws: Any) -> None:
    relay = current_app.extensions["relay"]
    settings = current_app.config["SETTINGS"]
    conn = relay.connection(WS, ws.event.set)
    session = Session(relay, settings, conn)
    try:
        while ws.connected:
            woke = ws.event.wait(settings.keepalive)
            ws.event.clear()
            while ws.input_buffer:
                session.handle(ws.input_buffer.pop(0))
            if conn.resync:
                relay.resync(conn)
            frames = conn.drain()
            if frames:
                ws.sock.sendall(b"".join(frames))
                relay.stats.observe_write(conn)
            elif not woke:
                ws.sock.sendall(WS_PING)  # idle: keep intermediaries from closing us, learn if the peer left
    except Closed as closed:
        ws.close(reason=closed.code, message=closed.reason)
    except redis.RedisError:
        ws.close(reason=CLOSE_TRY_AGAIN, message="store unavailable, retry shortly")
    except OSError:
        pass  # the client went away
    finally:
        relay.hub.disconnect(conn)


class Session:
    """One socket's client frames: subscribe, unsubscribe, ping."""

    def __init__(self, relay: Any, settings: Any, conn: Connection) -> None:
        self.relay = relay
        self.settings = settings
        self.conn = conn

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
            else:
                raise ProtocolError("unknown-op", "op must be subscribe, unsubscribe or ping")
        except ProtocolError as exc:
            body = {"type": "error", "code": exc.code, "message": exc.message}
            if isinstance(frame.get("channel"), str):
                body["channel"] = frame["channel"][:200]
            self.reply(body)

    def subscribe(self, frame: dict) -> None:
        channel = validate_channel(frame.get("channel"))
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
