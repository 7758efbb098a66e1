"""The two fronts, side by side: one sidecar of each (gevent, asgi) on the same Redis for the whole module, the same
requests sent to both, their answers compared where docs/protocol.md (or a browser) defines them, and each answer
also checked against what the document says, so that two fronts wrong the same way still fail.

Compared: status; the headers in HEADERS (Content-Type, Cache-Control, ETag, Retry-After, WWW-Authenticate, CORS,
Vary, Allow as a set, Sec-WebSocket-Version); error bodies' JSON whole; SSE bytes after the `retry:` value (the
head, the ready event, `id:` cursors, live frames, the keepalive, the token-expired end); WebSocket close codes
and reasons, and error replies' JSON. Not compared: Server, Date, Connection, framing (Content-Length vs chunked,
a HEAD's), the `retry:` value itself (jittered), /healthz figures, the replica's name, stream ids of different
publishes.

Where the document is silent and the fronts differed, the choice made (and why) is in the test's comment:
- unknown paths and wrong methods: 404 `not-found` / 405 `method-not-allowed` with the HTTP reason phrase as the
  message and an Allow of the methods served;
- OPTIONS is answered (200, with Allow and the CORS headers) only where CORS is offered, /sse and the state
  endpoint; elsewhere it is a wrong method (405): no browser preflights the other endpoints;
- the reason of a 1009 close is the WebSocket library's (its code is the contract).

A divergence is a failure: the fronts share one protocol (docs/protocol.md).
"""

from __future__ import annotations

import base64
import json
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import requests

from tests.processes import FRONTS, EmbeddedRedis, SidecarProcess
from tests.tokens import forget_earlier_garbage
from tests.tokens import mint as mint_with

SECRET = "agree-secret-" + "a" * 40
PUBLISHER_KEY = "publisher-key-agree-0000"
ADMIN_KEY = "admin-key-agree-00000000"
ORIGIN = "https://app.example"
MAX_CHANNELS, MAX_FRAME, MAX_PUBLISH = 5, 4096, 2048
KEEPALIVE, CLOSE_TIMEOUT, AUTH_TIMEOUT = 1.0, 1.0, 1.5
ENV = {
    "SIDECAR_DEV": "0",
    "SIDECAR_JWT_SECRET": SECRET,
    "SIDECAR_JWT_LEEWAY": "0",
    "SIDECAR_PUBLISHER_KEY": PUBLISHER_KEY,
    "SIDECAR_ADMIN_KEY": ADMIN_KEY,
    "SIDECAR_ALLOWED_ORIGINS": ORIGIN,
    "SIDECAR_CORS_ORIGINS": ORIGIN,
    "SIDECAR_MAX_CHANNELS": MAX_CHANNELS,
    "SIDECAR_MAX_FRAME_BYTES": MAX_FRAME,
    "SIDECAR_MAX_PUBLISH_BYTES": MAX_PUBLISH,
    "SIDECAR_SUBSCRIBE_BURST": 8,
    "SIDECAR_SUBSCRIBE_RATE": 1,
    "SIDECAR_KEEPALIVE": KEEPALIVE,
    "SIDECAR_CLOSE_TIMEOUT": CLOSE_TIMEOUT,
    "SIDECAR_AUTH_TIMEOUT": AUTH_TIMEOUT,
    "SIDECAR_POLICY_POLL": 0.2,
}
HEADERS = (
    "content-type", "cache-control", "etag", "retry-after", "www-authenticate", "vary", "allow",
    "access-control-allow-origin", "access-control-expose-headers", "access-control-allow-methods",
    "access-control-allow-headers", "access-control-max-age", "sec-websocket-version", "x-accel-buffering",
)  # fmt: skip
CORS_HEADERS = tuple(h for h in HEADERS if h.startswith("access-control-")) + ("vary",)
TOKENS = {"*": "", "a": ""}  # minted once the module starts (tests/conftest.py records every minted token)


def mint(channels: list[str] | str, ttl: float = 3600, **claims: object) -> str:
    return mint_with(SECRET, channels, ttl, **claims)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[dict[str, SidecarProcess], EmbeddedRedis]]:
    """One redis-server and one production-mode sidecar of each front, every guard configured."""
    forget_earlier_garbage()
    tmp = tmp_path_factory.mktemp("agree")
    server = EmbeddedRedis(tmp / "redis").start()
    started: dict[str, SidecarProcess] = {}
    try:
        for front in FRONTS:
            started[front] = SidecarProcess(server.url, tmp, ENV, front=front)
        TOKENS.update({"*": mint(["*"]), "a": mint(["a:*", "open"])})
        yield started, server
    finally:
        alive = {front: proc.running for front, proc in started.items()}
        for proc in started.values():
            proc.stop()
        server.stop()
    for front, proc in started.items():
        assert alive[front], f"the {front} sidecar died:\n{proc.log_tail(60)}"
        assert "Traceback" not in proc.log_text(), proc.log_tail(80)
        for secret in (SECRET, PUBLISHER_KEY, ADMIN_KEY):
            assert secret not in proc.log_text()


@pytest.fixture
def fronts(stack: tuple[dict[str, SidecarProcess], EmbeddedRedis]) -> dict[str, SidecarProcess]:
    return stack[0]


def each(fronts: dict[str, SidecarProcess], fn: Callable[[SidecarProcess], Any]) -> dict[str, Any]:
    """fn(sidecar) on both fronts at once (threads: waits overlap), by front."""
    results: dict[str, Any] = {}

    def run(front: str) -> None:
        try:
            results[front] = fn(fronts[front])
        except BaseException as exc:  # noqa: BLE001 (re-raised below, in the test's thread)
            results[front] = exc

    threads = [threading.Thread(target=run, args=(front,)) for front in fronts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    for value in results.values():
        if isinstance(value, BaseException):
            raise value
    return results


def agree(results: dict[str, Any]) -> Any:
    """The one answer both fronts gave (asserted equal), for the test to check against the document."""
    gevent, asgi = results["gevent"], results["asgi"]
    assert gevent == asgi, f"the fronts differ:\n  gevent: {gevent!r}\n  asgi:   {asgi!r}"
    return gevent


# -- HTTP ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Answer:
    status: int
    headers: tuple[tuple[str, Any], ...]
    body: Any  # the JSON document, or the bytes when the body is not JSON

    def header(self, name: str) -> Any:
        return dict(self.headers).get(name)


def header_value(name: str, value: str) -> Any:
    if name in ("allow", "vary"):  # lists: their order carries no meaning
        return frozenset(v.strip().lower() for v in value.split(","))
    return value


def answer_of(response: requests.Response, headers: tuple[str, ...] = HEADERS) -> Answer:
    kept = tuple((h, header_value(h, response.headers[h])) for h in headers if h in response.headers)
    body: Any = response.content
    if response.headers.get("content-type", "").startswith("application/json") and body:
        body = response.json()
    return Answer(response.status_code, kept, body)


def ask(
    fronts: dict[str, SidecarProcess], method: str, path: str, body: Any = None, compare: tuple[str, ...] = HEADERS,
    **kw: Any,
) -> Answer:  # fmt: skip
    """The same request to both fronts; the answer they agree on. `body`: bytes, or a function giving a fresh
    iterable per front (a chunked body)."""

    def send(sidecar: SidecarProcess) -> Answer:
        data = body() if callable(body) else body
        with requests.request(method, sidecar.url + path, data=data, timeout=10, allow_redirects=False, **kw) as r:
            return answer_of(r, compare)

    return agree(each(fronts, send))


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def publish(fronts: dict[str, SidecarProcess], body: dict[str, Any]) -> dict[str, Any]:
    """Publish through the gevent front (the message lands in the Redis both read)."""
    r = requests.post(fronts["gevent"].url + "/publish", json=body, headers=bearer(PUBLISHER_KEY), timeout=5)
    assert r.status_code == 200, r.text
    return r.json()["published"][0]


NOT_CORS = tuple(h for h in HEADERS if h not in CORS_HEADERS)
A = {"Authorization": "Bearer {a}"}  # filled in per test: tokens are minted once the module runs
ERRORS = [
    # (id, method, path, headers, status, error code)
    ("sse no token", "GET", "/sse?channel=a:1", {}, 401, "unauthorized"),
    ("sse bad token", "GET", "/sse?channel=a:1", {"Authorization": "Bearer nope"}, 401, "unauthorized"),
    ("sse bad ?token", "GET", "/sse?channel=a:1&token=nope", {}, 401, "unauthorized"),
    ("sse expired token", "GET", "/sse?channel=a:1&token={expired}", {}, 401, "token-expired"),
    ("sse two tokens", "GET", "/sse?channel=a:1&token={star}", A, 400, "ambiguous-token"),
    ("sse outside grant", "GET", "/sse?channel=b:1", A, 403, "forbidden"),
    ("sse one outside grant", "GET", "/sse?channel=a:1&channel=b:1", A, 403, "forbidden"),
    ("sse no channel", "GET", "/sse", A, 400, "no-channel"),
    ("sse bad channel", "GET", "/sse?channel=a%20b", A, 400, "bad-channel"),
    ("sse hash tag", "GET", "/sse?channel=a%7Bb%7D", A, 400, "bad-channel"),
    ("sse comma", "GET", "/sse?channel=a:1,a:2", A, 400, "bad-channel"),
    ("sse non-ascii", "GET", "/sse?channel=%D0%BA", A, 400, "bad-channel"),
    ("sse long channel", "GET", "/sse?channel=" + "a" * 201, A, 400, "bad-channel"),
    ("sse empty channel", "GET", "/sse?channel=", A, 400, "bad-channel"),
    ("sse bad mode", "GET", "/sse?channel=a:1&mode=all", A, 400, "bad-mode"),
    ("sse too many", "GET", "/sse?" + "&".join(f"channel=a:{i}" for i in range(MAX_CHANNELS + 1)), A, 400,
     "too-many-channels"),  # fmt: skip
    ("sse bad cursor", "GET", "/sse?channel=a:1", {**A, "Last-Event-ID": "zzz"}, 400, "bad-cursor"),
    ("sse cursor of 2", "GET", "/sse?channel=a:1", {**A, "Last-Event-ID": "1-0~ab,2-0~"}, 400, "bad-cursor"),
    ("sse cursor upper epoch", "GET", "/sse?channel=a:1", {**A, "Last-Event-ID": "1-0~AB"}, 400, "bad-cursor"),
    ("sse cursor 65 bits", "GET", "/sse?channel=a:1", {**A, "Last-Event-ID": "18446744073709551616-0~"}, 400,
     "bad-id"),  # fmt: skip
    ("sse cursor unicode digit", "GET", "/sse?channel=a:1&last_event_id=%D9%A1-0~", A, 400, "bad-id"),
    ("sse ?last_event_id", "GET", "/sse?channel=a:1&last_event_id=1-x~", A, 400, "bad-id"),
    ("head sse no channel", "HEAD", "/sse", A, 400, None),
    ("state no token", "GET", "/channels/a:1/state", {}, 401, "unauthorized"),
    ("state bad token", "GET", "/channels/a:1/state", {"Authorization": "Bearer nope"}, 401, "unauthorized"),
    ("state two tokens", "GET", "/channels/a:1/state?token={star}", A, 400, "ambiguous-token"),
    ("state outside grant", "GET", "/channels/b:1/state", A, 403, "forbidden"),
    ("state outside grant, unknown", "GET", "/channels/b:never/state", A, 403, "forbidden"),
    ("state bad channel", "GET", "/channels/a%20b/state", A, 400, "bad-channel"),
    ("state unknown", "GET", "/channels/a:never/state", A, 404, "unknown-channel"),
    ("publish no key", "POST", "/publish", {}, 401, "unauthorized"),
    ("publish wrong key", "POST", "/publish", {"Authorization": "Bearer wrong-key-000000000000"}, 401,
     "unauthorized"),  # fmt: skip
    ("publish basic auth", "POST", "/publish", {"Authorization": "Basic cHViOmtleQ=="}, 401, "unauthorized"),
    ("metrics no key", "GET", "/metrics", {}, 401, "unauthorized"),
    ("metrics wrong key", "GET", "/metrics", {"Authorization": "Bearer wrong-key-000000000000"}, 401,
     "unauthorized"),  # fmt: skip
    ("admin no key", "GET", "/admin/throttle", {}, 401, "unauthorized"),
    ("admin publisher key", "GET", "/admin/throttle", {"Authorization": f"Bearer {PUBLISHER_KEY}"}, 401,
     "unauthorized"),  # fmt: skip
    ("ws plain GET", "GET", "/ws", {}, 400, "not-websocket"),
    ("unknown path", "GET", "/nope", {}, 404, "not-found"),
    ("root", "GET", "/", {}, 404, "not-found"),
    ("nested channel path", "GET", "/channels/a/b/state", A, 404, "not-found"),
    ("empty channel path", "GET", "/channels//state", A, 404, "not-found"),
    ("unknown static", "GET", "/static/nope.js", {}, 404, "not-found"),
    ("unknown admin", "GET", "/admin/nope", {"Authorization": f"Bearer {ADMIN_KEY}"}, 404, "not-found"),
    ("POST sse", "POST", "/sse?channel=a:1", A, 405, "method-not-allowed"),
    ("PUT state", "PUT", "/channels/a:1/state", A, 405, "method-not-allowed"),
    ("GET publish", "GET", "/publish", {}, 405, "method-not-allowed"),
    ("POST healthz", "POST", "/healthz", {}, 405, "method-not-allowed"),
    ("POST ws", "POST", "/ws", {}, 405, "method-not-allowed"),
    ("POST admin", "POST", "/admin/throttle", {"Authorization": f"Bearer {ADMIN_KEY}"}, 405, "method-not-allowed"),
    ("OPTIONS publish", "OPTIONS", "/publish", {}, 405, "method-not-allowed"),
    ("OPTIONS healthz", "OPTIONS", "/healthz", {}, 405, "method-not-allowed"),
    ("OPTIONS admin", "OPTIONS", "/admin/throttle", {}, 405, "method-not-allowed"),
]


def filled(text: str) -> str:
    return text.format(a=TOKENS["a"], star=TOKENS["*"], expired=mint(["*"], ttl=-10))


@pytest.mark.parametrize(("method", "path", "headers", "status", "code"), [e[1:] for e in ERRORS],
                         ids=[e[0] for e in ERRORS])  # fmt: skip
def test_refusals_agree_in_status_headers_and_json_body(fronts, method, path, headers, status, code):
    """Every refusal the document lists (and the unknown paths and wrong methods it does not), on both fronts:
    one status, one JSON body {"error", "message"} (the message too: no front leaks more, e.g. why a token
    failed), one WWW-Authenticate (RFC 6750: no error code when no credentials came), one Allow on a 405."""
    headers = {k: filled(v) for k, v in headers.items()}
    got = ask(fronts, method, filled(path), headers=headers, compare=NOT_CORS)
    assert got.status == status
    if method == "HEAD":
        assert got.body == b""
        return
    assert set(got.body) == {"error", "message"} and got.body["error"] == code
    assert got.header("content-type") == "application/json"
    if status == 401:  # RFC 6750 section 3.1: an error code only when a bearer credential came (token or key)
        credentials = headers.get("Authorization", "").startswith("Bearer") or "token=" in path
        expected = 'Bearer realm="sidecar"' + (', error="invalid_token"' if credentials else "")
        assert got.header("www-authenticate") == expected
    if status == 405:
        assert got.header("allow") and method.lower() not in got.header("allow")
        cors = path.startswith(("/sse", "/channels/"))
        assert ("options" in got.header("allow")) == cors  # OPTIONS only where CORS is offered


def test_no_refusal_names_the_token_or_key_it_refused(fronts):
    secretish = mint(["*"], ttl=-10)
    for headers in ({"Authorization": f"Bearer {secretish}"}, {"Authorization": "Bearer wrong-key-000000000000"}):
        for path in ("/sse?channel=a:1", "/channels/a:1/state", "/publish", "/metrics", "/admin/throttle"):
            got = ask(fronts, "POST" if path == "/publish" else "GET", path, headers=headers, compare=NOT_CORS)
            assert got.status == 401
            text = json.dumps(got.body)
            assert secretish not in text and "wrong-key" not in text and secretish.split(".")[1] not in text


# A browser reading a refusal cross-origin needs the CORS headers on it too (else it sees a network error, not
# the 401 that says "fetch a fresh token"), and a cache needs Vary: Origin on every answer of a CORS endpoint.
CORS_ERRORS = [("GET", "/sse?channel=a:1", {}), ("GET", "/sse?channel=b:1", A), ("GET", "/sse", A),
               ("GET", "/channels/b:1/state", A), ("GET", "/channels/a%20b/state", A),
               ("GET", "/channels/a:1/state", {"Authorization": "Bearer nope"})]  # fmt: skip


@pytest.mark.parametrize(("method", "path", "headers"), CORS_ERRORS)
def test_refusals_of_the_browser_reads_carry_the_cors_headers(fronts, method, path, headers):
    headers = {**{k: filled(v) for k, v in headers.items()}, "Origin": ORIGIN}
    got = ask(fronts, method, path, headers=headers)
    assert got.status >= 400
    assert got.header("access-control-allow-origin") == ORIGIN and got.header("vary") == {"origin"}


def test_a_refusal_for_a_foreign_origin_has_vary_but_no_cors_grant(fronts):
    got = ask(fronts, "GET", "/channels/a:never/state", headers={**bearer(TOKENS["a"]), "Origin": "https://evil.example"})
    assert got.status == 404 and got.header("vary") == {"origin"}
    assert got.header("access-control-allow-origin") is None


@pytest.mark.parametrize("path", ["/sse", "/channels/a:1/state"])
@pytest.mark.parametrize("origin", [ORIGIN, "https://evil.example"])
def test_preflights_agree(fronts, path, origin):
    """The preflight of a cross-origin read: 200, no body, the CORS headers for an allowed origin only, Vary."""
    headers = {"Origin": origin, "Access-Control-Request-Method": "GET",
               "Access-Control-Request-Headers": "authorization, last-event-id"}  # fmt: skip
    got = ask(fronts, "OPTIONS", path, headers=headers, compare=tuple(h for h in HEADERS if h != "allow"))
    assert got.status == 200 and got.body == b"" and got.header("vary") == {"origin"}
    assert got.header("content-type") is None  # no body, so no type (Flask's default was text/html)
    if origin == ORIGIN:
        assert got.header("access-control-allow-origin") == ORIGIN
        assert got.header("access-control-allow-methods") == "GET"
        allowed = {h.strip().lower() for h in got.header("access-control-allow-headers").split(",")}
        assert {"authorization", "last-event-id", "if-none-match"} <= allowed
        assert got.header("access-control-expose-headers") == "ETag"
    else:
        assert got.header("access-control-allow-origin") is None


@pytest.mark.parametrize("path", ["/sse", "/channels/a:1/state"])
def test_an_options_answer_says_which_methods_are_allowed(fronts, path):
    got = ask(fronts, "OPTIONS", path, headers={"Origin": ORIGIN, "Access-Control-Request-Method": "GET"})
    assert got.header("allow") == {"get", "head", "options"}


# -- state ------------------------------------------------------------------------------------------------
def test_the_state_endpoint_agrees_byte_for_byte_with_its_etag_and_304s(fronts):
    done = publish(fronts, {"channel": "a:state", "event": "e", "state": {"n": 1, "s": "é"}})
    auth = bearer(TOKENS["a"])
    got = ask(fronts, "GET", "/channels/a:state/state", headers={**auth, "Origin": ORIGIN})
    etag = f'"{done["epoch"]}:{done["id"]}"'
    assert got.status == 200 and got.header("etag") == etag and got.header("content-type") == "application/json"
    assert got.body == {"channel": "a:state", "id": done["id"], "seq": done["seq"], "epoch": done["epoch"],
                        "state": {"n": 1, "s": "é"}}  # fmt: skip
    assert got.header("access-control-allow-origin") == ORIGIN and got.header("access-control-expose-headers") == "ETag"
    for if_none_match in (etag, f"W/{etag}", f'"x:1-0", {etag}', "*"):
        not_modified = ask(fronts, "GET", "/channels/a:state/state", headers={**auth, "If-None-Match": if_none_match})
        assert not_modified.status == 304 and not_modified.header("etag") == etag and not_modified.body == b""
    stale = ask(fronts, "GET", "/channels/a:state/state", headers={**auth, "If-None-Match": '"x:1-0"'})
    assert stale.status == 200
    head = ask(fronts, "HEAD", "/channels/a:state/state", headers=auth)
    assert head.status == 200 and head.header("etag") == etag and head.body == b""
    # Every publish changes the ETag, a poke included.
    poked = publish(fronts, {"channel": "a:state", "event": "p", "kind": "poke"})
    assert ask(fronts, "GET", "/channels/a:state/state", headers=auth).header("etag") == \
        f'"{poked["epoch"]}:{poked["id"]}"'  # fmt: skip


def test_the_state_of_a_channel_without_state_is_null(fronts):
    done = publish(fronts, {"channel": "a:events", "event": "e", "data": [1]})
    got = ask(fronts, "GET", "/channels/a:events/state", headers=bearer(TOKENS["a"]))
    assert got.status == 200 and got.body["state"] is None and got.body["seq"] == done["seq"]


# -- publish ----------------------------------------------------------------------------------------------
PUBLISH_ERRORS = [
    ("bad json", b"{nope", 400, "bad-json"),
    ("empty", b"", 400, "bad-json"),
    ("array", b"[]", 400, "bad-request"),
    ("string", b'"x"', 400, "bad-request"),
    ("empty batch", b'{"messages": []}', 400, "bad-request"),
    ("batch not alone", b'{"messages": [{"channel": "p:1", "event": "e"}], "x": 1}', 400, "bad-request"),
    ("batch not a list", b'{"messages": {"channel": "p:1"}}', 400, "bad-request"),
    ("unknown kind", b'{"channel": "p:1", "event": "e", "kind": "nope"}', 400, "bad-kind"),
    ("kind not a string", b'{"channel": "p:1", "event": "e", "kind": 3}', 400, "bad-kind"),
    ("bad channel", b'{"channel": "p 1", "event": "e"}', 400, "bad-channel"),
    ("channel not a string", b'{"channel": 7, "event": "e"}', 400, "bad-channel"),
    ("no channel", b'{"event": "e"}', 400, "bad-channel"),
    ("bad event", b'{"channel": "p:1", "event": "e@"}', 400, "bad-event"),
    ("no event", b'{"channel": "p:1"}', 400, "bad-event"),
    ("changes not an object", b'{"channel": "p:1", "event": "e", "changes": [1]}', 400, "bad-change"),
    ("state not an object", b'{"channel": "p:1", "event": "e", "state": 1}', 400, "bad-change"),
    ("diff without changes", b'{"channel": "p:1", "event": "e", "kind": "diff"}', 400, "bad-request"),
    ("unknown field", b'{"channel": "p:1", "event": "e", "bogus": 1}', 400, "bad-request"),
    ("second message bad", b'{"messages": [{"channel": "p:1", "event": "e"}, {"channel": "p:1", "event": 5}]}', 400,
     "bad-event"),  # fmt: skip
    ("65-bit integer", b'{"channel": "p:1", "event": "e", "data": 18446744073709551616}', 400, "bad-number"),
    ("deep changes", b'{"channel": "p:1", "event": "e", "changes": ' + b'{"a":' * 70 + b"1" + b"}" * 71, 400,
     "bad-change"),  # fmt: skip
    ("data over the limit", b'{"channel": "p:1", "event": "e", "data": "' + b"x" * (MAX_PUBLISH + 10) + b'"}', 400,
     "too-large"),  # fmt: skip
    ("body over twice the limit", b'{"channel": "p:1", "event": "e", "data": "' + b"x" * (2 * MAX_PUBLISH) + b'"}',
     413, "too-large"),  # fmt: skip
]


@pytest.mark.parametrize(("body", "status", "code"), [e[1:] for e in PUBLISH_ERRORS],
                         ids=[e[0] for e in PUBLISH_ERRORS])  # fmt: skip
def test_publish_refusals_agree(fronts, body, status, code):
    got = ask(fronts, "POST", "/publish", body, headers={**bearer(PUBLISHER_KEY), "Content-Type": "application/json"})
    assert got.status == status and got.body["error"] == code and set(got.body) == {"error", "message"}
    if b'"messages"' in body and code != "bad-request":
        assert got.body["message"].startswith("message 1: ")  # the batch's bad message, by its index


def test_a_batch_with_one_bad_message_publishes_none_of_it(fronts):
    def send(sidecar: SidecarProcess) -> tuple[int, str, int]:
        channel = f"a:batch:none:{sidecar.front}"
        batch = {"messages": [{"channel": channel, "event": "e", "state": {"x": 1}}, {"channel": channel}]}
        with requests.post(sidecar.url + "/publish", json=batch, headers=bearer(PUBLISHER_KEY), timeout=5) as r:
            refused = r.json()["error"]
        state = requests.get(f"{sidecar.url}/channels/{channel}/state", headers=bearer(TOKENS["a"]), timeout=5)
        return r.status_code, refused, state.status_code

    assert agree(each(fronts, send)) == (400, "bad-event", 404)


def chunks(*parts: bytes) -> Callable[[], Iterator[bytes]]:
    return lambda: iter(parts)


def test_a_chunked_publish_body_is_read_whole_and_one_over_the_limit_gets_413(fronts):
    auth = bearer(PUBLISHER_KEY)
    def small(sidecar: SidecarProcess) -> tuple[int, str, list[str]]:
        body = chunks(f'{{"channel": "p:chunked:{sidecar.front}",'.encode(), b' "event": "e"}')()
        with requests.post(sidecar.url + "/publish", data=body, headers=auth, timeout=5) as r:
            return r.status_code, r.headers["content-type"], [p["channel"] for p in r.json()["published"]]

    got = each(fronts, small)  # both read the body whole and published it
    assert got == {f: (200, "application/json", [f"p:chunked:{f}"]) for f in FRONTS}
    big = ask(fronts, "POST", "/publish", chunks(b'{"channel":"p:1","event":"e","data":"', *[b"x" * 1000] * 5, b'"}'),
              headers=auth)  # fmt: skip
    assert big.status == 413 and big.body["error"] == "too-large"


def test_a_published_batch_answers_in_request_order_on_both_fronts(fronts):
    def send(sidecar: SidecarProcess) -> list[dict[str, Any]]:
        messages = [{"channel": f"p:batch:{sidecar.front}", "event": "e", "changes": {"i": i}} for i in range(3)]
        messages.append({"channel": f"p:other:{sidecar.front}", "event": "e", "kind": "poke"})
        r = requests.post(sidecar.url + "/publish", json={"messages": messages}, headers=bearer(PUBLISHER_KEY),
                          timeout=5)  # fmt: skip
        assert r.status_code == 200 and r.headers["content-type"] == "application/json", r.text
        published = r.json()["published"]
        assert all(set(p) == {"channel", "id", "seq", "epoch"} for p in published)
        assert all(re.fullmatch(r"[0-9]+-[0-9]+", p["id"]) and re.fullmatch(r"[0-9a-f]{1,32}", p["epoch"])
                   for p in published)  # fmt: skip
        return [(p["channel"].rsplit(":", 1)[0], p["seq"]) for p in published]

    assert agree(each(fronts, send)) == [("p:batch", 1), ("p:batch", 2), ("p:batch", 3), ("p:other", 1)]


# -- health, metrics, admin ---------------------------------------------------------------------------------
def test_healthz_and_metrics_agree_in_shape(fronts):
    def health(sidecar: SidecarProcess) -> tuple[Any, ...]:
        r = requests.get(sidecar.url + "/healthz", timeout=5)
        body = r.json()
        return r.status_code, r.headers["content-type"], sorted(body), body["ok"], body["reader"], \
            type(body["connections"])  # fmt: skip

    status, kind, keys, ok, reader, connections = agree(each(fronts, health))
    assert (status, kind, ok, reader, connections) == (200, "application/json", True, True, int)
    assert {"ok", "reader", "connections"} <= set(keys)
    def metrics(sidecar: SidecarProcess) -> tuple[int, str, bool]:
        with requests.get(sidecar.url + "/metrics", headers=bearer(ADMIN_KEY), timeout=5) as r:
            return r.status_code, r.headers["content-type"], "sidecar_connections" in r.text

    status, kind, named = agree(each(fronts, metrics))
    assert status == 200 and kind.startswith("text/plain") and named


def policy_version(sidecar: SidecarProcess) -> int:
    return requests.get(sidecar.url + "/admin/throttle", headers=bearer(ADMIN_KEY), timeout=5).json()["version"]


def put_policy(fronts: dict[str, SidecarProcess], via: str, doc: dict[str, Any] | None) -> None:
    """PUT (None: DELETE) the policy through one front; wait until both apply it (they share its Redis)."""
    method = "DELETE" if doc is None else "PUT"
    r = requests.request(method, fronts[via].url + "/admin/throttle", json=doc, headers=bearer(ADMIN_KEY), timeout=5)
    assert r.status_code == 200, r.text
    version = r.json()["version"]
    deadline = time.monotonic() + 10
    while any(policy_version(s) != version for s in fronts.values()):
        assert time.monotonic() < deadline, "a replica never applied the policy"
        time.sleep(0.05)


def test_the_admin_api_agrees(fronts):
    auth = bearer(ADMIN_KEY)

    def described(sidecar: SidecarProcess) -> tuple[int, str, dict[str, Any]]:
        r = requests.get(sidecar.url + "/admin/throttle", headers=auth, timeout=5)
        body = r.json()
        body.pop("replica")
        return r.status_code, r.headers["content-type"], body

    put_policy(fronts, "asgi", {"channels": {"agree:*": {"window": 0.25}}})
    try:
        status, kind, body = agree(each(fronts, described))
        assert status == 200 and kind == "application/json" and body["source"] == "redis"
        assert body["policy"]["channels"]["agree:*"]["window"] == 0.25
    finally:
        put_policy(fronts, "gevent", None)
    assert agree(each(fronts, described))[2]["source"] == "settings"
    for doc, code in ((b"{nope", "bad-json"), (b"[1]", "bad-policy"), (b'{"bogus": 1}', "bad-policy"),
                      (b'{"max_connections": -1}', "bad-policy")):  # fmt: skip
        refused = ask(fronts, "PUT", "/admin/throttle", doc, headers=auth)
        assert refused.status == 400 and refused.body["error"] == code
    assert agree(each(fronts, described))[2]["source"] == "settings"  # a refused document changed nothing


def test_the_policy_change_log_is_written_and_read_by_both_fronts(fronts):
    auth = bearer(ADMIN_KEY)
    for via in FRONTS:
        put_policy(fronts, via, {"channels": {f"log:{via}:*": {"window": 0.5}}})
    put_policy(fronts, "gevent", None)

    def last(sidecar: SidecarProcess) -> tuple[int, list[tuple[str, str]]]:
        r = requests.get(sidecar.url + "/admin/throttle/log?n=3", headers=auth, timeout=5)
        changes = r.json()["changes"] if r.status_code == 200 else []
        return r.status_code, [(c["who"], c["what"]) for c in changes]

    status, changes = agree(each(fronts, last))
    assert status == 200 and [who for who, _ in changes] == ["admin"] * 3
    assert "log:asgi:*" in changes[1][1] and "log:gevent:*" in changes[2][1]
    refused = ask(fronts, "GET", "/admin/throttle/log?n=0", headers=auth)
    assert refused.status == 400 and refused.body["error"] == "bad-request"


# -- SSE ----------------------------------------------------------------------------------------------------
class Stream:
    """A raw HTTP/1.1 request whose body is read as it comes (de-chunked): what a client's bytes really are."""

    def __init__(self, sidecar: SidecarProcess, request: bytes) -> None:
        self.sock = socket.create_connection(("127.0.0.1", sidecar.port), timeout=10)
        self.sock.sendall(request)
        raw = b""
        while b"\r\n\r\n" not in raw:
            chunk = self.sock.recv(65536)
            assert chunk, f"no head: {raw!r}"
            raw += chunk
        head, _, self.raw = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split()[1])
        self.headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        self.connection = ", ".join(v for k, _, v in (line.partition(":") for line in lines[1:])
                                    if k.strip().lower() == "connection")  # fmt: skip
        self.chunked = self.headers.get("transfer-encoding") == "chunked"
        self.body = b""
        self.ended = False

    def _decode(self) -> None:
        if not self.chunked:
            self.body, self.raw = self.body + self.raw, b""
            return
        while b"\r\n" in self.raw:
            size_line, _, rest = self.raw.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            if len(rest) < size + 2:
                return
            if size == 0:
                self.ended = True
            self.body, self.raw = self.body + rest[:size], rest[size + 2 :]

    def read_until(self, done: Callable[[bytes], bool], timeout: float = 10.0) -> bytes:
        """The body so far, once done(body) (or the stream ended: then done need not hold)."""
        deadline = time.monotonic() + timeout
        self._decode()
        while not done(self.body) and not self.ended:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                raise AssertionError(f"timed out; got {self.body[-300:]!r}") from None
            if not chunk:
                self.ended = True
                break
            self.raw += chunk
            self._decode()
        return self.body

    def close(self) -> None:
        self.sock.close()


def sse_request(path: str, token: str, *headers: str) -> bytes:
    extra = "".join(f"{h}\r\n" for h in headers)
    return f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n{extra}\r\n".encode()


RETRY = re.compile(rb"retry: ([0-9]+)\n\n")
READY = b"event: ready\n"


def split_retry(body: bytes) -> tuple[int, bytes]:
    match = RETRY.match(body)
    assert match, body[:100]
    return int(match[1]), body[match.end() :]


def test_the_sse_head_and_ready_agree_byte_for_byte(fronts):
    """A stream of three channels (one with state, one with events only, one never published), resumed or not:
    `retry:` (2000 ms times 1-2) first, then each channel's frames in sorted order with the cursor as `id:`,
    then `ready`; the same bytes from both fronts (they read one Redis)."""
    publish(fronts, {"channel": "a:sse:2", "event": "e", "state": {"x": 1}})
    first = publish(fronts, {"channel": "a:sse:1", "event": "e", "data": 1})
    publish(fronts, {"channel": "a:sse:1", "event": "e", "data": 2})
    cursors = [None, f"{first['id']}~{first['epoch']},0-0~,0-0~"]
    for cursor in cursors:
        headers = [f"Last-Event-ID: {cursor}"] if cursor else []
        path = "/sse?channel=a:sse:3&channel=a:sse:2&channel=a:sse:1&channel=a:sse:2&mode=diff"

        def head(sidecar: SidecarProcess, path: str = path, headers: list[str] = headers) -> tuple[Any, ...]:
            stream = Stream(sidecar, sse_request(path, TOKENS["a"], f"Origin: {ORIGIN}", *headers))
            try:
                body = stream.read_until(lambda b: READY in b and b.endswith(b"\n\n"))
            finally:
                stream.close()
            kept = {h: stream.headers.get(h) for h in ("content-type", "cache-control", "vary",
                                                       "access-control-allow-origin", "x-accel-buffering")}
            return stream.status, kept, split_retry(body)[1]

        status, kept, rest = agree(each(fronts, head))
        assert status == 200 and kept["content-type"].startswith("text/event-stream")
        assert kept["cache-control"] == "no-cache" and kept["access-control-allow-origin"] == ORIGIN
        events = rest.split(b"\n\n")[:-1]
        assert events[-1].split(b"\n")[1:] == [b"event: ready", b'data: {"type":"ready","channels":["a:sse:1",'
                                               b'"a:sse:2","a:sse:3"],"mode":"diff"}']  # fmt: skip
        assert all(e.startswith(b"id: ") and e.split(b"\n")[0].count(b",") == 2 for e in events)
        names = [e.split(b"\n")[1] for e in events]
        if cursor is None:  # fresh: the snapshot of the channel with state; no frames for the others
            assert names == [b"event: snapshot", b"event: ready"]
        else:  # resumed: a:sse:1's missed message, a:sse:2's one message (0-0~: no epoch check), a:sse:3 none
            assert names[0] == b"event: message" and b'"seq":2' in events[0]
            assert names[-1] == b"event: ready"


def test_last_event_id_wins_over_the_query_cursor(fronts):
    done = publish(fronts, {"channel": "a:wins", "event": "e", "data": 1})
    publish(fronts, {"channel": "a:wins", "event": "e", "data": 2})
    cursor = f"{done['id']}~{done['epoch']}"

    def run(sidecar: SidecarProcess) -> list[bytes]:
        stream = Stream(sidecar, sse_request("/sse?channel=a:wins&mode=event&last_event_id=garbage", TOKENS["a"],
                                             f"Last-Event-ID: {cursor}"))  # fmt: skip
        try:
            body = stream.read_until(lambda b: READY in b and b.endswith(b"\n\n"))
        finally:
            stream.close()
        return [e.split(b"\n")[1] for e in split_retry(body)[1].split(b"\n\n")[:-1]]

    assert agree(each(fronts, run)) == [b"event: message", b"event: ready"]  # resumed: the one message after it


def test_the_retry_hint_is_2000_ms_times_a_random_1_to_2(fronts):
    def hints(sidecar: SidecarProcess) -> list[int]:
        values = []
        for _ in range(6):
            stream = Stream(sidecar, sse_request("/sse?channel=a:hint", TOKENS["a"]))
            values.append(split_retry(stream.read_until(lambda b: READY in b))[0])
            stream.close()
        return values

    for values in each(fronts, hints).values():
        assert all(2000 <= v < 4000 for v in values) and len(set(values)) > 1


def test_live_frames_and_the_keepalive_agree_byte_for_byte(fronts):
    streams = each(fronts, lambda s: Stream(s, sse_request("/sse?channel=a:live&channel=open&mode=diff",
                                                            TOKENS["a"])))  # fmt: skip
    try:
        for stream in streams.values():
            stream.read_until(lambda b: READY in b and b.endswith(b"\n\n"))
            stream.body = b""
        done = publish(fronts, {"channel": "a:live", "event": "moved", "changes": {"k": [1, None]}, "data": "d"})
        bodies = {f: s.read_until(lambda b: b"event: message" in b and b.endswith(b"\n\n")) for f, s in streams.items()}
        frame = agree({f: b.replace(b":\n\n", b"") for f, b in bodies.items()})  # a keepalive may come first
        lines = frame.split(b"\n")
        assert lines[0] == f"id: {done['id']}~{done['epoch']},0-0~".encode() and lines[1] == b"event: message"
        data = json.loads(lines[2].removeprefix(b"data: "))
        assert {k: data[k] for k in ("type", "channel", "id", "seq", "epoch", "event", "diff", "data")} == {
            "type": "message", "channel": "a:live", "id": done["id"], "seq": done["seq"], "epoch": done["epoch"],
            "event": "moved", "diff": {"k": [1, None]}, "data": "d"}  # fmt: skip
        assert isinstance(data["ts"], float)
        # Idle: the `:` comment every keepalive (SIDECAR_KEEPALIVE here), the same bytes from both.
        for stream in streams.values():
            stream.body = b""
        keepalives = {f: s.read_until(lambda b: b.endswith(b"\n\n"), timeout=KEEPALIVE + 5) for f, s in streams.items()}
        assert agree(keepalives) == b":\n\n"
    finally:
        for stream in streams.values():
            stream.close()


def test_an_sse_stream_ends_with_token_expired_when_its_token_expires(fronts):
    token = mint(["a:*"], ttl=2)

    def run(sidecar: SidecarProcess) -> tuple[bytes, bool]:
        stream = Stream(sidecar, sse_request("/sse?channel=a:expiring", token))
        try:
            body = stream.read_until(lambda b: b"token-expired" in b and b.endswith(b"\n\n"), timeout=10)
            tail = body[body.rindex(b"event: error") :]
            stream.read_until(lambda b: False, timeout=5)  # and then the body ends
            return tail, stream.ended
        finally:
            stream.close()

    tail, ended = agree(each(fronts, run))
    assert tail == b'event: error\ndata: {"type":"error","code":"token-expired","message":"reconnect with a fresh ' \
        b'token"}\n\n' and ended  # fmt: skip


def test_an_sse_answer_to_a_request_that_asks_to_close_says_close_only(fronts):
    """Connection is hop-by-hop (RFC 9110 section 7.6.1): an SSE answer adds no `keep-alive` of its own, never
    beside the `close` the client asked for. (gevent.pywsgi sends no Connection header at all here.)"""

    def run(sidecar: SidecarProcess) -> bool:
        stream = Stream(sidecar, sse_request("/sse?channel=a:1", TOKENS["a"], "Connection: close"))
        stream.close()
        return "keep-alive" in {t.strip().lower() for t in stream.connection.split(",")}

    assert agree(each(fronts, run)) is False


def test_head_of_sse_is_the_streams_head_without_a_body(fronts):
    got = ask(fronts, "HEAD", "/sse?channel=a:1", headers={**bearer(TOKENS["a"]), "Origin": ORIGIN})
    assert got.status == 200 and got.body == b"" and got.header("cache-control") == "no-cache"
    assert got.header("content-type").startswith("text/event-stream")
    assert got.header("access-control-allow-origin") == ORIGIN


# -- WebSocket ----------------------------------------------------------------------------------------------
def ws_frame(opcode: int, payload: bytes, fin: bool = True, masked: bool = True) -> bytes:
    head = bytes([(0x80 if fin else 0) | opcode])
    n, mask_bit = len(payload), 0x80 if masked else 0
    if n < 126:
        head += bytes([mask_bit | n])
    elif n < 65536:
        head += bytes([mask_bit | 126]) + n.to_bytes(2, "big")
    else:
        head += bytes([mask_bit | 127]) + n.to_bytes(8, "big")
    if not masked:
        return head + payload
    mask = os.urandom(4)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def text(body: object) -> bytes:
    return ws_frame(0x1, json.dumps(body).encode())


CLOSE_OK = ws_frame(0x8, (1000).to_bytes(2, "big"))
KEY = base64.b64encode(b"agree-fronts-key").decode()


class RawWS:
    """A WebSocket over a raw socket: what any frame a client may send does to the server."""

    def __init__(self, sidecar: SidecarProcess, token: str | None = None, query: str = "", *headers: str) -> None:
        lines = ["Host: 127.0.0.1", "Upgrade: websocket", "Connection: Upgrade", "Sec-WebSocket-Version: 13",
                 f"Sec-WebSocket-Key: {KEY}", *headers] + ([f"Authorization: Bearer {token}"] if token else [])
        self.sock = socket.create_connection(("127.0.0.1", sidecar.port), timeout=10)
        self.sock.sendall(f"GET /ws{query} HTTP/1.1\r\n".encode() + b"".join(f"{h}\r\n".encode() for h in lines)
                          + b"\r\n")  # fmt: skip
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = self.sock.recv(4096)
            assert chunk, data
            data += chunk
        head, _, self.buffer = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head

    def send(self, *frames: bytes) -> None:
        self.sock.sendall(b"".join(frames))

    def next(self, timeout: float = 10.0) -> tuple[int, bytes]:
        """The next frame, pings included: (opcode, payload); (-1, b"") when TCP ended."""
        self.sock.settimeout(timeout)
        while True:
            data = self.buffer
            if len(data) >= 2:
                n, at = data[1] & 0x7F, 2
                if n == 126:
                    n, at = int.from_bytes(data[2:4], "big"), 4
                elif n == 127:
                    n, at = int.from_bytes(data[2:10], "big"), 10
                if len(data) >= at + n:
                    self.buffer = data[at + n :]
                    return data[0] & 0x0F, data[at : at + n]
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                return -1, b""
            self.buffer += chunk

    def reply(self, timeout: float = 10.0) -> dict[str, Any]:
        """The next text frame (pings skipped), as JSON."""
        while True:
            opcode, payload = self.next(timeout)
            if opcode == 0x1:
                return json.loads(payload)
            assert opcode == 0x9, (opcode, payload)

    def closed(self, timeout: float = 10.0) -> tuple[int | None, str]:
        """Frames until the server's close frame: its code and reason (then answer it)."""
        while True:
            opcode, payload = self.next(timeout)
            assert opcode != -1, "TCP ended without a close frame"
            if opcode == 0x8:
                with_code = len(payload) >= 2
                code = int.from_bytes(payload[:2], "big") if with_code else None
                self.sock.sendall(ws_frame(0x8, payload[:2]))
                return code, payload[2:].decode()

    def close(self) -> None:
        self.sock.close()


@dataclass(frozen=True)
class BadFrame:
    frames: tuple[bytes, ...]
    code: int
    reason: str | None  # None: the transport library's words (not compared: see the module's docstring)


BAD_FRAMES = {
    "malformed JSON": BadFrame((ws_frame(0x1, b"{nope"),), 1007, "frames must be JSON objects"),
    "not an object": BadFrame((ws_frame(0x1, b"[1]"),), 1007, 'frames are JSON objects with an "op"'),
    "no op": BadFrame((ws_frame(0x1, b'{"channel": "a:1"}'),), 1007, 'frames are JSON objects with an "op"'),
    "op not a string": BadFrame((ws_frame(0x1, b'{"op": 1}'),), 1007, 'frames are JSON objects with an "op"'),
    "binary": BadFrame((ws_frame(0x2, b'{"op": "ping"}'),), 1003,
                       "binary frames are not part of this protocol; send JSON text"),
    "invalid UTF-8": BadFrame((ws_frame(0x1, b'{"op": "\xff"}'),), 1007,
                              "'utf-8' codec can't decode byte 0xff in position 8: invalid start byte"),
    "oversize": BadFrame((ws_frame(0x1, b'{"op": "ping", "x": "' + b"x" * MAX_FRAME + b'"}'),), 1009, None),
    "oversize in fragments": BadFrame((ws_frame(0x1, b'{"op": "ping", "x": "', fin=False),
                                       *[ws_frame(0x0, b"x" * 1000, fin=False)] * 5, ws_frame(0x0, b'"}')), 1009, None),
    "fragmented control": BadFrame((ws_frame(0x9, b"hi", fin=False),), 1002,
                                   "Invalid attempt to fragment control frame"),
    "control over 125": BadFrame((ws_frame(0x9, b"x" * 126),), 1002, "Control frame with payload len > 125"),
    "unmasked": BadFrame((ws_frame(0x1, b'{"op": "ping"}', masked=False),), 1002,
                         "server received unexpected unmasked frame"),
    "reserved opcode": BadFrame((ws_frame(0x3, b"x"),), 1002, "Invalid opcode 0x3"),
    "reserved bit": BadFrame((bytes([0xC1]) + ws_frame(0x1, b'{"op": "ping"}')[1:],), 1002,
                             "Reserved bit set unexpectedly"),
    "continuation first": BadFrame((ws_frame(0x0, b"x"),), 1002, "unexpected CONTINUATION"),
    "auth bad token": BadFrame((text({"op": "auth", "token": "nope"}),), 3000, "the token is not valid"),
    "auth not a string": BadFrame((text({"op": "auth", "token": 5}),), 3000, "a bearer token is required"),
    "auth expired": BadFrame((), 3000, "the token has expired"),  # its frame is made when the test runs
}  # fmt: skip


@pytest.mark.parametrize("name", BAD_FRAMES)
def test_each_kind_of_bad_frame_closes_with_the_same_code_and_reason(fronts, name):
    bad = BAD_FRAMES[name]
    needs_token = not name.startswith("auth")
    frames = bad.frames or (text({"op": "auth", "token": mint(["*"], ttl=-10)}),)

    def run(sidecar: SidecarProcess) -> tuple[int | None, str | None]:
        ws = RawWS(sidecar, TOKENS["*"] if needs_token else None)
        try:
            ws.send(*frames)
            code, reason = ws.closed()
        finally:
            ws.close()
        return code, reason if bad.reason is not None else None

    code, reason = agree(each(fronts, run))
    assert code == bad.code and reason == bad.reason


def test_a_fragmented_text_frame_is_one_frame(fronts):
    def run(sidecar: SidecarProcess) -> dict[str, Any]:
        ws = RawWS(sidecar, TOKENS["*"])
        try:
            ws.send(ws_frame(0x1, b'{"op": "unsub', fin=False), ws_frame(0x9, b"mid"), ws_frame(0x0, b'scribe", '
                    b'"channel": "a:1"}'))  # fmt: skip
            opcode, payload = ws.next()
            while opcode == 0x9:  # the server's own keepalive
                opcode, payload = ws.next()
            assert (opcode, payload) == (0xA, b"mid")  # the ping in between is answered (RFC 6455 section 5.4)
            return ws.reply()
        finally:
            ws.close()

    assert agree(each(fronts, run)) == {"type": "unsubscribed", "channel": "a:1"}


OP_ERRORS = {
    "unknown op": ({"op": "zap"}, "unknown-op", None),
    "outside the grant": ({"op": "subscribe", "channel": "b:1"}, "forbidden", "b:1"),
    "bad channel": ({"op": "subscribe", "channel": "a b"}, "bad-channel", "a b"),
    "channel not a string": ({"op": "subscribe", "channel": 5}, "bad-channel", None),
    "bad mode": ({"op": "subscribe", "channel": "a:1", "mode": "all"}, "bad-mode", "a:1"),
    "since not a string": ({"op": "subscribe", "channel": "a:1", "since": 5}, "bad-since", "a:1"),
    "bad since": ({"op": "subscribe", "channel": "a:1", "since": "x"}, "bad-id", "a:1"),
    "since of 65 bits": ({"op": "subscribe", "channel": "a:1", "since": "18446744073709551616-0"}, "bad-id", "a:1"),
    "bad epoch": ({"op": "subscribe", "channel": "a:1", "since": "1-0", "epoch": "XY"}, "bad-cursor", "a:1"),
    "unsubscribe bad channel": ({"op": "unsubscribe", "channel": "{x}"}, "bad-channel", "{x}"),
}


@pytest.mark.parametrize("name", OP_ERRORS)
def test_a_bad_op_gets_the_same_error_frame_and_the_socket_stays_open(fronts, name):
    op, code, channel = OP_ERRORS[name]

    def run(sidecar: SidecarProcess) -> tuple[dict[str, Any], str]:
        ws = RawWS(sidecar, TOKENS["a"])
        try:
            ws.send(text(op))
            error = ws.reply()
            ws.send(text({"op": "ping"}))
            pong = ws.reply()
            return error, pong["type"]
        finally:
            ws.close()

    error, then = agree(each(fronts, run))
    assert error["type"] == "error" and error["code"] == code and error.get("channel") == channel and then == "pong"


def test_subscribes_past_the_channel_cap_and_the_rate_get_errors_on_both(fronts):
    def run(sidecar: SidecarProcess) -> list[Any]:
        ws = RawWS(sidecar, TOKENS["a"])
        try:
            replies = []
            for i in range(MAX_CHANNELS + 1):
                ws.send(text({"op": "subscribe", "channel": f"a:cap:{i}", "mode": "event"}))
                replies.append(ws.reply())
            ws.send(text({"op": "subscribe", "channel": "a:cap:0", "mode": "poke"}))  # again: replaces, no cap
            replies.append(ws.reply())
            for _ in range(3):  # 8 in the burst, 1 a second after it
                ws.send(text({"op": "subscribe", "channel": "a:cap:1", "mode": "event"}))
                replies.append(ws.reply())
            return [(r["type"], r.get("code"), r.get("channel"), r.get("mode")) for r in replies]
        finally:
            ws.close()

    replies = agree(each(fronts, run))
    assert replies[:MAX_CHANNELS] == [("subscribed", None, f"a:cap:{i}", "event") for i in range(MAX_CHANNELS)]
    assert replies[MAX_CHANNELS] == ("error", "too-many-channels", f"a:cap:{MAX_CHANNELS}", None)
    assert replies[MAX_CHANNELS + 1] == ("subscribed", None, "a:cap:0", "poke")
    assert ("error", "rate-limited", "a:cap:1", None) in replies[-3:]


def test_subscribed_unsubscribed_pong_and_a_message_agree(fronts):
    done = publish(fronts, {"channel": "a:ws", "event": "e", "state": {"v": 1}})

    def run(sidecar: SidecarProcess) -> list[dict[str, Any]]:
        ws = RawWS(sidecar, TOKENS["a"])
        try:
            ws.send(text({"op": "subscribe", "channel": "a:ws"}))
            subscribed = ws.reply()
            ws.send(text({"op": "subscribe", "channel": "a:ws", "mode": "event", "since": done["id"],
                          "epoch": done["epoch"]}))  # fmt: skip
            resumed = ws.reply()
            ws.send(text({"op": "ping"}))
            pong = ws.reply()
            assert isinstance(pong.pop("ts"), float)
            ws.send(text({"op": "unsubscribe", "channel": "a:ws"}), text({"op": "unsubscribe", "channel": "a:ws"}))
            return [subscribed, resumed, pong, ws.reply(), ws.reply()]
        finally:
            ws.close()

    position = {"channel": "a:ws", "id": done["id"], "seq": done["seq"], "epoch": done["epoch"]}
    assert agree(each(fronts, run)) == [
        {"type": "subscribed", **position, "mode": "diff", "state": {"v": 1}},
        {"type": "subscribed", **position, "mode": "event"},
        {"type": "pong"},
        {"type": "unsubscribed", "channel": "a:ws"},
        {"type": "unsubscribed", "channel": "a:ws"},
    ]


def test_the_auth_frame_of_a_socket_opened_without_a_token(fronts):
    def run(sidecar: SidecarProcess) -> list[Any]:
        ws = RawWS(sidecar)
        try:
            ws.send(text({"op": "subscribe", "channel": "a:1"}))
            before = ws.reply()
            token = mint(["a:*"], ttl=100)
            ws.send(text({"op": "auth", "token": token}))
            authorized = ws.reply()
            ws.send(text({"op": "subscribe", "channel": "a:auth", "mode": "event"}),
                    text({"op": "subscribe", "channel": "b:1"}))  # fmt: skip
            subscribed, forbidden = ws.reply(), ws.reply()
            # A fresh token granting less drops what it does not grant, with a `forbidden` error.
            ws.send(text({"op": "auth", "token": mint(["open"], ttl=100)}))
            dropped, again = ws.reply(), ws.reply()
            return [before["code"], authorized["type"], authorized["expires"] == jwt_exp(token), subscribed["type"],
                    forbidden["code"], forbidden["channel"], dropped, again["type"]]  # fmt: skip
        finally:
            ws.close()

    assert agree(each(fronts, run)) == [
        "unauthorized", "authorized", True, "subscribed", "forbidden", "b:1",
        {"type": "error", "code": "forbidden", "channel": "a:auth", "message": "the token does not grant this channel"},
        "authorized",
    ]  # fmt: skip


def jwt_exp(token: str) -> float:
    payload = token.split(".")[1]
    return float(json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["exp"])


def test_a_socket_without_a_token_is_closed_after_the_auth_timeout(fronts):
    def run(sidecar: SidecarProcess) -> tuple[int | None, str]:
        ws = RawWS(sidecar)
        try:
            return ws.closed(timeout=AUTH_TIMEOUT + 10)
        finally:
            ws.close()

    assert agree(each(fronts, run)) == (3000, f"no token within {AUTH_TIMEOUT:g} s")


def test_a_socket_closes_with_3000_when_its_token_expires(fronts):
    token = mint(["a:*"], ttl=2)

    def run(sidecar: SidecarProcess) -> tuple[int | None, str]:
        ws = RawWS(sidecar, token)
        try:
            return ws.closed(timeout=10)
        finally:
            ws.close()

    assert agree(each(fronts, run)) == (3000, "the token has expired")


def test_an_idle_socket_is_pinged(fronts):
    def run(sidecar: SidecarProcess) -> int:
        ws = RawWS(sidecar, TOKENS["a"])
        try:
            return ws.next(timeout=KEEPALIVE + 5)[0]
        finally:
            ws.close()

    assert agree(each(fronts, run)) == 0x9


def test_the_server_ends_tcp_within_the_close_timeout_when_the_client_never_answers_its_close(fronts):
    def run(sidecar: SidecarProcess) -> bool:
        ws = RawWS(sidecar, TOKENS["a"])
        try:
            ws.send(ws_frame(0x1, b"{nope"))
            while ws.next()[0] != 0x8:
                pass
            started = time.monotonic()
            ended = ws.next(timeout=CLOSE_TIMEOUT + 5)[0] == -1  # silent: no close frame back
            return ended and time.monotonic() - started < CLOSE_TIMEOUT + 3
        except TimeoutError:
            return False
        finally:
            ws.close()

    assert agree(each(fronts, run)) is True


def handshake(sidecar: SidecarProcess, *headers: str, query: str = "") -> Answer:
    sock = socket.create_connection(("127.0.0.1", sidecar.port), timeout=10)
    try:
        lines = b"".join(f"{h}\r\n".encode() for h in ("Host: 127.0.0.1", *headers))
        sock.sendall(f"GET /ws{query} HTTP/1.1\r\n".encode() + lines + b"\r\n")
        data = b""
        sock.settimeout(3)
        try:
            while chunk := sock.recv(65536):
                data += chunk
                head, sep, body = data.partition(b"\r\n\r\n")
                length = re.search(rb"(?im)^content-length: *([0-9]+)", head)
                if sep and (head.startswith(b"HTTP/1.1 101") or (length and len(body) >= int(length[1]))):
                    break
        except TimeoutError:
            pass
    finally:
        sock.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    found = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    names = ("content-type", "sec-websocket-version", "www-authenticate", "sec-websocket-extensions")
    kept = tuple((h, header_value(h, found[h])) for h in names if h in found)
    parsed: Any = json.loads(body) if body and found.get("content-type") == "application/json" else body
    return Answer(int(lines[0].split()[1]), kept, parsed)


UPGRADE = ("Upgrade: websocket", "Connection: Upgrade")
VERSION = "Sec-WebSocket-Version: 13"
GOOD_KEY = f"Sec-WebSocket-Key: {KEY}"
HANDSHAKES = [
    pytest.param((*UPGRADE, GOOD_KEY), "", 426, "unsupported-version", id="no version"),
    pytest.param((*UPGRADE, GOOD_KEY, "Sec-WebSocket-Version: 8"), "", 426, "unsupported-version", id="version 8"),
    pytest.param((*UPGRADE, VERSION), "", 400, "bad-handshake", id="no key"),
    pytest.param((*UPGRADE, VERSION, "Sec-WebSocket-Key: short"), "", 400, "bad-handshake", id="short key"),
    pytest.param((*UPGRADE, VERSION, GOOD_KEY, "Sec-WebSocket-Extensions: permessage-deflate; "
                  "client_max_window_bits=abc"), "", 400, "bad-handshake", id="deflate parameter not a number"),
    pytest.param((VERSION, GOOD_KEY), "", 400, "not-websocket", id="no upgrade"),
    pytest.param((*UPGRADE, VERSION, GOOD_KEY, "Origin: https://evil.example"), "", 403, "forbidden-origin",
                 id="foreign origin"),
    pytest.param((*UPGRADE, VERSION, GOOD_KEY, "Authorization: Bearer nope"), "", 401, "unauthorized",
                 id="bad token"),
    pytest.param((*UPGRADE, VERSION, GOOD_KEY), "?token=nope", 401, "unauthorized", id="bad ?token"),
    pytest.param((*UPGRADE, VERSION, GOOD_KEY), "?token={expired}", 401, "token-expired", id="expired token"),
    pytest.param((*UPGRADE, VERSION, GOOD_KEY), "?token={star}&token={a}", 400, "ambiguous-token",
                 id="two tokens"),
]  # fmt: skip


@pytest.mark.parametrize(("headers", "query", "status", "code"), HANDSHAKES)
def test_a_refused_upgrade_gets_the_documented_status_and_json_error(fronts, headers, query, status, code):
    """RFC 6455 section 4.2.2 lets a server refuse an upgrade with any status; the document says which, with the
    same JSON errors as every other refusal, all before any token is needed."""
    got = agree(each(fronts, lambda s: handshake(s, *headers, query=filled(query))))
    assert got.status == status and got.body["error"] == code and got.header("content-type") == "application/json"
    if status == 426:
        assert got.header("sec-websocket-version") == "13"


def test_an_upgrade_with_a_header_value_http_does_not_allow_gets_400(fronts):
    """The document says 400 `bad-handshake`; the asgi front's HTTP parser (uvicorn's, like gunicorn's on the
    gevent front) refuses such a head itself, with a plain-text 400 before any route: only the status agrees."""
    got = each(fronts, lambda s: handshake(s, *UPGRADE, VERSION, GOOD_KEY, "X-Odd: a\x0bb").status)
    assert agree(got) == 400


def test_an_upgrade_from_the_allowed_origin_with_a_token_is_accepted_without_deflate(fronts):
    headers = (*UPGRADE, VERSION, GOOD_KEY, f"Origin: {ORIGIN}", f"Authorization: Bearer {TOKENS['a']}",
               "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits")  # fmt: skip
    got = agree(each(fronts, lambda s: handshake(s, *headers)))
    assert got.status == 101 and got.header("sec-websocket-extensions") is None  # deflate: off by default


# -- admission --------------------------------------------------------------------------------------------
def test_a_full_replica_refuses_sse_with_503_and_websockets_with_1013_on_both(fronts):
    """Admission (docs/operations.md): with max_connections reached, an SSE request gets 503 `busy` with
    Retry-After and a `retry_ms`, a WebSocket a 1013 whose reason says `retry in <N> ms`: at once after the
    upgrade, or in answer to the first auth frame of a socket that opened without a token."""
    holders = each(fronts, lambda s: Stream(s, sse_request("/sse?channel=a:full", TOKENS["a"])))
    put_policy(fronts, "gevent", {"max_connections": 1})
    try:
        for stream in holders.values():
            stream.read_until(lambda b: READY in b)

        def refused(sidecar: SidecarProcess) -> tuple[Any, ...]:
            with requests.get(sidecar.url + "/sse?channel=a:full", headers={**bearer(TOKENS["a"]), "Origin": ORIGIN},
                              timeout=5) as r:  # fmt: skip
                body = r.json()
                sse = (r.status_code, r.headers["content-type"], r.headers.get("access-control-allow-origin"),
                       int(r.headers["Retry-After"]) >= 1, sorted(body), body["error"],
                       body["message"] == f"too many connections; retry in {body['retry_ms']} ms")  # fmt: skip
            ws = RawWS(sidecar, TOKENS["a"])
            code, reason = ws.closed()
            ws.close()
            late = RawWS(sidecar)
            late.send(text({"op": "auth", "token": TOKENS["a"]}))
            late_code, late_reason = late.closed()
            late.close()
            shape = re.compile(r"too many connections; retry in [0-9]+ ms")
            return sse, code, bool(shape.fullmatch(reason)), late_code, bool(shape.fullmatch(late_reason))

        sse, code, reason_ok, late_code, late_ok = agree(each(fronts, refused))
        assert sse == (503, "application/json", ORIGIN, True, ["error", "message", "retry_ms"], "busy", True)
        assert (code, reason_ok, late_code, late_ok) == (1013, True, 1013, True)
    finally:
        for stream in holders.values():
            stream.close()
        put_policy(fronts, "gevent", None)


# -- Redis unreachable (last: it stops the module's Redis, then starts it again) ----------------------------
def test_with_redis_down_every_front_answers_503_unavailable_and_websockets_1013(stack):
    fronts, server = stack
    server.kill()
    try:
        def down(sidecar: SidecarProcess) -> tuple[Any, ...]:
            deadline = time.monotonic() + 15
            while requests.get(sidecar.url + "/healthz", timeout=15).status_code != 503:
                assert time.monotonic() < deadline, "healthz still says ready with Redis gone"
                time.sleep(0.1)
            health = requests.get(sidecar.url + "/healthz", timeout=15)
            answers = []
            for method, path, headers in (
                ("GET", "/sse?channel=a:down", bearer(TOKENS["a"])),
                ("GET", "/channels/a:down/state", bearer(TOKENS["a"])),
                ("POST", "/publish", bearer(PUBLISHER_KEY)),
            ):
                body = b'{"channel": "a:down", "event": "e"}' if method == "POST" else None
                with requests.request(method, sidecar.url + path, data=body, headers=headers, timeout=15) as r:
                    answers.append(answer_of(r, NOT_CORS))
            ws = RawWS(sidecar, TOKENS["a"])
            ws.send(text({"op": "subscribe", "channel": "a:down"}))
            closed = ws.closed(timeout=15)
            ws.close()
            return health.status_code, health.json()["ok"], answers, closed

        status, ok, answers, closed = agree(each(fronts, down))
        assert (status, ok) == (503, False)
        for got in answers:
            assert got.status == 503 and got.body["error"] == "unavailable" and got.header("retry-after") == "1"
        assert closed == (1013, "store unavailable, retry shortly")
    finally:
        server.restart()
    for sidecar in fronts.values():
        deadline = time.monotonic() + 15
        while requests.get(sidecar.url + "/healthz", timeout=15).status_code != 200:
            assert time.monotonic() < deadline, "healthz did not recover with Redis back"
            time.sleep(0.1)
