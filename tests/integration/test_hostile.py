"""Hostile input against a running sidecar: every limit's clear error, then a Hypothesis-generated barrage (bad
WebSocket frames and framing, huge/binary/invalid-UTF-8 frames, bad JSON and ops, bad query strings and cursors,
bad publish bodies, bad tokens) while two bystanders must keep receiving every message, in order.

The sidecar runs in dev mode with a JWT secret and a publisher key, so auth applies and tokens are attacked too.
The module's teardown fails the run if the sidecar logged a traceback or died.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests
import websocket
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.core.protocol import MODES
from sidecar.publish import Publisher, PublishError
from tests.clients import SSEClient, WSClient
from tests.processes import FRONTS, EmbeddedRedis, SidecarProcess
from tests.tokens import forget_earlier_garbage, guarded_sidecar
from tests.tokens import mint as mint_with

SECRET = "hostile-secret-" + "h" * 40
KEY = "publisher-key-hostile-000"
LIMITS = {
    "SIDECAR_MAX_CHANNELS": 5,
    "SIDECAR_MAX_FRAME_BYTES": 4096,
    "SIDECAR_MAX_PUBLISH_BYTES": 2048,
    "SIDECAR_MAX_STATE_BYTES": 8192,
    "SIDECAR_SUBSCRIBE_BURST": 20,
    "SIDECAR_SUBSCRIBE_RATE": 5,
}
BUDGET_S = 12.0  # per front, ~2,000 inputs on 2 cores: the barrage stops then, examples left or not (suite budget)
BYSTANDER = "bystander:1"
REPLY_TYPES = {"error", "pong", "subscribed", "unsubscribed", "authorized", "message", "snapshot", "reset"}


def mint(channels: list[str], ttl: float = 3600) -> str:
    return mint_with(SECRET, channels, ttl)



# Both fronts take the whole barrage (one sidecar per front for the module): hostile input is where two
# transports differ most.
@pytest.fixture(scope="module", params=FRONTS)
def stack(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[tuple[SidecarProcess, EmbeddedRedis]]:
    forget_earlier_garbage()
    tmp = tmp_path_factory.mktemp("hostile")
    env = {"SIDECAR_JWT_SECRET": SECRET, "SIDECAR_PUBLISHER_KEY": KEY, "SIDECAR_AUTH_TIMEOUT": 5, **LIMITS}
    with guarded_sidecar(tmp, env, (SECRET, KEY), errors_allowed=False, front=request.param) as stack:
        yield stack


@pytest.fixture
def sidecar(stack) -> SidecarProcess:
    return stack[0]


@pytest.fixture(scope="module")
def pub(stack) -> Iterator[Publisher]:
    with Publisher.from_url(stack[1].url) as publisher:
        yield publisher


def WS(ws_url: str, token: str | None = None) -> WSClient:  # noqa: N802 (reads as the class it makes)
    return WSClient(ws_url, token=token)


def publish(sidecar: SidecarProcess, body: Any, key: str = KEY) -> requests.Response:
    return requests.post(f"{sidecar.url}/publish", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=5)


# -- each limit, its clear error ----------------------------------------------------------------------------
def test_channel_grammar_is_enforced_everywhere(sidecar):
    token = mint(["*"])
    for bad in ("a b", "{0}", "a,b", "a~b", "x" * 201, "ключ", ""):
        response = requests.get(f"{sidecar.url}/sse", params={"channel": bad, "token": token}, timeout=5)
        assert response.status_code == 400 and response.json()["error"] in ("bad-channel", "no-channel"), bad
        response = publish(sidecar, {"channel": bad, "event": "e"})
        assert response.status_code == 400 and response.json()["error"] == "bad-channel", bad
    ws = WS(sidecar.ws_url, token)
    ws.subscribe("{0}")
    ws.wait(lambda f: ws.of_type("error"))
    assert ws.of_type("error")[0]["code"] == "bad-channel"
    ws.close()


def test_channels_per_connection_are_capped(sidecar):
    token = mint(["*"])
    params = [("channel", f"c:{i}") for i in range(6)] + [("token", token)]
    response = requests.get(f"{sidecar.url}/sse", params=params, timeout=5)
    assert response.status_code == 400 and response.json()["error"] == "too-many-channels"
    ws = WS(sidecar.ws_url, token)
    for i in range(6):
        ws.subscribe(f"c:{i}")
    ws.wait(lambda f: len(ws.of_type("subscribed")) == 5 and ws.of_type("error"))
    assert [e["code"] for e in ws.of_type("error")] == ["too-many-channels"]
    ws.close()


def test_subscribes_per_connection_are_rate_limited_and_the_socket_stays_open(sidecar):
    ws = WS(sidecar.ws_url, mint(["*"]))
    for _ in range(25):
        ws.subscribe("rate:1")  # re-subscribing: the channel cap does not interfere
    ws.wait(lambda f: len(ws.of_type("subscribed")) + len(ws.of_type("error")) == 25)
    errors = ws.of_type("error")
    assert errors and {e["code"] for e in errors} == {"rate-limited"} and "retry in" in errors[0]["message"]
    ws.send(op="ping")
    ws.wait(lambda f: ws.of_type("pong"))
    ws.close()


def test_a_frame_over_the_size_limit_closes_with_1009_and_a_reason(sidecar):
    ws = WS(sidecar.ws_url, mint(["*"]))
    ws.send(op="ping", pad="x" * 5000)
    assert ws.closed.wait(5)
    assert ws.close_code == 1009 and ws.close_reason
    ws.close()


def test_binary_bad_json_and_invalid_utf8_frames_close_with_a_reason(sidecar):
    cases = [(websocket.ABNF.OPCODE_BINARY, b'{"op": "ping"}', 1003),
             (websocket.ABNF.OPCODE_TEXT, b"{not json", 1007),
             (websocket.ABNF.OPCODE_TEXT, b'{"op": "ping", "x": "\xff\xfe"}', 1007)]  # fmt: skip
    for opcode, payload, code in cases:
        conn = websocket.create_connection(f"{sidecar.ws_url}/ws?token={mint(['*'])}", timeout=5)
        conn.sock.sendall(frame(opcode, payload))
        what, (got, reason) = outcome(conn)
        shutdown(conn)
        assert what == "close" and got == code and reason, (payload, got, reason)


def test_published_message_and_body_sizes_are_capped(sidecar):
    too_big = publish(sidecar, {"channel": "big:1", "event": "e", "data": "x" * 3000})
    assert too_big.status_code == 400 and too_big.json()["error"] == "too-large"
    huge = requests.post(f"{sidecar.url}/publish", data=b"x" * 10_000, headers={"Authorization": f"Bearer {KEY}"},
                         timeout=5)  # fmt: skip
    assert huge.status_code == 413 and huge.json()["error"]


def post_chunked(sidecar: SidecarProcess, body: bytes, size: int = 1000) -> tuple[int, dict]:
    """POST /publish over a raw socket with `Transfer-Encoding: chunked` (no Content-Length at all)."""
    with socket.create_connection(("127.0.0.1", sidecar.port), timeout=10) as sock:
        sock.sendall(f"POST /publish HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
                     "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n".encode())  # fmt: skip
        for start in range(0, len(body), size):
            piece = body[start : start + size]
            sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
        sock.sendall(b"0\r\n\r\n")
        response = http.client.HTTPResponse(sock)
        response.begin()
        return response.status, json.loads(response.read())


def test_a_chunked_body_over_the_limit_is_refused_not_cut_at_the_limit(sidecar, pub):
    limit = 2 * LIMITS["SIDECAR_MAX_PUBLISH_BYTES"]

    def padded(channel: str, size: int) -> bytes:  # valid JSON, then blanks up to `size` bytes
        return json.dumps({"channel": channel, "event": "e"}).encode().ljust(size)

    assert post_chunked(sidecar, padded("chunk:ok", limit))[0] == 200  # at the limit: fine
    status, body = post_chunked(sidecar, padded("chunk:1", limit) + b"x" * 1000)  # the first `limit` bytes parse
    assert (status, body["error"]) == (413, "too-large") and body["message"]
    status, body = post_chunked(sidecar, b"[" * 100_000, size=8192)
    assert (status, body["error"]) == (413, "too-large")
    assert pub.snapshot("chunk:1") is None and pub.snapshot("chunk:ok") is not None


def test_every_field_of_a_publish_has_its_type_checked(sidecar):
    cases = [
        ("kind", [], "bad-kind"), ("kind", {}, "bad-kind"), ("kind", 1, "bad-kind"), ("kind", None, "bad-kind"),
        ("channel", ["a"], "bad-channel"), ("channel", {"a": 1}, "bad-channel"), ("channel", 7, "bad-channel"),
        ("event", [], "bad-event"), ("event", None, "bad-event"), ("event", True, "bad-event"),
        ("changes", [], "bad-change"), ("changes", "x", "bad-change"), ("state", [1], "bad-change"),
        ("state", None, "bad-change"),
    ]  # fmt: skip
    for field, value, code in cases:
        response = publish(sidecar, {"channel": "types:1", "event": "e", field: value})
        assert response.status_code == 400 and response.json()["error"] == code, (field, value, response.text)
        assert response.json()["message"]
    for body in ({"messages": {}}, {"messages": "a"}, {"messages": None}, {"messages": []}, {"messages": [[]]},
                 {"messages": [{"channel": "types:1", "event": "e"}], "channel": "types:2"}, [], "x", 1, False):
        response = publish(sidecar, body)
        assert response.status_code == 400 and response.json()["error"] == "bad-request", (body, response.text)


publish_values = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=10), st.sampled_from(["a:1", "e", "diff", "state", "event", "poke", "{0}"]),
    st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
publish_items = st.dictionaries(
    st.sampled_from(["channel", "event", "kind", "data", "changes", "state", "messages", "other"]), publish_values,
    max_size=4,
).map(lambda fields: {"channel": "fuzz:1", "event": "e", **fields})  # from a valid message, some fields changed


def test_publish_bodies_of_any_shape_get_a_200_or_a_clear_400(sidecar):
    session = requests.Session()
    statuses: dict[int, int] = {}

    @settings(max_examples=300, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(body=publish_items | st.builds(lambda items: {"messages": items}, st.lists(publish_items, max_size=3)))
    def check(body: dict) -> None:
        response = session.post(f"{sidecar.url}/publish", data=json.dumps(body),
                                headers={"Authorization": f"Bearer {KEY}"}, timeout=5)  # fmt: skip
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        assert response.status_code in (200, 400), (body, response.status_code, response.text[:300])
        if response.status_code == 400:
            assert response.json()["error"] and response.json()["message"], response.text

    check()
    session.close()
    assert statuses.get(400) and statuses.get(200), statuses


def test_integers_beyond_64_bits_are_refused_not_stored_as_floats(sidecar, pub):
    for n in (2**64, -(2**63) - 1, 10**30):
        raw = f'{{"channel": "big:1", "event": "e", "data": {{"n": {n}}}}}'
        response = requests.post(f"{sidecar.url}/publish", data=raw, headers={"Authorization": f"Bearer {KEY}"},
                                 timeout=5)  # fmt: skip
        assert response.status_code == 400 and response.json()["error"] == "bad-number", (n, response.text)
    assert pub.snapshot("big:1") is None
    edges = {"top": 2**64 - 1, "bottom": -(2**63), "id": "123456789012345678901234", "float": 1e300}
    assert publish(sidecar, {"channel": "big:2", "event": "e", "changes": edges}).ok
    assert pub.snapshot("big:2").state == edges  # exact
    with pytest.raises(PublishError) as info:
        pub.event("big:3", "e", {"n": 2**64})
    assert info.value.code == "bad-json" and "64-bit" in info.value.message


def test_a_refused_throttle_document_changes_nothing(sidecar):
    url = f"{sidecar.url}/admin/throttle"
    custom = {"channels": {"adm:*": {"window": 0.5}}}
    assert requests.put(url, json=custom, timeout=5).ok
    before = requests.get(url, timeout=5).json()
    assert before["source"] == "redis" and before["policy"]["channels"]["adm:*"]["window"] == 0.5
    try:
        for body in (b"null", b"[]", b"3", b'"x"', b"{", b'{"channels": {"adm:*": {"window": -1}}}'):
            refused = requests.put(url, data=body, timeout=5)
            assert refused.status_code == 400 and refused.json()["error"] in ("bad-policy", "bad-json"), body
        assert requests.put(url, data=b" " * 10_000, timeout=5).status_code == 413
        assert requests.get(url, timeout=5).json() == before
    finally:
        reset = requests.delete(url, timeout=5)
    assert reset.ok and reset.json()["source"] == "settings" and "adm:*" not in reset.json()["policy"]["channels"]


def test_a_channels_state_is_capped(sidecar, pub):
    def grow(key: str) -> requests.Response:  # each patch is ~1.5 KB of the 8 KB cap
        return publish(sidecar, {"channel": "fat:1", "event": "grew", "changes": {key: "y" * 1500}})

    for key in ("k0", "k1", "k2") + ("k0",) * 10:
        assert grow(key).ok  # rewriting a field does not grow the state: pending patches are folded first
    assert grow("k3").ok and grow("k4").ok
    refused = grow("k5")
    assert refused.status_code == 400 and refused.json()["error"] == "state-too-large"
    assert "k5" not in pub.snapshot("fat:1").state and pub.snapshot("fat:1").seq == 15
    assert publish(sidecar, {"channel": "fat:1", "event": "reset", "state": {"small": True}}).ok


def test_two_different_tokens_are_refused_whichever_is_valid(sidecar, pub):
    pub.event("amb:1", "e")
    good, bad = mint(["amb:*"]), mint(["amb:*"], ttl=-60)
    ws_headers = {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
                  "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}  # fmt: skip
    barrage = Barrage(sidecar)
    for header, query in ((bad, [good]), (good, [bad]), (None, [good, bad]), ("garbage", [good])):
        auth = {"Authorization": f"Bearer {header}"} if header else {}
        tokens = "".join(f"&token={t}" for t in query)
        for path, extra in ((f"/sse?channel=amb:1{tokens}", {}), (f"/channels/amb:1/state?{tokens}", {}),
                            (f"/ws?{tokens}", ws_headers)):  # fmt: skip
            status, body = barrage.http_json("GET", path, {**auth, **extra})
            assert (status, body["error"]) == (400, "ambiguous-token"), (header, query, path, body)
            assert good not in body["message"] and bad not in body["message"]
    # The same token twice is one token; one wrong token stays a plain 401.
    same = barrage.http_json("GET", f"/channels/amb:1/state?token={good}", {"Authorization": f"Bearer {good}"})
    assert same[0] == 200
    wrong = barrage.http_json("GET", f"/channels/amb:1/state?token={bad}", {})
    assert wrong[0] == 401 and wrong[1]["error"] == "token-expired"
    garbage = barrage.http_json("GET", "/channels/amb:1/state", {"Authorization": "Bearer x"})
    assert garbage[0] == 401 and garbage[1]["error"] == "unauthorized"


BAD_IDS = ["1-18446744073709551616", "18446744073709551616-0", "\uff11-0", "\u0661-0", "1-\u0660"]


@pytest.mark.parametrize("bad", BAD_IDS)
def test_ids_beyond_64_bits_or_of_unicode_digits_are_refused_not_retried(sidecar, bad):
    """Redis refuses such ids: passed on, they made a 503 that the client retried forever (WS: close 1013)."""
    token = mint(["*"])
    header = requests.get(f"{sidecar.url}/sse", params={"channel": "id:1", "token": token},
                          headers={"Last-Event-ID": (bad + "~").encode()}, timeout=5)  # fmt: skip
    query = requests.get(f"{sidecar.url}/sse", params={"channel": "id:1", "token": token, "last_event_id": bad + "~"},
                         timeout=5)  # fmt: skip
    for response in (header, query):
        assert response.status_code == 400 and response.json()["error"] == "bad-id", response.text
    ws = WS(sidecar.ws_url, token)
    ws.subscribe("id:1", since=bad, epoch="")
    ws.wait(lambda f: ws.of_type("error"))
    assert [(e["code"], e["channel"]) for e in ws.of_type("error")] == [("bad-id", "id:1")]
    ws.send(op="ping")
    ws.wait(lambda f: ws.of_type("pong"))
    assert not ws.closed.is_set() and not ws.of_type("subscribed")
    ws.close()


def test_the_largest_stream_id_is_a_position_from_the_future(sidecar, pub):
    pub.event("id:2", "e")
    top = "18446744073709551615-18446744073709551615"
    ws = WS(sidecar.ws_url, mint(["*"]))
    ws.subscribe("id:2", mode="event", since=top)
    ws.wait(lambda f: ws.of_type("reset"))
    assert ws.of_type("reset")[0]["reason"] == "gap" and not ws.of_type("error")
    ws.close()


# -- the generated barrage ----------------------------------------------------------------------------------
def frame(opcode: int, payload: bytes, fin: bool = True, rsv: int = 0, masked: bool = True) -> bytes:
    """A client WebSocket frame with any opcode, flags and payload (RFC 6455 section 5.2), right or wrong."""
    b0 = (0x80 if fin else 0) | (rsv & 7) << 4 | (opcode & 15)
    mask_bit = 0x80 if masked else 0
    n = len(payload)
    if n < 126:
        head = bytes((b0, mask_bit | n))
    elif n < 65536:
        head = bytes((b0, mask_bit | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((b0, mask_bit | 127)) + n.to_bytes(8, "big")
    if masked:
        key = os.urandom(4)
        head += key
        payload = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return head + payload


def outcome(conn: websocket.WebSocket, timeout: float = 3.0) -> tuple[str, Any]:
    """What the server did next: ("frame", dict), ("close", (code, reason)), ("silent", None) or ("reset", None)."""
    conn.settimeout(timeout)
    try:
        while True:
            opcode, data = conn.recv_data_frame(control_frame=False)
            if opcode == websocket.ABNF.OPCODE_CLOSE:
                payload = data.data
                code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else None
                conn._close = (code, payload[2:].decode(errors="replace"))  # type: ignore[attr-defined]
                return "close", conn._close  # type: ignore[attr-defined]
            if opcode == websocket.ABNF.OPCODE_TEXT:
                return "frame", json.loads(data.data)
    except websocket.WebSocketTimeoutException:
        return "silent", None
    except (websocket.WebSocketException, OSError):
        return "reset", None


def close_of(conn: websocket.WebSocket) -> tuple[int | None, str]:
    return getattr(conn, "_close", (None, ""))


def shutdown(conn: websocket.WebSocket) -> None:
    with contextlib.suppress(OSError):
        conn.shutdown()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8,
)
channel_like = st.one_of(
    st.text(max_size=40),
    st.from_regex(r"[A-Za-z0-9_\-:.@{}*~, %]{0,60}", fullmatch=True),
    st.sampled_from(["a", "x" * 201, "{0}", "a b", "", "user:1", "*", "a,b", "sprint:*"]),
)
stream_id_like = st.one_of(
    st.from_regex(r"[0-9]{0,22}-?[0-9]{0,22}", fullmatch=True), st.text(max_size=30), st.just("0-0")
)
token_like = st.one_of(
    st.text(max_size=60), st.from_regex(r"[A-Za-z0-9_\-]{0,40}\.[A-Za-z0-9_\-]{0,40}\.[A-Za-z0-9_\-]{0,40}",
                                        fullmatch=True),
    st.builds(lambda ttl, ch: mint(ch, ttl), st.integers(-100, 100), st.lists(channel_like, max_size=3)),
)  # fmt: skip
op_frames = st.fixed_dictionaries(
    {"op": st.one_of(st.sampled_from(["subscribe", "unsubscribe", "ping", "auth"]), st.text(max_size=10), json_values)},
    optional={
        "channel": channel_like | json_values,
        "mode": st.sampled_from(MODES) | json_values,
        "since": stream_id_like | json_values,
        "epoch": st.from_regex(r"[0-9a-f]{0,40}", fullmatch=True) | json_values,
        "token": token_like | json_values,
    },
)
header_text = st.text(st.characters(min_codepoint=32, max_codepoint=255, exclude_characters="\x7f"), max_size=200)
query_text = st.lists(
    st.one_of(
        st.text(st.characters(min_codepoint=33, max_codepoint=126, exclude_characters="#"), max_size=20),
        st.builds(lambda b: "%" + b.hex().upper(), st.binary(min_size=1, max_size=1)),
        st.sampled_from(["%", "%Z", "%FF", "channel=", "channel=a", "&", "=", "mode=", "token=", "last_event_id="]),
    ),
    max_size=12,
).map("".join)
invalid_utf8 = st.builds(lambda a, bad, b: a + bad + b, st.binary(max_size=20),
                         st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\x80"]),
                         st.binary(max_size=20))  # fmt: skip

attacks = st.one_of(
    st.tuples(st.just("ws-op"), op_frames),
    st.tuples(st.just("ws-text"), st.text(max_size=200)),
    st.tuples(st.just("ws-binary"), st.binary(max_size=200)),
    st.tuples(st.just("ws-bad-utf8"), invalid_utf8),
    st.tuples(st.just("ws-raw"), st.binary(min_size=1, max_size=64)),
    st.tuples(st.just("ws-frame"), st.tuples(st.integers(0, 15), st.booleans(), st.integers(0, 7),
                                             st.binary(max_size=130), st.booleans())),
    st.tuples(st.just("ws-huge"), st.integers(4097, 20_000)),
    st.tuples(st.just("ws-handshake"), st.tuples(query_text, header_text, header_text)),
    st.tuples(st.just("sse"), st.tuples(query_text, header_text)),
    st.tuples(st.just("sse-cursor"), st.tuples(st.lists(st.sampled_from(["a:1", "b:2", "c:3"]), min_size=1,
                                                        max_size=3, unique=True), header_text)),
    st.tuples(st.just("state"), st.tuples(channel_like, header_text)),
    st.tuples(st.just("publish"), st.tuples(st.one_of(st.binary(max_size=300), json_values.map(json.dumps),
                                                      st.builds(lambda o: json.dumps(o), op_frames)),
                                            st.sampled_from([KEY, "", "nope", KEY + "x"]))),
)  # fmt: skip


class Barrage:
    """Runs attacks and checks each answer. Keeps one authenticated socket for op frames (renewed every 15
    frames, so the subscribe rate and channel caps do not mask the deeper checks)."""

    def __init__(self, sidecar: SidecarProcess) -> None:
        self.sidecar = sidecar
        self.host, self.port = "127.0.0.1", sidecar.port
        self.token = mint(["*"])
        self.conn: websocket.WebSocket | None = None
        self.uses = 0
        self.tried = 0
        self.kinds: dict[str, int] = {}

    def socket(self) -> websocket.WebSocket:
        return websocket.create_connection(f"{self.sidecar.ws_url}/ws?token={self.token}", timeout=5)

    def run(self, kind: str, arg: Any) -> None:
        self.tried += 1
        self.kinds[kind] = self.kinds.get(kind, 0) + 1
        getattr(self, "attack_" + kind.replace("-", "_"))(arg)

    # WebSocket
    def attack_ws_op(self, body: dict) -> None:
        if self.conn is None or self.uses >= 15:
            self.close()
            self.conn = self.socket()
        self.uses += 1
        self.conn.send(json.dumps(body))
        what, value = outcome(self.conn)
        if what == "frame":
            assert value.get("type") in REPLY_TYPES, value
            if value["type"] == "error":
                assert value["code"] and value["message"]
            return
        assert what == "close" and value[0] in (1003, 1007, 1009, 3000) and value[1], (body, what, value)
        self.close()

    def attack_ws_text(self, text: str) -> None:
        self.one_frame(frame(websocket.ABNF.OPCODE_TEXT, text.encode()), {1007, 1009})

    def attack_ws_binary(self, data: bytes) -> None:
        self.one_frame(frame(websocket.ABNF.OPCODE_BINARY, data), {1003})

    def attack_ws_bad_utf8(self, data: bytes) -> None:
        self.one_frame(frame(websocket.ABNF.OPCODE_TEXT, data), {1007})

    def attack_ws_huge(self, n: int) -> None:
        self.one_frame(frame(websocket.ABNF.OPCODE_TEXT, b'{"op":"ping","x":"' + b"x" * n + b'"}'), {1009})

    def one_frame(self, data: bytes, codes: set[int]) -> None:
        conn = self.socket()
        try:
            conn.sock.sendall(data)
            what, value = outcome(conn)
        except OSError:
            what, value = "reset", None  # the server may close before it has read all of a huge frame
        finally:
            shutdown(conn)
        if what == "frame":  # the text happened to be a valid frame: it got an answer
            assert value.get("type") in REPLY_TYPES, value
            return
        if what == "close":
            assert value[0] in codes and value[1], value
        else:
            assert what == "reset" and 1009 in codes, (what, value)

    def attack_ws_raw(self, data: bytes) -> None:
        conn = self.socket()
        try:
            conn.sock.sendall(data)
            what, value = outcome(conn, timeout=0.3)  # an incomplete frame: the server waits for the rest
        except OSError:
            what, value = "reset", None
        finally:
            shutdown(conn)
        if what == "close":
            assert value[0] is None or 1000 <= value[0] < 5000, value

    def attack_ws_frame(self, arg: tuple) -> None:
        opcode, fin, rsv, payload, masked = arg
        self.attack_ws_raw(frame(opcode, payload, fin, rsv, masked))

    def attack_ws_handshake(self, arg: tuple) -> None:
        query, token, origin = arg
        status = self.http("GET", f"/ws?{query}", {
            "Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==", "Authorization": f"Bearer {token}", "Origin": origin,
        })  # fmt: skip
        assert status in (101, 400, 401, 403), status

    # HTTP
    def attack_sse(self, arg: tuple) -> None:
        query, cursor = arg
        self.http("GET", f"/sse?{query}", {"Last-Event-ID": cursor})

    def attack_sse_cursor(self, arg: tuple) -> None:
        channels, cursor = arg
        query = "&".join(f"channel={c}" for c in channels) + f"&token={self.token}"
        status = self.http("GET", f"/sse?{query}", {"Last-Event-ID": cursor})
        assert status in (200, 400), status

    def attack_state(self, arg: tuple) -> None:
        channel, etag = arg
        path = "/channels/" + requests.utils.quote(channel, safe="") + "/state?token=" + self.token
        self.http("GET", path, {"If-None-Match": etag})

    def attack_publish(self, arg: tuple) -> None:
        body, key = arg
        status = self.http("POST", "/publish", {"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
                           body.encode() if isinstance(body, str) else body)  # fmt: skip
        if key != KEY:
            assert status == 401, status

    def http(self, method: str, path: str, headers: dict[str, str], body: bytes | None = None) -> int:
        return self.http_json(method, path, headers, body)[0]

    def http_json(
        self, method: str, path: str, headers: dict[str, str], body: bytes | None = None
    ) -> tuple[int, Any]:
        """A raw request (no client-side cleanup of the URL); 5xx fails, 4xx must be a JSON error. Returns the
        status and the JSON body (None for a stream or an upgrade)."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=5)
        try:
            conn.putrequest(method, path, skip_accept_encoding=True)
            for name, value in headers.items():
                conn.putheader(name, value.encode("latin-1"))
            if body is not None:
                conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body)
            response = conn.getresponse()
            status = response.status
            if status == 200 and response.getheader("Content-Type", "").startswith("text/event-stream"):
                return status, None  # a valid subscription: hang up
            if status == 101:
                return status, None
            data = response.read()
        finally:
            conn.close()
        assert status < 500, (method, path, status, data[:300])
        if status >= 400 and status != 405:
            assert json.loads(data)["error"], data
        return status, json.loads(data) if data.startswith(b"{") else None

    def close(self) -> None:
        if self.conn is not None:
            shutdown(self.conn)
        self.conn, self.uses = None, 0


def test_hostile_input_gets_clear_errors_while_bystanders_lose_nothing(sidecar, pub, capsys):
    token = mint([BYSTANDER])
    sse = SSEClient(sidecar.url, [BYSTANDER], token=token)
    ws = WS(sidecar.ws_url, token)
    ws.subscribe(BYSTANDER)
    sse.wait(lambda f: sse.last_id is not None)
    ws.wait(lambda f: ws.of_type("subscribed"))

    stop = threading.Event()
    published: list[int] = []

    def publisher() -> None:
        while not stop.wait(0.01):
            published.append(pub.event(BYSTANDER, "tick", {"n": len(published)}).seq)

    ticker = threading.Thread(target=publisher, daemon=True)
    ticker.start()
    barrage = Barrage(sidecar)
    deadline = time.monotonic() + BUDGET_S

    # Hypothesis has no time budget: run it in rounds of a few hundred examples until the budget is spent.
    @settings(max_examples=300, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(attack=attacks)
    def hostile(attack: tuple[str, Any]) -> None:
        if time.monotonic() < deadline:
            barrage.run(*attack)

    try:
        while time.monotonic() < deadline:
            hostile()
    finally:
        stop.set()
        ticker.join(5)
        barrage.close()

    assert sidecar.running
    assert requests.get(sidecar.url + "/healthz", timeout=5).status_code == 200
    last = published[-1]
    for client in (sse, ws):
        client.wait(lambda f, c=client: len(c.messages(BYSTANDER)) >= last, timeout=20)
        assert [m["seq"] for m in client.messages(BYSTANDER)] == list(range(1, last + 1))
        assert not client.of_type("snapshot") and not client.of_type("reset") and not client.of_type("error")
    sse.close()
    ws.close()
    with capsys.disabled():
        kinds = ", ".join(f"{k} {n}" for k, n in sorted(barrage.kinds.items()))
        print(f"\nhostile inputs tried: {barrage.tried} in {BUDGET_S:g} s ({kinds}); bystanders got {last} of {last}")
