"""The Python client's sans-IO half: bytes in, frames out; `sidecar/client.py` owns the sockets and the clock.

`Response` parses an HTTP/1.1 response fed in pieces, `Events` the Server-Sent Events in its body, and `Tracker`
keeps each channel's position and local state: dedupe, holes, epoch changes (docs/protocol.md).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import orjson

from sidecar.core import merge
from sidecar.core.protocol import Position, encode_cursor, stream_key, validate_channel, validate_mode

MAX_HEAD = 65_536
MAX_HELD = 10_000  # messages held per channel while it waits for its pull
_LINE_END = re.compile(rb"\r\n|\r|\n")


class Response:
    """An HTTP/1.1 response fed in pieces: the head, then the body (chunked, Content-Length or until close)."""

    def __init__(self) -> None:
        self.buf = b""
        self.status = 0
        self.headers: dict[str, str] = {}
        self.done = False
        self._chunked = False
        self._left: int | None = None  # body bytes still expected (Content-Length) or in the current chunk

    def feed(self, data: bytes) -> bytes:
        """Take bytes from the socket, return the body bytes they complete (OSError: not HTTP/1.1 as we know it)."""
        try:
            return self._feed(data)
        except (ValueError, IndexError):
            raise OSError("malformed HTTP response") from None

    def _feed(self, data: bytes) -> bytes:
        self.buf += data
        if not self.status:
            head, sep, self.buf = self.buf.partition(b"\r\n\r\n")
            if not sep:
                if len(head) > MAX_HEAD:
                    raise OSError("HTTP response head too long")
                self.buf = head
                return b""
            status_line, *lines = head.decode("latin-1").split("\r\n")
            self.status = int(status_line.split()[1])
            self.headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines)}
            self._chunked = "chunked" in self.headers.get("transfer-encoding", "").lower()
            if not self._chunked and "content-length" in self.headers:
                self._left = int(self.headers["content-length"])
        if not self._chunked:
            body, self.buf = self.buf, b""
            if self._left is not None:
                body = body[: self._left]
                self._left -= len(body)
                self.done = not self._left
            return body
        out = []
        while not self.done:
            if self._left is None:  # a chunk-size line (RFC 9112 section 7.1)
                line, sep, rest = self.buf.partition(b"\r\n")
                if not sep:
                    break
                self.buf, self._left = rest, int(line.split(b";")[0], 16)
                self.done = not self._left
            elif len(self.buf) >= self._left + 2:
                out.append(self.buf[: self._left])
                self.buf, self._left = self.buf[self._left + 2 :], None
            else:
                break
        return b"".join(out)


class Events:
    """Server-Sent Events parsing (HTML Standard, 9.2.6 "Interpreting an event stream"): bytes in, (event, data)
    out. Lines end in CRLF, LF or a lone CR; one leading BOM is skipped; `data` lines are joined with LF; a blank
    line dispatches the event (none without data); an `id` with NUL and a `retry` that is not all ASCII digits
    are ignored. The client builds its cursor from its own positions, so `last_id` is only kept, never needed.
    """

    def __init__(self) -> None:
        self.buf = b""
        self.event = ""
        self.data: list[str] = []
        self.retry: int | None = None  # the last `retry:` (ms)
        self.last_id = ""  # the last event ID, as of the last dispatch
        self._id = ""  # the last event ID buffer
        self._cr = False  # the last byte was a CR: a LF that follows ends no line
        self._started = False  # the first line is read (the BOM is behind us)

    def feed(self, data: bytes) -> list[tuple[str, str]]:
        if not data:
            return []
        if self._cr and data.startswith(b"\n"):
            data = data[1:]
        self._cr = data.endswith(b"\r")
        *lines, self.buf = _LINE_END.split(self.buf + data)
        events = []
        for raw in lines:
            line = raw.decode(errors="replace")
            if not self._started:
                line, self._started = line.removeprefix("\ufeff"), True
            if not line:
                self.last_id = self._id
                if self.data:
                    events.append((self.event or "message", "\n".join(self.data)))
                self.event, self.data = "", []
            elif not line.startswith(":"):  # a comment is a keep-alive
                name, _, value = line.partition(":")
                value = value[1:] if value.startswith(" ") else value
                if name == "event":
                    self.event = value
                elif name == "data":
                    self.data.append(value)
                elif name == "id" and "\0" not in value:
                    self._id = value
                elif name == "retry" and value.isascii() and value.isdigit():
                    self.retry = int(value)
        return events


@dataclass
class _Channel:
    id: str = "0-0"
    epoch: str = ""
    seq: int = 0
    state: Any = None
    stale: str = ""  # why the channel must be pulled again ("hole", "epoch"); "" when it is in sync
    held: list[dict] = field(default_factory=list)  # messages read while stale, replayed after the pull

    @property
    def position(self) -> Position:
        return Position(self.id, self.epoch)


class Tracker:
    """Positions, dedupe and local state of a client's channels; frames in, frames for the user out.

    It follows the client rules of docs/protocol.md ("What a client must do"), as tests/vectors/protocol.json
    checks: a channel with a seq hole or a new epoch becomes `stale()` in every mode, holds its messages, and is
    restarted by the answer of its pull (:meth:`pulled`) or by a `snapshot`/`reset` from the server.
    """

    def __init__(self, channels: Iterable[str], mode: str) -> None:
        self.mode = validate_mode(mode)
        self.channels = {validate_channel(c): _Channel() for c in sorted(set(channels))}
        if not self.channels:
            raise ValueError("give at least one channel")
        self.seeded = False
        self.stateful = self.mode in ("diff", "state")

    def cursor(self) -> str:
        return encode_cursor([ch.position for ch in self.channels.values()])

    def query(self) -> str:
        return urlencode([("channel", c) for c in self.channels] + [("mode", self.mode)])

    def stale(self) -> list[str]:
        return [name for name, ch in self.channels.items() if ch.stale]

    def reconnecting(self) -> None:
        # The cursor holds each channel's last good position: the server's catch-up fills any hole.
        for ch in self.channels.values():
            ch.stale, ch.held = "", []

    def feed(self, event: str, data: str) -> list[dict]:
        """One SSE event; returns the frames to hand to the user."""
        if event not in ("message", "snapshot", "reset", "subscribed"):
            return []  # `ready`, and whatever a later server adds
        return self.frame({**orjson.loads(data), "type": event})

    def frame(self, body: dict) -> list[dict]:
        """One server frame (SSE event or WebSocket frame, with its `type`); returns the frames for the user."""
        ch = self.channels.get(body.get("channel"))  # type: ignore[arg-type]
        if ch is None:
            return []
        if body["type"] == "message":
            return self._message(ch, body)
        if body["epoch"] == ch.epoch and stream_key(body["id"]) < stream_key(ch.id) and "reason" not in body:
            return []  # older than what we hold (one with a reason is the server's word that it lost some)
        if body["type"] == "subscribed":
            if "state" not in body:
                ch.id, ch.epoch, ch.seq = body["id"], body["epoch"], body["seq"]
                return []
            body = {k: v for k, v in body.items() if k != "mode"} | {"type": "snapshot"}
        return self._restart(ch, body)

    def _message(self, ch: _Channel, body: dict) -> list[dict]:
        if ch.stale:
            if len(ch.held) >= MAX_HELD:
                ch.held = []  # the pull covers them; a hole after it pulls again
            ch.held.append(body)
            return []
        if body["epoch"] == ch.epoch and stream_key(body["id"]) <= stream_key(ch.id):
            return []  # a duplicate: a resumed stream may overlap what was seen
        if ch.epoch and body["epoch"] != ch.epoch:
            ch.stale, ch.held = "epoch", [body]
            return []
        if body.get("seq_from", body["seq"]) != ch.seq + 1:
            ch.stale, ch.held = "hole", [body]
            return []
        ch.id, ch.epoch, ch.seq = body["id"], body["epoch"], body["seq"]
        return [body]

    def apply(self, frame: dict) -> None:
        """Bring the channel's local state up to `frame` as it is handed to the user (positions move on
        reading, so that dedupe and the cursor cover frames still waiting to be handed over)."""
        if not self.stateful:
            return
        ch = self.channels[frame["channel"]]
        if frame["type"] != "message":
            ch.state = frame.get("state")
        elif "diff" in frame:
            ch.state = merge.apply(ch.state, frame["diff"])
        elif "state" in frame:
            ch.state = frame["state"]

    def pulled(self, channel: str, answer: dict | None) -> list[dict]:
        """A `GET /channels/<c>/state` answer (None: 404): the channel restarts there.

        Returns the frames for the user: a `snapshot` or `reset` with the stale channel's `reason` ("hole",
        "epoch"), then the held messages that follow it; for the first pull of a channel (not stale), a `snapshot`
        when there is a state to hand over, else nothing.
        """
        ch = self.channels[channel]
        answer = answer or {"id": "0-0", "seq": 0, "epoch": "", "state": None}
        with_state = self.stateful and answer["state"] is not None
        body: dict[str, Any] = {"type": "snapshot" if with_state else "reset", "channel": channel}
        body.update({k: answer[k] for k in ("id", "seq", "epoch")})
        if with_state:
            body["state"] = answer["state"]
        if ch.stale:
            body["reason"] = ch.stale
        elif not with_state:
            ch.id, ch.epoch, ch.seq = body["id"], body["epoch"], body["seq"]
            return []
        return self._restart(ch, body)

    def _restart(self, ch: _Channel, body: dict) -> list[dict]:
        """The channel restarts at a snapshot or reset, then goes on with the held messages that follow it."""
        ch.id, ch.epoch, ch.seq = body["id"], body["epoch"], body["seq"]
        held, ch.stale, ch.held = ch.held, "", []
        frames = [body]
        for msg in held:
            # One that does not follow is covered by the restart, or lost by the server (a failover's lost tail):
            # pulling again for it could loop. A hole after the restart shows on the next live message.
            follows = msg.get("seq_from", msg["seq"]) == ch.seq + 1 and stream_key(msg["id"]) > stream_key(ch.id)
            if msg["epoch"] == ch.epoch and follows:
                ch.id, ch.seq = msg["id"], msg["seq"]
                frames.append(msg)
        return frames
