"""The HTTP API's pure parts, shared by both fronts (app.py on Flask, asgi.py on Starlette): the checks of a
POST /publish body and the error answers (docs/protocol.md, "Errors" and "Publishing over HTTP"), and the CORS
headers of the browser-facing reads.

Example::

    encoded = publish_items(loads_exact(body), publisher.item)   # ProtocolError: a 400 naming the message
    refused = too_large(limit)                                    # .status, .body, .headers for the front
    response.headers.update(cors_headers(auth.cors_origin(origin), preflight=method == "OPTIONS"))
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, TypeVar

from sidecar.core.protocol import ProtocolError, error_body

T = TypeVar("T")
PUBLISH_KINDS = {"event": None, "diff": "changes", "state": "state", "poke": None}  # kind -> its body's field


@dataclass(frozen=True, slots=True)
class Refusal:
    """An HTTP error answer: its status, its JSON body {"error": <code>, "message": <text>}, its headers."""

    status: int
    code: str
    message: str
    headers: tuple[tuple[str, str], ...] = ()

    @property
    def body(self) -> bytes:
        return error_body(self.code, self.message)

    def http_response(self) -> bytes:
        """The whole HTTP/1.1 answer, for a front that must write it to the socket itself (then close it)."""
        body = self.body
        head = f"HTTP/1.1 {self.status} {HTTPStatus(self.status).phrase}\r\n"
        head += "".join(f"{name}: {value}\r\n" for name, value in self.headers)
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        return head.encode("latin-1") + body


def refusal(status: int, code: str, message: str, **headers: str) -> Refusal:
    return Refusal(status, code, message, tuple(headers.items()))


UNAVAILABLE = refusal(503, "unavailable", "the relay cannot reach its store; retry shortly", **{"Retry-After": "1"})
UNKNOWN_CHANNEL = refusal(404, "unknown-channel", "nothing has been published on this channel (or it expired)")
NOT_WEBSOCKET = refusal(400, "not-websocket", "this endpoint speaks WebSocket only (RFC 6455)")
UNSUPPORTED_VERSION = refusal(
    426, "unsupported-version", "this server speaks WebSocket version 13 (RFC 6455)", **{"Sec-WebSocket-Version": "13"}
)


WS_KEY_RE = re.compile(r"[A-Za-z0-9+/]{21}[AQgw]==")  # base64 of 16 bytes (RFC 6455 section 4.1)
MALFORMED_UPGRADE = "not a valid WebSocket upgrade: a header value or a permessage-deflate parameter is malformed"


def upgrade_refusal(headers: Mapping[str, str]) -> Refusal | None:
    """The refusal of a WebSocket upgrade request (`headers`: lower-case names) that RFC 6455 section 4.2.1 and
    RFC 7692 do not allow, before any token is needed (docs/protocol.md, "WebSocket"): 426 for a version other
    than 13 or none, 400 `bad-handshake` for a key that is not 16 bytes in base64 or a permessage-deflate offer
    whose window bits are not a number. None: the upgrade may go on."""
    if headers.get("sec-websocket-version", "").strip() != "13":
        return UNSUPPORTED_VERSION
    if not WS_KEY_RE.fullmatch(headers.get("sec-websocket-key", "").strip()):
        return refusal(400, "bad-handshake", "Sec-WebSocket-Key must be 16 bytes in base64 (RFC 6455 section 4.2.1)")
    for offer in headers.get("sec-websocket-extensions", "").split(","):
        name, *params = (part.strip() for part in offer.split(";"))
        if name != "permessage-deflate":
            continue
        for param in params:
            key, eq, value = param.partition("=")
            value = value.strip().strip('"')
            if eq and key.strip().endswith("_max_window_bits") and not (value.isascii() and value.isdigit()):
                return refusal(400, "bad-handshake", MALFORMED_UPGRADE)
    return None


def head_fields(head: bytes) -> dict[str, str]:
    """The header fields of a raw HTTP/1.1 request head, lower-case names; repeated fields joined with ", "."""
    fields: dict[str, str] = {}
    for line in head.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")[1:]:
        name, colon, value = line.partition(":")
        if colon:
            name = name.strip().lower()
            fields[name] = f"{fields[name]}, {value.strip()}" if name in fields else value.strip()
    return fields


def cors_headers(allowed: str | None, preflight: bool) -> list[tuple[str, str]]:
    """The CORS headers of an answer of a browser-facing read (/sse, the state reads; docs/security.md):
    `allowed` is the origin the allowlist grants (Auth.cors_origin; None: none, so no header), `preflight` an
    OPTIONS. Beside them every answer of those endpoints, granted or not, carries Vary: Origin."""
    if not allowed:
        return []
    headers = [("Access-Control-Allow-Origin", allowed), ("Access-Control-Expose-Headers", "ETag")]
    if preflight:
        headers += [
            ("Access-Control-Allow-Methods", "GET"),
            ("Access-Control-Allow-Headers", "Authorization, Last-Event-ID, If-None-Match"),
            ("Access-Control-Max-Age", "600"),
        ]
    return headers


def too_large(limit: int) -> Refusal:
    return refusal(413, "too-large", f"request bodies are limited to {limit} bytes")


def publish_messages(body: object) -> list[Any]:
    """The messages of a decoded POST /publish body: one message object, or {"messages": [...]} for a batch."""
    if isinstance(body, dict) and "messages" in body:
        if len(body) > 1:
            raise ProtocolError("bad-request", 'a batch is {"messages": [...]} and nothing else')
        items = body["messages"]
    else:
        items = [body]
    if not isinstance(items, list) or not items:
        raise ProtocolError("bad-request", '"messages" must be a non-empty list')
    return items


def publish_fields(index: int, item: object) -> tuple[Any, str, Any, Any, Any]:
    """The (channel, kind, event, data, body) of message `index` of a POST /publish, checked for shape: its
    kind (defaulted from its fields) and the fields that kind allows. ProtocolError names the message."""
    where = f"message {index}: " if index else ""
    if not isinstance(item, dict):
        raise ProtocolError("bad-request", f"{where}each message is a JSON object")
    kind = item.get("kind", "diff" if "changes" in item else "state" if "state" in item else "event")
    if not isinstance(kind, str) or kind not in PUBLISH_KINDS:
        raise ProtocolError("bad-kind", f"{where}kind must be one of {', '.join(PUBLISH_KINDS)}")
    field = PUBLISH_KINDS[kind]
    if field and field not in item:
        raise ProtocolError("bad-request", f'{where}a {kind} message needs "{field}"')
    unknown = set(item) - {"channel", "event", "kind", "data", field} - {None}
    if unknown:
        fields = ", ".join(sorted(unknown))
        raise ProtocolError("bad-request", f"{where}fields not allowed in a {kind} message: {fields}")
    event = item.get("event", "changed" if kind == "poke" else None)
    return item.get("channel"), kind, event, item.get("data"), item.get(field) if field else None


def publish_item(index: int, item: object, encode: Callable[[Any, str, Any, Any, Any], T]) -> T:
    """Message `index` checked for shape, then by `encode(channel, kind, event, data, body)` (Publisher.item):
    its error (a ProtocolError, PublishError included) keeps its class and names the message."""
    channel, kind, event, data, body = publish_fields(index, item)
    try:
        return encode(channel, kind, event, data, body)
    except ProtocolError as exc:
        if not index:
            raise
        raise type(exc)(exc.code, f"message {index}: {exc.message}") from None


def publish_items(body: object, encode: Callable[[Any, str, Any, Any, Any], T]) -> list[T]:
    """Every message of a decoded POST /publish body, encoded; the first bad one raises (nothing is sent)."""
    return [publish_item(i, item, encode) for i, item in enumerate(publish_messages(body))]
