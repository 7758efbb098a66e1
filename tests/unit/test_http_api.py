"""The HTTP API's pure parts (sidecar/core/http_api.py): a POST /publish body's checks, the error answers and the
CORS headers."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from sidecar.core.http_api import (
    NOT_WEBSOCKET,
    UNAVAILABLE,
    UNSUPPORTED_VERSION,
    cors_headers,
    publish_fields,
    publish_items,
    publish_messages,
    refusal,
    too_large,
)
from sidecar.core.protocol import ProtocolError


class Refused(ProtocolError):
    """Stands for PublishError: a subclass the encoder raises, which must keep its class."""


def record(channel: Any, kind: str, event: Any, data: Any, body: Any) -> tuple:
    return channel, kind, event, data, body


def refuse_channel_b(channel: Any, kind: str, event: Any, data: Any, body: Any) -> tuple:
    if channel == "b":
        raise Refused("bad-channel", "no b")
    return record(channel, kind, event, data, body)


def test_one_message_or_a_batch_of_messages() -> None:
    one = {"channel": "a", "event": "e"}
    assert publish_messages(one) == [one]
    assert publish_messages({"messages": [one, one]}) == [one, one]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"messages": [{}], "channel": "a"}, 'a batch is {"messages": [...]} and nothing else'),
        ({"messages": []}, '"messages" must be a non-empty list'),
        ({"messages": {"channel": "a"}}, '"messages" must be a non-empty list'),
    ],
)
def test_a_batch_must_be_a_non_empty_list_alone(body: object, message: str) -> None:
    with pytest.raises(ProtocolError) as exc:
        publish_messages(body)
    assert (exc.value.code, exc.value.message) == ("bad-request", message)


def test_kind_defaults_from_the_fields_and_a_poke_defaults_its_event() -> None:
    assert publish_fields(0, {"channel": "a", "event": "e", "changes": {"x": 1}}) == ("a", "diff", "e", None, {"x": 1})
    assert publish_fields(0, {"channel": "a", "event": "e", "state": {}})[1:3] == ("state", "e")
    assert publish_fields(0, {"channel": "a", "event": "e", "data": [1]}) == ("a", "event", "e", [1], None)
    assert publish_fields(0, {"channel": "a", "kind": "poke"}) == ("a", "poke", "changed", None, None)


@pytest.mark.parametrize(
    ("item", "code", "message"),
    [
        ([1], "bad-request", "message 2: each message is a JSON object"),
        ({"kind": "merge"}, "bad-kind", "message 2: kind must be one of event, diff, state, poke"),
        ({"kind": "diff"}, "bad-request", 'message 2: a diff message needs "changes"'),
        ({"kind": "poke", "data": 1, "state": {}, "x": 0}, "bad-request",
         "message 2: fields not allowed in a poke message: state, x"),
    ],
)  # fmt: skip
def test_a_message_of_the_wrong_shape_is_named_by_its_index(item: object, code: str, message: str) -> None:
    with pytest.raises(ProtocolError) as exc:
        publish_fields(2, item)
    assert (exc.value.code, exc.value.message) == (code, message)


def test_every_message_is_encoded_in_order() -> None:
    body = {"messages": [{"channel": "a", "event": "e"}, {"channel": "c", "kind": "state", "state": {"n": 1}}]}
    assert publish_items(body, record) == [("a", "event", "e", None, None), ("c", "state", None, None, {"n": 1})]


def test_an_encoder_error_keeps_its_class_and_names_a_later_message() -> None:
    with pytest.raises(Refused) as exc:
        publish_items({"messages": [{"channel": "a"}, {"channel": "b"}]}, refuse_channel_b)
    assert (exc.value.code, exc.value.message) == ("bad-channel", "message 1: no b")
    with pytest.raises(Refused) as exc:
        publish_items({"channel": "b"}, refuse_channel_b)
    assert exc.value.message == "no b"  # a lone message (index 0) is not named


def test_refusals_carry_status_json_body_and_headers() -> None:
    r = refusal(401, "bad-token", "nope", **{"WWW-Authenticate": "Bearer"})
    assert (r.status, r.headers) == (401, (("WWW-Authenticate", "Bearer"),))
    assert orjson.loads(r.body) == {"error": "bad-token", "message": "nope"}
    assert (too_large(10).status, orjson.loads(too_large(10).body)["message"]) == (
        413, "request bodies are limited to 10 bytes")  # fmt: skip
    assert (UNAVAILABLE.status, dict(UNAVAILABLE.headers)) == (503, {"Retry-After": "1"})
    assert (UNSUPPORTED_VERSION.status, dict(UNSUPPORTED_VERSION.headers)) == (426, {"Sec-WebSocket-Version": "13"})
    assert (NOT_WEBSOCKET.status, NOT_WEBSOCKET.code) == (400, "not-websocket")


def test_cors_grants_only_an_allowed_origin_and_a_preflight_gets_what_a_browser_may_send() -> None:
    assert cors_headers(None, preflight=False) == cors_headers(None, preflight=True) == []
    origin = "https://app.example"
    read = dict(cors_headers(origin, preflight=False))
    assert read == {"Access-Control-Allow-Origin": origin, "Access-Control-Expose-Headers": "ETag"}
    preflight = dict(cors_headers(origin, preflight=True))
    assert preflight.items() >= read.items()
    assert preflight["Access-Control-Allow-Methods"] == "GET"
    allowed = {h.strip() for h in preflight["Access-Control-Allow-Headers"].split(",")}
    assert allowed == {"Authorization", "Last-Event-ID", "If-None-Match"}  # the token, the SSE cursor, the ETag
    assert int(preflight["Access-Control-Max-Age"]) > 0
