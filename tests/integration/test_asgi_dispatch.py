"""The asyncio front's own dispatch of /sse and /ws (sidecar.asgi.RelayApp: straight to the handlers, outside
Starlette's middleware stack and router) answers as the Starlette routes do and as the gevent front does:
the same error statuses, JSON bodies and headers (Allow, Retry-After, CORS, Vary), standalone and mounted.

Four servers on one Redis, in production mode (tokens, an Origin allowlist, a CORS allowlist): the gevent
front, the asgi front standalone (`sidecar serve --front asgi`), and one uvicorn app mounting the relay twice:
under /realtime as it is (the dispatch) and under /stack with a pass-through middleware added to it, which
sends every request through Starlette's stack and routes (what the routes answer).
"""

from __future__ import annotations

import base64
import os
import sys
import time
from collections.abc import Iterator

import pytest
import requests
from starlette.applications import Starlette
from starlette.routing import Mount
from starlette.types import ASGIApp, Receive, Scope, Send

from sidecar.publish import Publisher
from tests.clients import SSEClient, WSClient
from tests.processes import REPO_ROOT, EmbeddedRedis, ManagedProcess, SidecarProcess, child_env, free_port
from tests.tokens import mint as mint_with

SECRET = "dispatch-secret-" + "d" * 40
ORIGIN = "https://app.example"
ENV = {
    "SIDECAR_DEV": "0", "SIDECAR_JWT_SECRET": SECRET, "SIDECAR_JWT_LEEWAY": "0", "SIDECAR_ALLOWED_ORIGINS": ORIGIN,
    "SIDECAR_CORS_ORIGINS": ORIGIN, "SIDECAR_PUBLISHER_KEY": "dispatch-publisher-key-0123",
}  # fmt: skip
# What a client may rely on; Date, Server and the framing headers differ between servers and say nothing.
COMPARED = (
    "content-type", "allow", "retry-after", "www-authenticate", "vary", "cache-control", "x-accel-buffering",
    "access-control-allow-origin", "access-control-allow-methods", "access-control-allow-headers",
    "access-control-max-age", "access-control-expose-headers",
)  # fmt: skip


class PassThrough:
    """Any middleware: once an app has one, RelayApp sends everything through Starlette's stack."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)


def mounted_apps() -> Starlette:
    """For uvicorn --factory: the relay under /realtime (its dispatch) and under /stack (Starlette's routes)."""
    from sidecar.asgi import create_app
    from sidecar.config import Settings

    stacked = create_app(Settings.from_env())
    stacked.add_middleware(PassThrough)
    return Starlette(routes=[Mount("/realtime", create_app(Settings.from_env())), Mount("/stack", stacked)])


def mint(channels: list[str], ttl: float = 3600) -> str:
    return mint_with(SECRET, channels, ttl)


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[dict[str, str], EmbeddedRedis]]:
    """name -> base URL of each of the four, and their Redis."""
    tmp = tmp_path_factory.mktemp("dispatch")
    redis_server = EmbeddedRedis(tmp / "redis").start()
    procs: list[ManagedProcess] = []
    try:
        gevent = SidecarProcess(redis_server.url, tmp, ENV, front="gevent")
        procs.append(gevent)
        asgi = SidecarProcess(redis_server.url, tmp, ENV, front="asgi")
        procs.append(asgi)
        port = free_port()
        argv = [sys.executable, "-m", "uvicorn", "--factory", "tests.integration.test_asgi_dispatch:mounted_apps",
                "--host", "127.0.0.1", "--port", str(port), "--ws", "sidecar.asgi:WSProtocol",
                "--ws-per-message-deflate", "false", "--no-access-log"]  # fmt: skip
        env = {**child_env(redis_server.url, ENV), "PYTHONPATH": str(REPO_ROOT)}
        mounted = ManagedProcess(f"mounted-{port}", argv, env, tmp / "mounted.log")
        procs.append(mounted)
        base = f"http://127.0.0.1:{port}"

        def healthy() -> bool:
            try:
                return all(requests.get(f"{base}{p}/healthz", timeout=1).status_code == 200 for p in PREFIXES)
            except requests.RequestException:
                return False

        mounted.wait_until("both mounts' GET /healthz 200", healthy, 20)
        yield {"gevent": gevent.url, "asgi": asgi.url, **{p: base + p for p in PREFIXES}}, redis_server
    finally:
        died = [proc for proc in procs if not proc.running]
        for proc in reversed(procs):
            proc.stop()
        redis_server.stop()
    assert not died, died[0].log_tail(40)
    for proc in procs:
        assert "Traceback" not in proc.log_text(), proc.log_tail(60)


PREFIXES = ("/realtime", "/stack")


def answer(response: requests.Response) -> tuple[int, bytes, dict[str, str]]:
    headers = {h: response.headers[h] for h in COMPARED if h in response.headers}
    if "allow" in headers:  # a set of methods (Starlette's order varies; Flask adds OPTIONS to every route)
        headers["allow"] = ", ".join(sorted({m.strip() for m in headers["allow"].split(",")} - {"OPTIONS"}))
    if response.request.method == "OPTIONS":  # Flask's own OPTIONS adds these to the preflight's empty answer
        headers.pop("allow", None)
        headers.pop("content-type", None)
    return response.status_code, response.content, headers


def upgrade(key: str | None = None, **headers: str) -> dict[str, str]:
    key = key or base64.b64encode(os.urandom(16)).decode()
    return {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Key": key, "Sec-WebSocket-Version": "13",
            **headers}  # fmt: skip


def answers(servers: dict[str, str], method: str, path: str, **headers: str) -> dict[str, tuple]:
    return {
        name: answer(requests.request(method, base + path, headers=headers, timeout=10, allow_redirects=False))
        for name, base in servers.items()
    }


def differing(servers: dict[str, str], cases: list[tuple[str, str, dict[str, str], int]]) -> list[str]:
    """The cases whose answers (status, body, the compared headers) are not the same on all servers, or whose
    status is not the one expected."""
    wrong = []
    for method, path, headers, status in cases:
        got = answers(servers, method, path, **headers)
        if any(a != got["gevent"] for a in got.values()) or got["gevent"][0] != status:
            wrong.append(f"{method} {path} {headers} (expected {status}): {got}")
    return wrong


def test_sse_refusals_are_the_routes_and_the_gevent_fronts_standalone_and_mounted(servers) -> None:
    urls, _ = servers
    token = mint(["news:*"])
    auth = {"Authorization": f"Bearer {token}"}
    cases = [
        ("GET", "/sse?channel=news:a", {}, 401),  # no token
        ("GET", "/sse?channel=news:a", {"Authorization": "Bearer not-a-jwt"}, 401),
        ("GET", f"/sse?channel=news:a&token={mint(['news:*'], ttl=-10)}", {}, 401),  # expired
        ("GET", "/sse?channel=secret:a", auth, 403),
        ("GET", "/sse?channel=secret:a", {**auth, "Origin": ORIGIN}, 403),  # with CORS
        ("GET", "/sse", auth, 400),  # no channel
        ("GET", "/sse?channel=bad%20channel%00", auth, 400),
        ("GET", "/sse?channel=news:a&mode=loud", auth, 400),
        ("GET", "/sse?channel=news:a", {**auth, "Last-Event-ID": "not-a-cursor"}, 400),
        ("GET", "/sse?channel=news:a", {**auth, "Origin": ORIGIN, "Last-Event-ID": "x"}, 400),
        ("POST", "/sse?channel=news:a", auth, 405),  # not the stream's method: Starlette's 405, with Allow
        ("OPTIONS", "/sse", {"Origin": ORIGIN, "Access-Control-Request-Method": "GET"}, 200),  # preflight
        ("OPTIONS", "/sse", {"Origin": "https://evil.example"}, 200),  # no CORS for it
        ("HEAD", "/sse?channel=news:a", {**auth, "Origin": ORIGIN}, 200),
    ]
    wrong = differing(urls, cases)
    assert not wrong, "\n".join(wrong)


def test_ws_refusals_are_the_routes_and_the_gevent_fronts_standalone_and_mounted(servers) -> None:
    urls, _ = servers
    cases = [
        ("GET", "/ws", upgrade(Origin="https://evil.example"), 403),  # not in the Origin allowlist
        ("GET", "/ws", upgrade(Origin=ORIGIN, Authorization="Bearer not-a-jwt"), 401),
        ("GET", "/ws", upgrade(Origin=ORIGIN, Authorization=f"Bearer {mint(['a'], ttl=-10)}"), 401),  # expired
        ("GET", "/ws", {}, 400),  # plain HTTP on /ws: not-websocket
        ("POST", "/ws", {}, 405),
    ]
    wrong = differing(urls, cases)
    assert not wrong, "\n".join(wrong)


def test_a_stream_and_a_socket_through_the_dispatch_deliver_like_the_routes(servers) -> None:
    """The 200 answers: the stream's headers (with CORS), its `ready` and messages, the socket's frames."""
    urls, redis_server = servers
    token = mint(["news:*"])
    pub = Publisher.from_url(redis_server.url)
    try:
        streams, sockets = {}, {}
        for name, base in urls.items():
            stream = SSEClient(base, ["news:live"], headers={"Origin": ORIGIN}, token=token)
            assert stream.status == 200, name
            streams[name] = stream
            ws_url = base.replace("http", "ws", 1)
            sockets[name] = WSClient(ws_url, token=token, origin=ORIGIN)
            sockets[name].subscribe("news:live")
        heads = {name: {h: s.response.headers[h] for h in COMPARED if h in s.response.headers}
                 for name, s in streams.items()}  # fmt: skip
        assert all(h == heads["gevent"] for h in heads.values()), heads
        assert heads["gevent"]["content-type"].startswith("text/event-stream")
        assert heads["gevent"]["access-control-allow-origin"] == ORIGIN
        for client in [*streams.values(), *sockets.values()]:
            client.wait(lambda f: any(x["type"] in ("ready", "subscribed") for x in f))
        for n in range(3):
            pub.event("news:live", "tick", {"n": n})
        for name, client in [*streams.items(), *sockets.items()]:
            client.wait(lambda f: len([x for x in f if x["type"] == "message"]) == 3)
            assert [m["data"] for m in client.messages()] == [{"n": n} for n in range(3)], name
        for client in [*streams.values(), *sockets.values()]:
            client.close()
    finally:
        pub.close()


def test_with_redis_down_the_stream_answers_503_everywhere(servers) -> None:
    """A RedisError before the stream starts (its subscribe read) is the same 503 and body on all four."""
    urls, redis_server = servers
    token = mint(["news:*"])
    redis_server.kill()
    try:
        time.sleep(0.5)
        wrong = differing(urls, [("GET", f"/sse?channel=news:down&token={token}", {"Origin": ORIGIN}, 503)])
        assert not wrong, "\n".join(wrong)
    finally:
        redis_server.restart()
