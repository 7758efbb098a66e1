"""The auth matrix against a real sidecar in production mode: tokens, grants, keys and origins over SSE, WebSocket,
the state endpoint and POST /publish."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import websocket

from sidecar.publish import Publisher
from tests.clients import SSEClient, WSClient
from tests.processes import FRONTS, REPO_ROOT, EmbeddedRedis, ManagedProcess, SidecarProcess, child_env, free_port
from tests.tokens import forget_earlier_garbage, guarded_sidecar
from tests.tokens import mint as mint_with

SECRET = "test-secret-" + "x" * 40
PUBLISHER_KEY = "publisher-key-0123456789"
ADMIN_KEY = "admin-key-0123456789abcd"
APP_ORIGIN = "https://app.example"


def mint(channels: list[str] | str, ttl: float = 3600, key: str = SECRET, **claims: object) -> str:
    return mint_with(key, channels, ttl, **claims)



# Every guard on both fronts (one sidecar per front for the module): auth is what a front must not get wrong.
@pytest.fixture(scope="module", params=FRONTS)
def stack(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[tuple[SidecarProcess, EmbeddedRedis]]:
    """One redis-server and one production-mode sidecar with every guard configured, for the whole module."""
    forget_earlier_garbage()
    tmp = tmp_path_factory.mktemp("auth")
    env = {
        "SIDECAR_DEV": "0",
        "SIDECAR_JWT_SECRET": SECRET,
        "SIDECAR_JWT_LEEWAY": "0",
        "SIDECAR_PUBLISHER_KEY": f"old-publisher-key-000000,{PUBLISHER_KEY}",
        "SIDECAR_ADMIN_KEY": ADMIN_KEY,
        "SIDECAR_ALLOWED_ORIGINS": APP_ORIGIN,
        "SIDECAR_CORS_ORIGINS": APP_ORIGIN,
        "SIDECAR_AUTH_TIMEOUT": "1.5",
    }
    with guarded_sidecar(tmp, env, (SECRET, PUBLISHER_KEY, ADMIN_KEY), front=request.param) as stack:
        yield stack


@pytest.fixture
def sidecar(stack) -> SidecarProcess:
    return stack[0]


@pytest.fixture(scope="module")
def pub(stack) -> Iterator[Publisher]:
    publisher = Publisher.from_url(stack[1].url)
    yield publisher
    publisher.store.redis.close()


class WS(WSClient):
    """A WSClient from the app's origin unless told otherwise."""

    def __init__(self, ws_url: str, query: str = "", **options: object) -> None:
        options.setdefault("origin", APP_ORIGIN)
        super().__init__(ws_url, query, **options)


def handshake_status(ws_url: str, query: str = "", **options: object) -> int:
    options.setdefault("origin", APP_ORIGIN)
    try:
        websocket.create_connection(f"{ws_url}/ws{query}", timeout=10, **options).close()
    except websocket.WebSocketBadStatusException as exc:
        return exc.status_code
    return 101


def sse_get(sidecar: SidecarProcess, *channels: str, **headers: str) -> requests.Response:
    token = headers.pop("token", None)
    params = [("channel", c) for c in channels] + ([("token", token)] if token else [])
    return requests.get(f"{sidecar.url}/sse", params=params, headers=headers, stream=True, timeout=5)


# -- SSE ----------------------------------------------------------------------------------------------------
def test_sse_answers_every_bad_token_with_401_and_a_channel_outside_the_grant_with_403(sidecar):
    cases = {
        "no token": ({}, 401, "unauthorized"),
        "bad signature": ({"token": mint(["*"], key="wrong-" + "k" * 40)}, 401, "unauthorized"),
        "garbage": ({"token": "abc.def.ghi"}, 401, "unauthorized"),
        "expired": ({"token": mint(["*"], ttl=-60)}, 401, "token-expired"),
        "wrong channel": ({"token": mint(["other:*"])}, 403, "forbidden"),
        "one of two channels": ({"token": mint(["feed:1"])}, 403, "forbidden"),
        "someone else's user": ({"token": mint(["user:{sub}"], sub="7")}, 403, "forbidden"),
        "basic auth is no bearer": ({"Authorization": "Basic dXNlcjpwYXNz"}, 401, "unauthorized"),
    }
    for name, (headers, status, code) in cases.items():
        response = sse_get(sidecar, "feed:1", "user:42", **headers)
        body = response.json()
        assert (response.status_code, body["error"]) == (status, code), name
        if status == 401:
            assert response.headers["WWW-Authenticate"].startswith("Bearer")
        response.close()
    bad = mint(["*"], key="wrong-" + "k" * 40)
    with sse_get(sidecar, "feed:1", token=bad) as response:
        assert bad not in response.text


def test_sse_streams_channels_granted_by_pattern_or_sub_via_query_or_header(sidecar, pub):
    token = mint(["feed:*", "user:{sub}"], sub="42")
    by_query = SSEClient(sidecar.url, ["feed:2", "user:42"], token=token)
    by_header = requests.get(
        f"{sidecar.url}/sse", params={"channel": "user:42"}, headers={"Authorization": f"Bearer {token}"},
        stream=True, timeout=5,
    )  # fmt: skip
    assert by_query.status == 200 and by_header.status_code == 200
    by_header.close()
    by_query.wait(lambda f: by_query.last_id is not None)
    pub.event("feed:2", "posted", {"n": 1})
    pub.event("user:42", "pinged", {"n": 2})
    by_query.wait(lambda f: len(by_query.messages()) == 2)
    by_query.close()


def test_sse_stream_ends_when_its_token_expires(sidecar):
    client = SSEClient(sidecar.url, ["feed:3"], token=mint(["feed:3"], ttl=2))
    assert client.status == 200
    client.wait(lambda f: any(x.get("code") == "token-expired" for x in f), timeout=10)
    assert client.closed.wait(5)
    client.close()


def test_a_token_whose_times_are_not_numbers_is_refused_on_sse_and_websocket(sidecar):
    # PyJWT reads `exp` with int(), so "exp": "<now+2>" passed the door; the grant saw no number, and the stream
    # and the socket were still open long after. An integer past any float was a 500.
    now = int(time.time())
    for claims in ({"exp": str(now + 2)}, {"exp": 10**400}, {"nbf": str(now - 60)}):
        token = mint(["*"], **claims)
        response = sse_get(sidecar, "feed:9", token=token)
        assert (response.status_code, response.json()["error"]) == (401, "unauthorized"), claims
        assert token not in response.text
        response.close()
        assert handshake_status(sidecar.ws_url, "?token=" + token) == 401, claims
        ws = WS(sidecar.ws_url)
        ws.send(op="auth", token=token)
        assert ws.closed.wait(5) and ws.close_code == 3000, claims
        ws.close()


# -- WebSocket ----------------------------------------------------------------------------------------------
def test_websocket_handshake_refuses_bad_tokens_with_401(sidecar):
    assert handshake_status(sidecar.ws_url, "?token=" + mint(["*"], key="wrong-" + "k" * 40)) == 401
    assert handshake_status(sidecar.ws_url, "?token=" + mint(["*"], ttl=-60)) == 401
    assert handshake_status(sidecar.ws_url, header=["Authorization: Bearer nonsense"]) == 401
    assert handshake_status(sidecar.ws_url, "?token=" + mint(["*"])) == 101
    assert handshake_status(sidecar.ws_url, header=[f"Authorization: Bearer {mint(['*'])}"]) == 101


def test_websocket_forbidden_channel_gets_an_error_frame_and_the_socket_keeps_the_others(sidecar, pub):
    ws = WS(sidecar.ws_url, header=[f"Authorization: Bearer {mint(['team:{team}:*'], team='blue')}"])
    ws.subscribe("team:blue:board")
    ws.subscribe("team:red:board")
    ws.subscribe("team:blue:chat")
    ws.wait(lambda f: len(ws.of_type("subscribed")) == 2 and ws.of_type("error"))
    [error] = ws.of_type("error")
    assert (error["code"], error["channel"]) == ("forbidden", "team:red:board")
    pub.event("team:red:board", "secret", {"n": 0})
    pub.event("team:blue:board", "moved", {"n": 1})
    pub.event("team:blue:chat", "said", {"n": 2})
    ws.wait(lambda f: len(ws.messages()) == 2)
    assert {m["channel"] for m in ws.messages()} == {"team:blue:board", "team:blue:chat"}
    ws.close()


def test_websocket_first_frame_auth(sidecar, pub):
    ws = WS(sidecar.ws_url)
    ws.subscribe("inbox:9")
    ws.wait(lambda f: ws.of_type("error"))
    assert ws.of_type("error")[0]["code"] == "unauthorized"
    ws.send(op="auth", token=mint(["inbox:{sub}"], sub="9"))
    ws.wait(lambda f: ws.of_type("authorized"))
    ws.subscribe("inbox:9")
    ws.wait(lambda f: ws.of_type("subscribed"))
    pub.event("inbox:9", "mail", {"n": 1})
    ws.wait(lambda f: ws.messages())
    ws.close()


def test_websocket_bad_auth_frame_closes_with_a_reason(sidecar):
    for bad in (mint(["*"], key="wrong-" + "k" * 40), mint(["*"], ttl=-60), 42, ""):
        ws = WS(sidecar.ws_url)
        ws.send(op="auth", token=bad)
        assert ws.closed.wait(5)
        assert ws.close_code == 3000 and ws.close_reason
        ws.close()


def test_websocket_without_a_token_is_closed_after_the_auth_timeout(sidecar):
    ws = WS(sidecar.ws_url)
    assert ws.closed.wait(10)
    assert ws.close_code == 3000 and "no token" in ws.close_reason
    ws.close()


def test_websocket_closes_when_its_token_expires_unless_refreshed(sidecar):
    short = WS(sidecar.ws_url, header=[f"Authorization: Bearer {mint(['a:1'], ttl=2)}"])
    refreshed = WS(sidecar.ws_url, header=[f"Authorization: Bearer {mint(['a:1', 'a:2'], ttl=2)}"])
    refreshed.subscribe("a:1")
    refreshed.subscribe("a:2")
    refreshed.wait(lambda f: len(refreshed.of_type("subscribed")) == 2)
    refreshed.send(op="auth", token=mint(["a:1"]))  # a fresh token that no longer grants a:2
    refreshed.wait(lambda f: refreshed.of_type("authorized"))
    assert [(e["code"], e["channel"]) for e in refreshed.of_type("error")] == [("forbidden", "a:2")]
    assert short.closed.wait(10)
    assert short.close_code == 3000 and "expired" in short.close_reason
    assert not refreshed.closed.is_set()
    refreshed.close()
    short.close()


def test_websocket_origin_allowlist_stops_cross_site_hijacking(sidecar):
    token = "?token=" + mint(["*"])
    assert handshake_status(sidecar.ws_url, token, origin="https://evil.example") == 403
    assert handshake_status(sidecar.ws_url, token, origin=APP_ORIGIN) == 101
    assert handshake_status(sidecar.ws_url, token, suppress_origin=True) == 101  # not a browser


# -- state endpoint and CORS --------------------------------------------------------------------------------
def test_state_endpoint_needs_a_token_granting_the_channel(sidecar, pub):
    pub.state("doc:1", "created", {"title": "one"})
    url = f"{sidecar.url}/channels/doc:1/state"
    assert requests.get(url, timeout=5).status_code == 401
    assert requests.get(url, params={"token": mint(["doc:1"], ttl=-60)}, timeout=5).json()["error"] == "token-expired"
    assert requests.get(url, params={"token": mint(["doc:2"])}, timeout=5).status_code == 403
    # 403, not 404, for a channel that does not exist: the answer does not reveal what exists.
    assert requests.get(f"{sidecar.url}/channels/doc:404/state", params={"token": mint(["doc:1"])}).status_code == 403
    ok = requests.get(url, headers={"Authorization": f"Bearer {mint(['doc:*'])}"}, timeout=5)
    assert ok.status_code == 200 and ok.json()["state"] == {"title": "one"}


def test_cors_headers_only_for_allowed_origins(sidecar, pub):
    pub.state("doc:2", "created", {"title": "two"})
    url = f"{sidecar.url}/channels/doc:2/state"
    preflight = requests.options(
        url, headers={"Origin": APP_ORIGIN, "Access-Control-Request-Headers": "authorization"}, timeout=5
    )
    assert preflight.headers["Access-Control-Allow-Origin"] == APP_ORIGIN
    assert "Authorization" in preflight.headers["Access-Control-Allow-Headers"]
    denied = requests.get(url, headers={"Origin": "https://evil.example"}, timeout=5)
    assert denied.status_code == 401 and "Access-Control-Allow-Origin" not in denied.headers
    got = requests.get(url, params={"token": mint(["doc:2"])}, headers={"Origin": APP_ORIGIN}, timeout=5)
    assert got.headers["Access-Control-Allow-Origin"] == APP_ORIGIN and "Origin" in got.headers["Vary"]
    stream = sse_get(sidecar, "doc:2", token=mint(["doc:2"]), Origin=APP_ORIGIN)
    assert stream.headers["Access-Control-Allow-Origin"] == APP_ORIGIN
    stream.close()


# -- publish ------------------------------------------------------------------------------------------------
def test_publish_needs_the_publisher_key(sidecar):
    body = {"channel": "pub:1", "event": "made", "data": {"n": 1}}
    url = f"{sidecar.url}/publish"
    for authorization in (None, "Bearer wrong-key-0000000000", f"Bearer {ADMIN_KEY}", f"Bearer {mint(['*'])}",
                          f"Basic {PUBLISHER_KEY}"):  # fmt: skip
        headers = {"Authorization": authorization} if authorization else {}
        response = requests.post(url, json=body, headers=headers, timeout=5)
        assert (response.status_code, response.json()["error"]) == (401, "unauthorized"), authorization
    for key in (PUBLISHER_KEY, "old-publisher-key-000000"):  # either key of a rotation
        ok = requests.post(url, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=5)
        assert ok.status_code == 200 and ok.json()["published"][0]["channel"] == "pub:1"
        assert set(ok.json()["published"][0]) == {"channel", "id", "seq", "epoch"}  # protocol.md's reply, no more


def test_admin_api_needs_the_admin_key(sidecar):
    url = f"{sidecar.url}/admin/throttle"
    for authorization in (None, "Bearer wrong-key-0000000000", f"Bearer {PUBLISHER_KEY}", f"Bearer {mint(['*'])}"):
        headers = {"Authorization": authorization} if authorization else {}
        response = requests.get(url, headers=headers, timeout=5)
        assert (response.status_code, response.json()["error"]) == (401, "unauthorized"), authorization
    assert requests.get(url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=5).status_code == 200


# -- startup ------------------------------------------------------------------------------------------------
def start_serve(redis_url: str, tmp_path: Path, **env: str) -> ManagedProcess:
    port = free_port()
    argv = [sys.executable, "-m", "sidecar", "serve", "--host", "127.0.0.1", "--port", str(port)]
    return ManagedProcess(f"serve-{port}", argv, child_env(redis_url, env), tmp_path / f"serve-{port}.log")


def test_production_mode_refuses_to_start_without_a_token_key(stack, tmp_path):
    proc = start_serve(stack[1].url, tmp_path, SIDECAR_PUBLISHER_KEY=PUBLISHER_KEY)
    try:
        proc._proc.wait(20)
    finally:
        proc.stop()
    assert proc.returncode == 2
    assert "refusing to start" in proc.log_text() and "Traceback" not in proc.log_text()
    assert PUBLISHER_KEY not in proc.log_text()


def test_production_gunicorn_refuses_to_start_without_a_token_key(stack, tmp_path):
    argv = [sys.executable, "-m", "gunicorn", "-c", str(REPO_ROOT / "sidecar" / "gunicorn.conf.py"),
            "--bind", f"127.0.0.1:{free_port()}"]  # fmt: skip
    proc = ManagedProcess("gunicorn", argv, child_env(stack[1].url, {}), tmp_path / "gunicorn.log")
    try:
        proc._proc.wait(30)
    finally:
        proc.stop()
    assert proc.returncode not in (None, 0) and "refusing to start" in proc.log_text()


def test_dev_mode_with_a_secret_still_requires_tokens_and_says_what_is_open(stack, sidecar_process):
    dev = sidecar_process(stack[1].url, SIDECAR_DEV="1", SIDECAR_JWT_SECRET=SECRET)
    assert requests.get(f"{dev.url}/sse", params={"channel": "x"}, timeout=5).status_code == 401
    log = dev.log_text()
    assert "DEV MODE" in log and "anyone may POST /publish" in log
    assert "anyone may subscribe" not in log and SECRET not in log
