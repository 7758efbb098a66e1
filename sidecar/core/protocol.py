"""The wire protocol: channel names, the message schema, frame encoding, the resume cursor.

docs/protocol.md is the public contract; this module is its executable form. Frames are built once per
(message, mode, transport) and shared by every connection that receives them.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass
from typing import Any

import orjson

MODES = ("poke", "state", "event", "diff")
DEFAULT_MODE = "diff"
KINDS = ("event", "diff", "state", "poke")  # what a publish is; the mode is how a subscriber sees it

MAX_CHANNEL_LEN = 200
MAX_EVENT_LEN = 100
# No braces (Redis Cluster hash tags), no spaces or commas (cursor separators), no `~` (position separator).
CHANNEL_RE = re.compile(rf"[A-Za-z0-9_\-:.@]{{1,{MAX_CHANNEL_LEN}}}")
EVENT_RE = re.compile(rf"[A-Za-z0-9_\-:.]{{1,{MAX_EVENT_LEN}}}")
# ASCII digits only: `\d` would match any Unicode digit (`١`, `１`), which int() reads and Redis refuses.
STREAM_ID_RE = re.compile(r"([0-9]{1,20})-([0-9]{1,20})")
MAX_ID_PART = 2**64 - 1  # both parts of a Redis stream id are unsigned 64-bit integers
EPOCH_RE = re.compile(r"[0-9a-f]{0,32}")


class ProtocolError(ValueError):
    """Client input that breaks the protocol; the message is safe to show to the client."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def validate_channel(name: object) -> str:
    if not isinstance(name, str) or not CHANNEL_RE.fullmatch(name):
        raise ProtocolError(
            "bad-channel",
            f"channel names are 1-{MAX_CHANNEL_LEN} characters of letters, digits and _ - : . @",
        )
    return name


def validate_event(name: object) -> str:
    if not isinstance(name, str) or not EVENT_RE.fullmatch(name):
        raise ProtocolError("bad-event", f"event names are 1-{MAX_EVENT_LEN} characters of letters, digits and _ - : .")
    return name


def validate_mode(mode: object) -> str:
    if mode not in MODES:
        raise ProtocolError("bad-mode", f"mode must be one of {', '.join(MODES)}")
    return mode


def shard_of(channel: str, shards: int) -> int:
    """The shard a channel lives in: stable across processes and languages (CRC-32)."""
    return zlib.crc32(channel.encode()) % shards


StreamKey = tuple[int, int]
ZERO_KEY: StreamKey = (0, 0)


def stream_key(stream_id: str) -> StreamKey:
    """A Redis stream id ("<ms>-<n>") as a comparable tuple."""
    match = STREAM_ID_RE.fullmatch(stream_id)
    key = (int(match[1]), int(match[2])) if match else None
    if key is None or key[0] > MAX_ID_PART or key[1] > MAX_ID_PART:
        raise ProtocolError("bad-id", "stream ids look like 1700000000000-0 (two unsigned 64-bit integers)")
    return key


@dataclass(frozen=True, slots=True)
class Position:
    """Where a client is in one channel: the last stream id it has seen, in which epoch."""

    id: str = "0-0"
    epoch: str = ""

    @property
    def key(self) -> StreamKey:
        return stream_key(self.id)

    def encode(self) -> str:
        return f"{self.id}~{self.epoch}"

    @classmethod
    def parse(cls, text: str) -> Position:
        stream_id, sep, epoch = text.partition("~")
        if not sep or not EPOCH_RE.fullmatch(epoch):
            raise ProtocolError("bad-cursor", "a position looks like <stream id>~<epoch>")
        stream_key(stream_id)
        return cls(stream_id, epoch)


def encode_cursor(positions: list[Position]) -> str:
    """The SSE `id:` of a connection: one position per channel, channels in sorted order.

    One Redis stream id is not a total order across shards, so the cursor carries every channel's position;
    `Last-Event-ID` alone then resumes the whole connection (SSE spec: the browser echoes the last id).
    """
    return ",".join(p.encode() for p in positions)


def parse_cursor(text: str, channels: list[str]) -> dict[str, Position]:
    """Read a cursor made by :func:`encode_cursor` for the same (sorted) channels."""
    parts = text.split(",") if text else []
    if len(parts) != len(channels):
        raise ProtocolError("bad-cursor", "Last-Event-ID does not match the channels of this request")
    return {channel: Position.parse(part) for channel, part in zip(channels, parts, strict=True)}


@dataclass(frozen=True, slots=True)
class Message:
    """One published message as it comes off a Redis stream. `data` and `change` are raw JSON."""

    channel: str
    id: str
    key: StreamKey
    seq: int
    epoch: str
    event: str
    ts: float  # publish time, epoch milliseconds
    kind: str  # event | diff | state | poke
    data: bytes | None = None
    change: bytes | None = None  # the merge patch (diff) or the full state (state)

    @property
    def position(self) -> Position:
        return Position(self.id, self.epoch)

    @classmethod
    def from_fields(cls, stream_id: str, fields: dict[bytes, bytes]) -> Message:
        return cls(
            channel=fields[b"c"].decode(),
            id=stream_id,
            key=stream_key(stream_id),
            seq=int(fields[b"s"]),
            epoch=fields[b"ep"].decode(),
            event=fields[b"e"].decode(),
            ts=float(fields[b"t"]),
            kind=fields[b"k"].decode(),
            data=fields.get(b"d"),
            change=fields.get(b"x"),
        )


def message_body(msg: Message, mode: str, state: bytes | None = None, seq_from: int | None = None) -> dict:
    """The JSON object a subscriber in `mode` receives for `msg` (docs/protocol.md, "message")."""
    body: dict[str, Any] = {
        "type": "message",
        "channel": msg.channel,
        "id": msg.id,
        "seq": msg.seq,
        "epoch": msg.epoch,
        "event": msg.event,
        "ts": msg.ts,
    }
    if seq_from is not None and seq_from != msg.seq:
        body["seq_from"] = seq_from
    if mode == "poke":
        return body
    if mode in ("event", "diff") and msg.data is not None:
        body["data"] = orjson.Fragment(msg.data)
    if mode == "diff" and msg.change is not None:
        # A full-state publish reaches diff subscribers as a patch that replaces every key.
        body["diff" if msg.kind == "diff" else "state"] = orjson.Fragment(msg.change)
    if mode == "state" and state is not None:
        body["state"] = orjson.Fragment(state)
    return body


def control_body(kind: str, channel: str, position: Position, seq: int, **extra: Any) -> dict:
    """`subscribed`, `snapshot` and `reset` bodies."""
    body = {"type": kind, "channel": channel, "id": position.id, "seq": seq, "epoch": position.epoch}
    body.update({k: (orjson.Fragment(v) if isinstance(v, bytes) else v) for k, v in extra.items()})
    return body


# orjson keeps integers in [-2**63, 2**64 - 1] exact and silently reads larger ones as floats; only a literal of
# 19 or more digits can lie outside that range. On JSON that parsed, an integer literal is a digit run outside
# strings with no `.`, `e`, sign or digit before it (a fraction or an exponent) and no `.` or `e` after it.
MIN_INT, MAX_INT = -(2**63), 2**64 - 1
LONG_DIGITS_RE = re.compile(rb"[0-9]{19}")
STRING_RE = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
LONG_INT_RE = re.compile(rb"(?<![0-9.eE+-])(?:-?[0-9]{20,}|-[0-9]{19})(?![0-9.eE])")  # may be out of range


def loads_exact(data: bytes) -> Any:
    """A client's JSON document; ProtocolError `bad-json`, or `bad-number` for an integer beyond 64 bits (it
    would be stored as a float)."""
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise ProtocolError("bad-json", "the body must be JSON") from None
    if LONG_DIGITS_RE.search(data):
        for literal in LONG_INT_RE.findall(STRING_RE.sub(b'""', data)):
            if len(literal.lstrip(b"-")) > 20 or not MIN_INT <= int(literal) <= MAX_INT:
                message = f"integers must lie in {MIN_INT}..{MAX_INT} (64 bits); send larger ones as strings"
                raise ProtocolError("bad-number", message)
    return value


def dumps(body: dict) -> bytes:
    return orjson.dumps(body)


def error_body(code: str, message: str) -> bytes:
    """The JSON body of every HTTP error: {"error": <code>, "message": <text>} (docs/protocol.md)."""
    return orjson.dumps({"error": code, "message": message})


def sse_frame(event: str, payload: bytes) -> bytes:
    """An SSE event without its `id:` line (the id is per connection, see :func:`encode_cursor`)."""
    return b"event: " + event.encode() + b"\ndata: " + payload + b"\n\n"


def sse_id_line(cursor: str) -> bytes:
    return b"id: " + cursor.encode() + b"\n"


def sse_retry(ms: int) -> bytes:
    # SSE spec: `retry:` sets the reconnection time of the EventSource.
    return b"retry: %d\n\n" % ms


SSE_KEEPALIVE = b":\n\n"


def ws_text_frame(payload: bytes) -> bytes:
    """A whole, unmasked WebSocket text frame (RFC 6455 section 5.2), built once and shared by every socket.

    Server-to-client frames are never masked, so the same bytes can be written to any connection.
    """
    n = len(payload)
    if n < 126:
        header = bytes((0x81, n))
    elif n < 65536:
        header = bytes((0x81, 126)) + n.to_bytes(2, "big")
    else:
        header = bytes((0x81, 127)) + n.to_bytes(8, "big")
    return header + payload


WS_PING = bytes((0x89, 0))  # RFC 6455 5.5.2: an empty ping


def parse_client_frame(text: str | bytes, max_bytes: int) -> dict:
    """A WebSocket text frame from a client, checked for shape (not for meaning)."""
    if isinstance(text, bytes):
        raise ProtocolError("bad-frame", "binary frames are not part of this protocol; send JSON text")
    if len(text) > max_bytes // 4 and len(text.encode("utf-8", "surrogatepass")) > max_bytes:
        raise ProtocolError("frame-too-large", f"frames are limited to {max_bytes} bytes")
    try:
        frame = orjson.loads(text)
    except orjson.JSONDecodeError:
        raise ProtocolError("bad-json", "frames must be JSON objects") from None
    if not isinstance(frame, dict) or not isinstance(frame.get("op"), str):
        raise ProtocolError("bad-frame", 'frames are JSON objects with an "op"')
    return frame
