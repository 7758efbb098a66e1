"""The asyncio front (sidecar/asgi/) over real uvicorn: mounted in a FastAPI app under /realtime with the app's
own session-cookie auth next to the JWT path, and a browser-like permessage-deflate WebSocket on both fronts.

The protocol suites (test_relay.py, test_auth.py, test_herd.py, test_task_events.py, test_hostile.py) run on
both fronts through the parametrized `sidecar_process` fixture; this module covers what only the ASGI front has.
"""

from __future__ import annotations

import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import psutil
import pytest
import redis
import requests
from starlette.requests import HTTPConnection
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Ping, Request, TextMessage
from wsproto.extensions import PerMessageDeflate

from sidecar.auth import Grant
from sidecar.publish import Publisher
from tests.clients import SSEClient, WSClient
from tests.processes import FRONTS, REPO_ROOT, ManagedProcess, SidecarProcess, child_env, free_port
from tests.tokens import mint

SECRET = "asgi-mount-secret-" + "m" * 32
SESSIONS = {"cookie-of-ada": "ada", "cookie-of-bob": "bob"}  # the app's own sessions: cookie -> user


# -- the documented FastAPI example (docs/deployment.md), run by uvicorn --factory ---------------------------
def current_user(conn: HTTPConnection) -> str | None:
    """The app's own dependency: its session cookie, turned into a user."""
    return SESSIONS.get(conn.cookies.get("session", ""))


def session_grant(conn: HTTPConnection) -> Grant | None:
    """A logged-in user may read their own channels; no session: the relay falls back to the JWT."""
    user = current_user(conn)
    return Grant((f"user:{user}:*",)) if user else None


def fastapi_app(lifespan: bool = True):  # noqa: ANN201 (FastAPI is imported here only)
    from fastapi import Depends, FastAPI

    from sidecar.asgi import create_app
    from sidecar.config import Settings

    relay = create_app(Settings.from_env(), authorize=session_grant)
    # The relay's lifespan starts and stops it; without it (Starlette runs no lifespan of a mounted app) the
    # relay starts at its first request.
    app = FastAPI(lifespan=relay.state.front.lifespan) if lifespan else FastAPI()

    @app.get("/me")
    def me(user: str | None = Depends(current_user)) -> dict:
        return {"user": user}

    app.mount("/realtime", relay)
    return app


def fastapi_app_without_lifespan():  # noqa: ANN201
    return fastapi_app(lifespan=False)


def fastapi_app_with_middleware():  # noqa: ANN201
    """The app with an `@app.middleware("http")` (Starlette's BaseHTTPMiddleware: it holds each response's head
    until its own response sends it), in the path of the mounted relay's streams."""
    app = fastapi_app()

    @app.middleware("http")
    async def tag(request, call_next):  # noqa: ANN001, ANN202
        response = await call_next(request)
        response.headers["X-App"] = "tagged"
        return response

    return app


# Our protocols (docs/deployment.md's command): the `sidecar.direct` extension reaches the mounted relay through
# the mount, and its streams are written by the writer's pass. uvicorn's own: no extension, the ASGI send path.
OUR_PROTOCOLS = ["--http", "sidecar.asgi.protocols:HTTPProtocol", "--ws", "sidecar.asgi:WSProtocol"]
UVICORNS_OWN = ["--ws", "wsproto"]


@pytest.fixture(params=[("fastapi_app", "direct"), ("fastapi_app_without_lifespan", "send")], ids=str)
def mounted(redis_server, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[str]:
    factory, path = request.param
    port = free_port()
    env = child_env(redis_server.url, {"SIDECAR_JWT_SECRET": SECRET, "SIDECAR_DEV": "1"})
    argv = [sys.executable, "-m", "uvicorn", "--factory", f"tests.integration.test_asgi:{factory}",
            "--host", "127.0.0.1", "--port", str(port), "--no-access-log"]  # fmt: skip
    argv += OUR_PROTOCOLS if path == "direct" else UVICORNS_OWN
    proc = ManagedProcess(f"fastapi-{port}", argv, {**env, "PYTHONPATH": str(REPO_ROOT)}, tmp_path / "fastapi.log")
    base = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        try:
            return requests.get(f"{base}/realtime/healthz", timeout=1).status_code == 200
        except requests.RequestException:
            return False

    try:
        proc.wait_until("GET /realtime/healthz 200", healthy, 20)
        yield base
    finally:
        proc.stop()
    assert "Traceback" not in proc.log_text(), proc.log_tail(60)


def test_a_relay_mounted_in_fastapi_serves_sse_ws_and_state_under_its_prefix(mounted, redis_server):
    base, realtime = mounted, f"{mounted}/realtime"
    assert requests.get(f"{base}/me", cookies={"session": "cookie-of-ada"}, timeout=5).json() == {"user": "ada"}
    pub = Publisher.from_url(redis_server.url)
    pub.state("user:ada:inbox", "inbox", {"unread": 0})

    # The app's own cookie, over SSE and WS.
    cookie = {"Cookie": "session=cookie-of-ada"}
    sse = SSEClient(realtime, ["user:ada:inbox"], headers=cookie)
    assert sse.status == 200
    ws = WSClient(mounted.replace("http", "ws") + "/realtime", header=["Cookie: session=cookie-of-ada"])
    ws.subscribe("user:ada:inbox")
    # The JWT path next to it, for a client without the cookie.
    jwt_sse = SSEClient(realtime, ["user:ada:inbox"], token=mint(SECRET, ["user:ada:*"]))
    assert jwt_sse.status == 200
    for client in (sse, jwt_sse):
        client.wait(lambda f: any(x["_event"] == "ready" for x in f))
    ws.wait(lambda f: any(x["type"] == "subscribed" for x in f))
    for n in range(1, 4):
        pub.diff("user:ada:inbox", "inbox", {"unread": n})
    for client in (sse, jwt_sse, ws):
        client.wait(lambda f: len([x for x in f if x["type"] == "message"]) == 3)
        assert [m["diff"] for m in client.messages()] == [{"unread": n} for n in range(1, 4)]
    assert sse.last_id is not None and sse.last_id.startswith(sse.messages()[-1]["id"])

    # Another user's channel: 403 with the relay's own error body; no cookie and no token: 401.
    bob_cookie = {"session": "cookie-of-bob"}
    refused = requests.get(f"{realtime}/sse", params={"channel": "user:ada:inbox"}, cookies=bob_cookie, timeout=5)
    assert refused.status_code == 403 and refused.json()["error"] == "forbidden"
    anonymous = requests.get(f"{realtime}/sse", params={"channel": "user:ada:inbox"}, timeout=5)
    assert anonymous.status_code == 401 and anonymous.json()["error"] == "unauthorized"
    bob = WSClient(mounted.replace("http", "ws") + "/realtime", header=["Cookie: session=cookie-of-bob"])
    bob.subscribe("user:ada:inbox")
    bob.wait(lambda f: any(x["type"] == "error" for x in f))
    assert bob.of_type("error")[0]["code"] == "forbidden"

    # The pull endpoint under the prefix, with its ETag.
    state = requests.get(f"{realtime}/channels/user:ada:inbox/state", cookies={"session": "cookie-of-ada"}, timeout=5)
    assert state.status_code == 200 and state.json()["state"] == {"unread": 3}
    again = requests.get(f"{realtime}/channels/user:ada:inbox/state", cookies={"session": "cookie-of-ada"},
                         headers={"If-None-Match": state.headers["ETag"]}, timeout=5)  # fmt: skip
    assert again.status_code == 304
    for client in (sse, jwt_sse, ws, bob):
        client.close()
    pub.close()


# -- a browser's WebSocket: it offers permessage-deflate ----------------------------------------------------
class DeflateClient:
    """A WebSocket client on wsproto that offers permessage-deflate as Chromium does."""

    OFFER = "permessage-deflate; client_max_window_bits"

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.deflate = PerMessageDeflate()
        self.sock.sendall(self.ws.send(Request(host=f"127.0.0.1:{port}", target="/ws", extensions=[self.deflate])))
        self.accepted: AcceptConnection | None = None
        self.texts: list[dict] = []
        self.compressed = 0  # frames that came with RSV1 (compressed)
        self._pump(lambda: self.accepted is not None)

    def _pump(self, done, timeout: float = 10.0) -> None:  # noqa: ANN001
        deadline = time.monotonic() + timeout
        while not done():
            assert time.monotonic() < deadline, f"timed out; got {self.texts[-3:]}"
            data = self.sock.recv(65536)
            assert data, "the server closed the connection"
            self.compressed += sum(1 for i in range(len(data) - 1) if data[i] == 0xC1)  # FIN + RSV1 + text (approx.)
            self.ws.receive_data(data)
            for event in self.ws.events():
                if isinstance(event, AcceptConnection):
                    self.accepted = event
                elif isinstance(event, TextMessage):
                    self.texts.append(orjson.loads(event.data))
                elif isinstance(event, Ping):
                    self.sock.sendall(self.ws.send(event.response()))
                elif isinstance(event, CloseConnection):
                    raise AssertionError(f"closed: {event.code} {event.reason}")

    def send(self, **frame: object) -> None:
        self.sock.sendall(self.ws.send(TextMessage(orjson.dumps(frame).decode())))

    def wait(self, predicate, timeout: float = 10.0) -> None:  # noqa: ANN001
        self._pump(lambda: predicate(self.texts), timeout)

    def close(self) -> None:
        self.sock.close()


@pytest.mark.parametrize("front", FRONTS)
def test_a_browser_like_websocket_offering_permessage_deflate_gets_every_message(front, redis_server, tmp_path):
    proc = SidecarProcess(redis_server.url, tmp_path, {"SIDECAR_WS_DEFLATE": "1"}, front=front)
    client = None
    try:
        client = DeflateClient(proc.port)
        assert client.accepted is not None
        accepted = [e.name for e in client.accepted.extensions]
        client.send(op="subscribe", channel="deflate:1", mode="event")
        client.wait(lambda t: any(x["type"] == "subscribed" for x in t))
        pub = Publisher.from_url(redis_server.url)
        body = {"text": "a compressible line " * 20}
        for i in range(20):
            pub.event("deflate:1", "line", {"i": i, **body})
        client.wait(lambda t: len([x for x in t if x["type"] == "message"]) == 20)
        assert [x["data"]["i"] for x in client.texts if x["type"] == "message"] == list(range(20))
        # What each front does with the offer when SIDECAR_WS_DEFLATE=1 (docs/performance.md): both accept it; the
        # gevent front writes its pre-built frames uncompressed (legal: RSV1 off), uvicorn's wsproto compresses.
        assert accepted == ["permessage-deflate"]
        if front == "asgi":
            assert client.compressed > 0
        pub.close()
    finally:
        if client is not None:
            client.close()
        proc.stop()
    assert "Traceback" not in proc.log_text(), proc.log_tail(40)


def test_asgi_front_answers_plain_http_on_ws_and_unknown_routes_with_json_errors(redis_server, tmp_path):
    proc = SidecarProcess(redis_server.url, tmp_path, front="asgi")
    try:
        metrics = requests.get(f"{proc.url}/metrics", timeout=5)  # dev mode: open
        assert metrics.status_code == 200 and metrics.headers["Content-Type"].startswith("text/plain")
        assert "# TYPE sidecar_dispatch_errors_total counter" in metrics.text
        js = requests.get(f"{proc.url}/static/realtime.js", timeout=5)
        assert js.status_code == 200 and "export" in js.text
        plain = requests.get(f"{proc.url}/ws", timeout=5)
        assert plain.status_code == 400 and plain.json()["error"] == "not-websocket"
        missing = requests.get(f"{proc.url}/nothing-here", timeout=5)
        assert missing.status_code == 404 and missing.json()["error"] == "not-found"
        head = requests.head(f"{proc.url}/sse", params={"channel": "a"}, timeout=5)
        assert head.status_code == 200 and head.headers["Content-Type"] == "text/event-stream; charset=utf-8"
    finally:
        proc.stop()
    assert "Traceback" not in proc.log_text(), proc.log_tail(40)


def test_an_asgi_sidecar_says_asyncio_in_its_stats_records_and_metrics(redis_server, tmp_path):
    proc = SidecarProcess(redis_server.url, tmp_path, {"SIDECAR_STATS_INTERVAL": "0.3"}, front="asgi")
    client = redis.Redis.from_url(redis_server.url)
    try:

        def records() -> list[dict]:
            docs = [orjson.loads(fields[b"r"]) for _, fields in client.xrange("rt:stats")]
            return [d for d in docs if d.get("kind", "relay") == "relay"]

        deadline = time.monotonic() + 10
        while len(records()) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        recs = records()
        assert len(recs) >= 2 and {(r["v"], r["front"]) for r in recs} == {(2, "asyncio")}
        metrics = requests.get(f"{proc.url}/metrics", timeout=5).text
        assert 'sidecar_info{front="asyncio"' in metrics
    finally:
        client.close()
        proc.stop()
    assert "Traceback" not in proc.log_text(), proc.log_tail(40)


def test_python_m_sidecar_serve_front_asgi_runs_unpatched_with_its_loops_on_os_threads(redis_server, tmp_path):
    """`python -m sidecar serve --front asgi` (the fixture's command) must not monkey-patch: the asyncio front's
    reader, watchdog, stats and policy loops are OS threads, so the asgi tests test what uvicorn runs. On the
    gevent front the same loops are greenlets of one thread."""
    asgi = SidecarProcess(redis_server.url, tmp_path, front="asgi")
    gevent = SidecarProcess(redis_server.url, tmp_path, front="gevent")
    try:
        threads = {p.front: len(list(Path(f"/proc/{p.pid}/task").iterdir())) for p in (asgi, gevent)}
        assert threads["asgi"] >= 5 and threads["asgi"] > threads["gevent"] + 2, threads
    finally:
        asgi.stop()
        gevent.stop()


# -- direct writes (sidecar/asgi/writer.py) on each of uvicorn's HTTP implementations ------------------------
def uvicorn_relay(redis_url: str, tmp_path: Path, args: list[str], env: dict | None = None) -> ManagedProcess:
    port = free_port()
    argv = [sys.executable, "-m", "uvicorn", "--factory", "sidecar.asgi:app", "--host", "127.0.0.1", "--port",
            str(port), "--no-access-log", *args]  # fmt: skip
    proc = ManagedProcess(f"uvicorn-{port}", argv, child_env(redis_url, {"SIDECAR_DEV": "1", **(env or {})}),
                          tmp_path / f"uvicorn-{port}.log")  # fmt: skip
    proc.port = port  # type: ignore[attr-defined]

    def healthy() -> bool:
        try:
            return requests.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200
        except requests.RequestException:
            return False

    proc.wait_until("GET /healthz 200", healthy, 20)
    return proc


@pytest.mark.parametrize(
    "http", ["sidecar.asgi.protocols:H11Protocol", "sidecar.asgi.protocols:HttpToolsProtocol", "h11", "httptools"]
)
def test_an_sse_body_written_directly_is_valid_http_chunks_ended_by_the_servers_last_chunk(
    http, redis_server, tmp_path
):
    """The writer's pass frames each turn's frames as one chunk, as uvicorn would; uvicorn's own end of the body
    (the server shutting down) then still ends it: a strict HTTP/1.1 parser (h11) reads every message in order,
    then the end of the message. Our protocols on h11 and httptools (the direct path), uvicorn's own (the send
    path) as the reference."""
    import h11

    proc = uvicorn_relay(redis_server.url, tmp_path, ["--http", http, "--ws", "sidecar.asgi:WSProtocol"])
    pub = Publisher.from_url(redis_server.url)
    sock = socket.create_connection(("127.0.0.1", proc.port), timeout=10)  # type: ignore[attr-defined]
    try:
        client = h11.Connection(h11.CLIENT)
        sock.sendall(client.send(h11.Request(method="GET", target="/sse?channel=chunks:1&mode=event",
                                             headers=[("Host", "127.0.0.1")])))  # fmt: skip
        body, ended = b"", False

        def read(until) -> None:  # noqa: ANN001
            nonlocal body, ended
            deadline = time.monotonic() + 15
            while not until():
                assert time.monotonic() < deadline, body[-300:]
                event = client.next_event()
                if event is h11.NEED_DATA:
                    client.receive_data(sock.recv(65536))
                elif isinstance(event, h11.Response):
                    assert event.status_code == 200 and (b"transfer-encoding", b"chunked") in event.headers
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    ended = True

        read(lambda: b"event: ready" in body)
        for start in range(0, 300, 30):  # batches: a turn's frames go as one chunk
            with pub.batch() as batch:
                for n in range(start, start + 30):
                    batch.event("chunks:1", "tick", {"n": n})
        read(lambda: b'"n":299' in body)
        proc.stop()  # SIGTERM: sse-starlette's shutdown watcher ends the stream, uvicorn writes the last chunk
        read(lambda: ended)
        events = [orjson.loads(line[6:]) for line in body.split(b"\n") if line.startswith(b"data: ")]
        assert [e["data"]["n"] for e in events if e["type"] == "message"] == list(range(300))
    finally:
        sock.close()
        pub.close()
        proc.stop()
    assert "Traceback" not in proc.log_text() and "ERROR" not in proc.log_text(), proc.log_tail(40)


@pytest.mark.parametrize(
    "http", ["sidecar.asgi.protocols:H11Protocol", "sidecar.asgi.protocols:HttpToolsProtocol", "h11", "httptools"]
)
def test_sse_clients_that_leave_are_disconnected_at_once_not_at_their_next_keepalive(http, redis_server, tmp_path):
    """Our protocols tell the stream from connection_lost (no task waits in receive()); uvicorn's own (the ASGI
    send path) through the receive() task. Either way the hub lets go of a client that closed its socket long
    before its keepalive (60 s) would have found it gone."""
    env = {"SIDECAR_KEEPALIVE": "60"}
    proc = uvicorn_relay(redis_server.url, tmp_path, ["--http", http, "--ws", "sidecar.asgi:WSProtocol"], env)
    base = f"http://127.0.0.1:{proc.port}"  # type: ignore[attr-defined]

    def connections() -> int:
        return requests.get(f"{base}/healthz", timeout=5).json()["connections"]

    socks = []
    try:
        for _ in range(10):
            sock = socket.create_connection(("127.0.0.1", proc.port), timeout=10)  # type: ignore[attr-defined]
            sock.sendall(b"GET /sse?channel=leave:1&mode=event HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            head = b""
            while b"event: ready" not in head:
                head += sock.recv(65536)
            socks.append(sock)
        assert connections() == 10
        for sock in socks:
            sock.close()
        deadline = time.monotonic() + 15
        while connections() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert connections() == 0
    finally:
        for sock in socks:
            sock.close()
        proc.stop()
    assert "Traceback" not in proc.log_text(), proc.log_tail(40)


class PingCounter:
    """A WebSocket client on wsproto that counts the pings it gets while idle, and answers them."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.sock.sendall(self.ws.send(Request(host=f"127.0.0.1:{port}", target="/ws")))
        self.pings: list[bytes] = []
        self.texts: list[dict] = []
        self.accepted = False
        while not self.accepted:
            self.pump(1)

    def pump(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                break
            assert data, "the server closed the connection"
            self.ws.receive_data(data)
            for event in self.ws.events():
                if isinstance(event, AcceptConnection):
                    self.accepted = True
                elif isinstance(event, Ping):
                    self.pings.append(bytes(event.payload))
                    self.sock.sendall(self.ws.send(event.response()))
                elif isinstance(event, TextMessage):
                    self.texts.append(orjson.loads(event.data))

    def send(self, **frame: object) -> None:
        self.sock.sendall(self.ws.send(TextMessage(orjson.dumps(frame).decode())))

    def of_messages(self) -> list[dict]:
        return [t for t in self.texts if t["type"] == "message"]


def test_an_idle_asgi_websocket_gets_the_sessions_ping_alone_and_its_frames_direct(redis_server, tmp_path):
    """`sidecar serve --front asgi` writes the session's frames itself (the writer's pass), its keepalive ping
    included, so uvicorn's own ping is off: one ping per keepalive, as on the gevent front, not two."""
    proc = SidecarProcess(redis_server.url, tmp_path, {"SIDECAR_KEEPALIVE": "1"}, front="asgi")
    pub = Publisher.from_url(redis_server.url)
    client = PingCounter(proc.port)
    try:
        client.send(op="subscribe", channel="idle:1", mode="event")
        client.pump(0.5)
        assert [t["type"] for t in client.texts] == ["subscribed"]
        for n in range(50):
            pub.event("idle:1", "tick", {"n": n})
        deadline = time.monotonic() + 15
        while len(client.of_messages()) < 50 and time.monotonic() < deadline:
            client.pump(0.2)
        assert [t["data"]["n"] for t in client.of_messages()] == list(range(50))
        client.pings.clear()
        client.pump(3.5)
        # ~1 s apart once idle (the session's WS_PING: empty), not two per keepalive (uvicorn's would be as many).
        assert 1 <= len(client.pings) <= 4 and set(client.pings) == {b""}, client.pings
    finally:
        client.sock.close()
        pub.close()
        proc.stop()
    assert "Traceback" not in proc.log_text(), proc.log_tail(40)


FILLER = "x" * 4000


def flood(pub: Publisher, channel: str, reader: WSClient | SSEClient) -> None:
    """12 MB of diffs to `channel`, all of it to a stalled peer too; `reader` replays them to the last state
    exactly (the protocol's replay: a snapshot restarts, a message must be the next)."""
    for start in range(1, 3001, 100):
        with pub.batch() as batch:
            for n in range(start, start + 100):
                batch.diff(channel, "changed", {"n": n, "pad": FILLER})
    reader.wait(lambda f: any(x.get("seq") == 3001 for x in f), timeout=60)
    state, expected = None, None
    for frame in reader.frames:
        if frame["type"] in ("subscribed", "snapshot"):
            state, expected = frame["state"], frame["seq"] + 1
        elif frame["type"] == "message":
            assert frame["seq"] == expected, (frame["seq"], expected)
            state, expected = {**state, **frame["diff"]}, expected + 1
    assert state == {"n": 3000, "pad": FILLER} and expected == 3002


def assert_stalled_one_closed(base: str, pid: int, rss: int) -> None:
    """Within 20 s only the reader is left (the stuck check closed the stalled peer), and the sidecar grew by
    well under the 12 MB it was given for it."""

    def connections() -> int:
        return requests.get(f"{base}/healthz", timeout=5).json()["connections"]

    deadline = time.monotonic() + 20
    while connections() > 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert connections() == 1
    grown = psutil.Process(pid).memory_info().rss - rss
    assert grown < 6 * 2**20, f"the sidecar grew by {grown / 2**20:.1f} MB for 12 MB to a stalled peer"


def test_a_stalled_asgi_websocket_is_bounded_and_closed_by_the_stuck_check_while_another_keeps_receiving(
    redis_server, tmp_path
):
    """Flow control on the direct path: once the stalled socket's transport is paused, its frames wait in the
    connection's queue under its bounds (dropped for a resync, not buffered without end) and its task waits for
    the drain inside conn.writing(), so the stuck check closes it; the reading socket gets every message, or a
    snapshot where it fell behind itself (this test process is busy), never a hole. (SSE's stall on both fronts:
    test_herd.py.)"""
    env = {"SIDECAR_STUCK_TIMEOUT": "3", "SIDECAR_QUEUE_BYTES": str(2 * 2**20), "SIDECAR_QUEUE_FRAMES": "20000"}
    proc = SidecarProcess(redis_server.url, tmp_path, env, front="asgi")
    pub = Publisher.from_url(redis_server.url)
    pub.state("stall:1", "created", {"n": 0})
    stalled = PingCounter(proc.port)
    stalled.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    reader = WSClient(proc.ws_url)
    try:
        for client in (stalled, reader):
            client.send(op="subscribe", channel="stall:1", mode="diff")
        reader.wait(lambda f: any(x["type"] == "subscribed" for x in f))
        stalled.pump(0.5)
        assert any(t["type"] == "subscribed" for t in stalled.texts)
        rss = psutil.Process(proc.pid).memory_info().rss
        flood(pub, "stall:1", reader)
        assert_stalled_one_closed(proc.url, proc.pid, rss)
        assert "stuck in a socket write" in proc.log_text()
    finally:
        stalled.sock.close()
        reader.close()
        pub.close()
        proc.stop()
    assert "Traceback" not in proc.log_text(), proc.log_tail(40)


# -- detached SSE streams (sidecar/asgi/sse.py _Detached): no task per stream on our protocols -------------------
OURS = ["sidecar.asgi.protocols:H11Protocol", "sidecar.asgi.protocols:HttpToolsProtocol"]


class StrictStream:
    """An SSE stream read by h11 as a client: it fails on any byte that is not valid HTTP/1.1 framing."""

    def __init__(self, port: int, target: str) -> None:
        import h11

        self.h11 = h11
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.client = h11.Connection(h11.CLIENT)
        self.get(target)
        self.body, self.ended, self.times = b"", False, []

    def get(self, target: str) -> None:
        self.sock.sendall(self.client.send(self.h11.Request(method="GET", target=target,
                                                            headers=[("Host", "127.0.0.1")])))  # fmt: skip
        self.sock.sendall(self.client.send(self.h11.EndOfMessage()))

    def read(self, until, seconds: float = 15) -> None:  # noqa: ANN001
        h11, deadline = self.h11, time.monotonic() + seconds
        while not until():
            assert time.monotonic() < deadline, self.body[-300:]
            event = self.client.next_event()
            if event is h11.NEED_DATA:
                self.client.receive_data(self.sock.recv(65536))
            elif isinstance(event, h11.Response):
                self.status, self.headers = event.status_code, dict(event.headers)
            elif isinstance(event, h11.Data):
                self.body += event.data
                self.times.append((time.monotonic(), bytes(event.data)))
            elif isinstance(event, h11.EndOfMessage):
                self.ended = True


@pytest.mark.parametrize("http", OURS)
def test_a_detached_sse_stream_keeps_alive_delivers_ends_on_its_tokens_expiry_and_its_connection_serves_on(
    http, redis_server, tmp_path
):
    """With no task of its own the stream still writes its keepalive comments on its own timer, gets what is
    published, ends on its token's expiry with the `token-expired` error then the body's last chunk (h11 reads
    it strictly), and uvicorn's keep-alive then serves the next request on the same connection, as it did when
    the request's task ended the response."""
    env = {"SIDECAR_KEEPALIVE": "0.5", "SIDECAR_JWT_SECRET": SECRET, "SIDECAR_JWT_LEEWAY": "0"}
    proc = uvicorn_relay(redis_server.url, tmp_path, ["--http", http, "--ws", "sidecar.asgi:WSProtocol"], env)
    pub = Publisher.from_url(redis_server.url)
    token = mint(SECRET, ["detached:*"], ttl=4)
    stream = StrictStream(proc.port, f"/sse?channel=detached:1&mode=event&token={token}")  # type: ignore[attr-defined]
    try:
        stream.read(lambda: b"event: ready" in stream.body)
        stream.read(lambda: stream.body.count(b"\n:") >= 2)  # idle: the keepalive, on the stream's timer
        pub.event("detached:1", "tick", {"n": 1})
        stream.read(lambda: b'"n":1' in stream.body)
        stream.read(lambda: stream.ended, 10)
        assert stream.status == 200
        assert stream.body.rstrip().endswith(b'"code":"token-expired","message":"reconnect with a fresh token"}')
        keepalives = [at for at, data in stream.times if data.startswith(b":")]
        assert len(keepalives) >= 3 and all(b - a < 2 for a, b in zip(keepalives, keepalives[1:], strict=False))
        stream.client.start_next_cycle()  # the same connection, kept alive by uvicorn
        stream.get("/healthz")
        stream.body, stream.ended = b"", False
        stream.read(lambda: stream.ended)
        assert stream.status == 200 and orjson.loads(stream.body)["connections"] == 0
    finally:
        stream.sock.close()
        pub.close()
        proc.stop()
    assert "Traceback" not in proc.log_text() and "ERROR" not in proc.log_text(), proc.log_tail(40)


@pytest.mark.parametrize("http", OURS)
def test_an_http_1_0_sse_client_gets_the_body_unchunked_ended_by_the_close(http, redis_server, tmp_path):
    """HTTP/1.0 has no chunked coding (RFC 9112 section 7.1): the stream's bytes go as they are and the server's
    close ends the body, on h11 (which does so itself) and on httptools (whose uvicorn cycle would chunk it), as
    the gevent front answers. What is published arrives; the server shutting down closes the connection."""
    proc = uvicorn_relay(redis_server.url, tmp_path, ["--http", http, "--ws", "sidecar.asgi:WSProtocol"])
    pub = Publisher.from_url(redis_server.url)
    sock = socket.create_connection(("127.0.0.1", proc.port), timeout=10)  # type: ignore[attr-defined]
    try:
        sock.sendall(b"GET /sse?channel=old:1&mode=event HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        data = b""
        while b"event: ready" not in data:
            data += sock.recv(65536)
        head, body = data.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 200 ") and b"transfer-encoding" not in head.lower(), head
        assert body.startswith(b"retry: "), body
        pub.event("old:1", "tick", {"n": 1})
        while b'"n":1' not in body:
            body += sock.recv(65536)
        proc.stop()
        while chunk := sock.recv(65536):  # the close ends the body
            body += chunk
        assert b"\r\n" not in body, body  # no chunk framing anywhere: SSE lines end with \n
        assert body.count(b"event: message") == 1 and body.endswith(b"\n\n"), body
    finally:
        sock.close()
        pub.close()
        proc.stop()
    assert "Traceback" not in proc.log_text() and "ERROR" not in proc.log_text(), proc.log_tail(40)


@pytest.mark.parametrize("http", OURS)
def test_a_stalled_detached_sse_stream_is_bounded_and_closed_by_the_stuck_check_while_another_keeps_receiving(
    http, redis_server, tmp_path
):
    """Flow control with no task per stream: the stalled stream's transport pauses, its frames wait in the queue
    under its bounds (dropped for a resync), the drain is awaited inside conn.writing() and the stuck check
    closes the stream, on both of uvicorn's HTTP implementations; the reading stream gets every message, or a
    snapshot where it fell behind itself, never a hole."""
    env = {"SIDECAR_STUCK_TIMEOUT": "3", "SIDECAR_QUEUE_BYTES": str(2 * 2**20), "SIDECAR_QUEUE_FRAMES": "20000"}
    proc = uvicorn_relay(redis_server.url, tmp_path, ["--http", http, "--ws", "sidecar.asgi:WSProtocol"], env)
    base = f"http://127.0.0.1:{proc.port}"  # type: ignore[attr-defined]
    pub = Publisher.from_url(redis_server.url)
    pub.state("sstall:1", "created", {"n": 0})
    stalled = socket.create_connection(("127.0.0.1", proc.port), timeout=10)  # type: ignore[attr-defined]
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled.sendall(b"GET /sse?channel=sstall:1&mode=diff HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    head = b""
    while b"event: ready" not in head:
        head += stalled.recv(65536)
    reader = SSEClient(base, ["sstall:1"])
    try:
        reader.wait(lambda f: any(x["type"] == "ready" for x in f))
        rss = psutil.Process(proc.pid).memory_info().rss
        flood(pub, "sstall:1", reader)
        assert_stalled_one_closed(base, proc.pid, rss)  # the stalled one never closes its socket: the stuck check did
    finally:
        stalled.close()
        reader.close()
        pub.close()
        proc.stop()
    assert "Traceback" not in proc.log_text(), proc.log_tail(40)


@pytest.mark.parametrize("http", ["h11", "httptools"])
def test_idle_sse_streams_on_our_protocols_hold_no_task_and_one_on_the_send_path_does(http, redis_server):
    """What the 12 KB per idle stream rests on: on our protocols an idle stream leaves no asyncio task behind
    (not uvicorn's run_asgi, nor one of ours), so if a uvicorn or sse-starlette change stopped the detach, this
    fails. uvicorn's own protocol (the send path) keeps the request's task, as the reference."""
    import asyncio
    import dataclasses
    import threading

    import uvicorn

    from sidecar.asgi import create_app, uvicorn_config
    from sidecar.asgi.protocols import H11Protocol, HttpToolsProtocol
    from sidecar.config import Settings

    ours = {"h11": H11Protocol, "httptools": HttpToolsProtocol}[http]
    counts = {}
    for protocol in (ours, http):
        port = free_port()
        settings = dataclasses.replace(Settings(redis_url=redis_server.url, dev=True), host="127.0.0.1", port=port)
        app = create_app(settings)
        server = uvicorn.Server(uvicorn_config(settings, app, http=protocol, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 20
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive()
            time.sleep(0.05)
        loop = app.state.front.writer.loop  # the server's loop (the relay started in the lifespan)
        socks = []
        try:
            for _ in range(20):
                sock = socket.create_connection(("127.0.0.1", port), timeout=10)
                sock.sendall(b"GET /sse?channel=tasks:1&mode=event HTTP/1.1\r\nHost: x\r\n\r\n")
                data = b""
                while b"event: ready" not in data:
                    data += sock.recv(65536)
                socks.append(sock)
            time.sleep(0.5)
            counts[protocol] = asyncio.run_coroutine_threadsafe(_tasks(), loop).result(10)
        finally:
            for sock in socks:
                sock.close()
            server.should_exit = True
            thread.join(20)
    assert counts[ours] < 5, counts  # the server's own (its main loop, the watchers): none per stream
    assert counts[http] >= 20, counts


async def _tasks() -> int:
    import asyncio

    return len(asyncio.all_tasks()) - 1  # not this one


def test_a_mounted_relay_behind_an_http_middleware_streams_sse_whole_on_our_protocols(redis_server, tmp_path):
    """A middleware that holds the response's head (BaseHTTPMiddleware) is in the stream's path: the stream must
    neither write its body before the head is out nor detach from a response uvicorn has not started. h11 reads
    the whole stream strictly, the middleware's header included, then the shutdown's last chunk."""
    port = free_port()
    proc = middleware_app(redis_server.url, tmp_path, port, OUR_PROTOCOLS)
    pub = Publisher.from_url(redis_server.url)
    stream = None
    try:
        proc.wait_until("GET /realtime/healthz 200", lambda: _ok(f"http://127.0.0.1:{port}/realtime/healthz"), 20)
        token = mint(SECRET, ["mw:*"])
        stream = StrictStream(port, f"/realtime/sse?channel=mw:1&mode=event&token={token}")
        stream.read(lambda: b"event: ready" in stream.body)
        assert stream.headers.get(b"x-app") == b"tagged"
        for n in range(50):
            pub.event("mw:1", "tick", {"n": n})
        stream.read(lambda: b'"n":49' in stream.body)
        proc.stop()
        stream.read(lambda: stream.ended)
        events = [orjson.loads(line[6:]) for line in stream.body.split(b"\n") if line.startswith(b"data: ")]
        assert [e["data"]["n"] for e in events if e["type"] == "message"] == list(range(50))
    finally:
        if stream is not None:
            stream.sock.close()
        pub.close()
        proc.stop()


def middleware_app(redis_url: str, tmp_path: Path, port: int, protocols: list[str]) -> ManagedProcess:
    """uvicorn running the FastAPI app with an http middleware around the mounted relay, on `protocols`."""
    env = child_env(redis_url, {"SIDECAR_JWT_SECRET": SECRET, "SIDECAR_DEV": "1"})
    argv = [sys.executable, "-m", "uvicorn", "--factory", "tests.integration.test_asgi:fastapi_app_with_middleware",
            "--host", "127.0.0.1", "--port", str(port), "--no-access-log", *protocols]  # fmt: skip
    return ManagedProcess(f"fastapi-{port}", argv, {**env, "PYTHONPATH": str(REPO_ROOT)}, tmp_path / "fastapi.log")


def _ok(url: str) -> bool:
    try:
        return requests.get(url, timeout=1).status_code == 200
    except requests.RequestException:
        return False


@pytest.mark.parametrize("http", OURS)
def test_a_request_pipelined_behind_a_detached_stream_with_its_line_split_is_served_after_the_stream(
    http, redis_server, tmp_path
):
    """A client pipelines its next request behind the stream, and the packet with the stream's request holds the
    start of the next one's line: nothing of it may be lost or answered inside the stream's body. The stream ends
    (token expiry) with its last chunk, then the next request is answered on the same connection."""
    import h11

    env = {"SIDECAR_JWT_SECRET": SECRET, "SIDECAR_JWT_LEEWAY": "0"}
    proc = uvicorn_relay(redis_server.url, tmp_path, ["--http", http, "--ws", "sidecar.asgi:WSProtocol"], env)
    token = mint(SECRET, ["split:*"], ttl=3)
    sock = socket.create_connection(("127.0.0.1", proc.port), timeout=10)  # type: ignore[attr-defined]
    client = h11.Connection(h11.CLIENT)
    try:
        first = client.send(h11.Request(method="GET", target=f"/sse?channel=split:1&mode=event&token={token}",
                                        headers=[("Host", "127.0.0.1")])) + client.send(h11.EndOfMessage())  # fmt: skip
        second = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        sock.sendall(first + second[:12])  # "GET /healthz": the next request's line begun
        data = b""
        while b"event: ready" not in data:
            data += sock.recv(65536)
        time.sleep(0.3)  # the stream is detached by now
        sock.sendall(second[12:])
        client.receive_data(data)
        events, deadline = [], time.monotonic() + 15
        while not events or not isinstance(events[-1], h11.EndOfMessage):
            assert time.monotonic() < deadline, events[-3:]
            event = client.next_event()  # fails on anything that is not HTTP/1.1 framing
            if event is h11.NEED_DATA:
                client.receive_data(sock.recv(65536))
            else:
                events.append(event)
        body = b"".join(bytes(e.data) for e in events if isinstance(e, h11.Data))
        assert b"token-expired" in body and b"HTTP/1.1" not in body, body[-300:]
        client.start_next_cycle()
        client.send(h11.Request(method="GET", target="/healthz", headers=[("Host", "127.0.0.1")]))
        client.send(h11.EndOfMessage())
        events = []
        while not events or not isinstance(events[-1], h11.EndOfMessage):
            assert time.monotonic() < deadline, events[-3:]
            event = client.next_event()
            if event is h11.NEED_DATA:
                client.receive_data(sock.recv(65536))
            else:
                events.append(event)
        assert events[0].status_code == 200
        assert orjson.loads(b"".join(bytes(e.data) for e in events if isinstance(e, h11.Data)))["ok"] is True
    finally:
        sock.close()
        proc.stop()
    assert "Invalid HTTP request" not in proc.log_text() and "Traceback" not in proc.log_text(), proc.log_tail(40)


def test_an_http_1_0_client_behind_an_http_middleware_gets_its_stream_on_httptools(redis_server, tmp_path):
    """A middleware holding the head sends the stream through uvicorn's send(): an HTTP/1.0 client must still get
    the stream's events (uvicorn's httptools cycle frames them as it would on its own protocol), not a head and a
    RuntimeError for a body longer than its (absent) Content-Length."""
    port = free_port()
    proc = middleware_app(redis_server.url, tmp_path, port, ["--http", "sidecar.asgi.protocols:HttpToolsProtocol",
                                                             "--ws", "sidecar.asgi:WSProtocol"])  # fmt: skip
    pub = Publisher.from_url(redis_server.url)
    sock = None
    try:
        proc.wait_until("GET /realtime/healthz 200", lambda: _ok(f"http://127.0.0.1:{port}/realtime/healthz"), 20)
        token = mint(SECRET, ["mw10:*"])
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.sendall(f"GET /realtime/sse?channel=mw10:1&mode=event&token={token} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
        data = b""
        while b"event: ready" not in data:
            chunk = sock.recv(65536)
            assert chunk, data  # the server closed the stream
            data += chunk
        pub.event("mw10:1", "tick", {"n": 1})
        while b'"n":1' not in data:
            chunk = sock.recv(65536)
            assert chunk, data
            data += chunk
        assert data.split(b"\r\n\r\n", 1)[0].lower().count(b"x-app: tagged") == 1
    finally:
        if sock is not None:
            sock.close()
        pub.close()
        proc.stop()
    assert "Traceback" not in proc.log_text() and "ERROR" not in proc.log_text(), proc.log_tail(40)
