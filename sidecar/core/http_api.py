"""The HTTP API's pure parts, shared by both fronts (app.py on Flask, asgi.py on Starlette): the checks of a
POST /publish body, and the error answers (docs/protocol.md, "Errors" and "Publishing over HTTP").

Example::

    encoded = publish_items(loads_exact(body), publisher.item)   # ProtocolError: a 400 naming the message
    refused = too_large(limit)                                    # .status, .body, .headers for the front
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
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


def refusal(status: int, code: str, message: str, **headers: str) -> Refusal:
    return Refusal(status, code, message, tuple(headers.items()))


UNAVAILABLE = refusal(503, "unavailable", "the relay cannot reach its store; retry shortly", **{"Retry-After": "1"})
UNKNOWN_CHANNEL = refusal(404, "unknown-channel", "nothing has been published on this channel (or it expired)")
NOT_WEBSOCKET = refusal(400, "not-websocket", "this endpoint speaks WebSocket only (RFC 6455)")
UNSUPPORTED_VERSION = refusal(
    426, "unsupported-version", "this server speaks WebSocket version 13 (RFC 6455)", **{"Sec-WebSocket-Version": "13"}
)


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
