"""The asyncio front: the relay as a Starlette app, on the same core as the Flask front (docs/architecture.md).

SSE goes through sse-starlette's EventSourceResponse run in the request's own task (_EventStream: its send timeout
cuts a stuck peer, its shutdown watcher ends the streams), the WebSocket through Starlette's; both are driven
by core/session.Session, like the Flask routes. The hub runs on the event loop; the reader, stats and policy
loops are threads, and every Redis read a request needs is awaited in the runtime's pool (sidecar/runtime.py).

Example::

    app = create_app(Settings.from_env())                 # uvicorn --factory sidecar.asgi:app
    fastapi_app.mount("/realtime", create_app(settings))  # every URL works under the prefix

A mounted app's lifespan is not run by Starlette or FastAPI: the relay then starts with the first request.
Give the parent app its lifespan (``FastAPI(lifespan=relay_app.state.front.lifespan)``) to stop it cleanly too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import redis
from sse_starlette import EventSourceResponse
from sse_starlette.sse import SendTimeoutError, _ensure_watcher_started_on_this_loop, _get_shutdown_state
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import HTTPConnection, Request
from starlette.responses import Response
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.websockets import WebSocket, WebSocketDisconnect
from uvicorn.protocols.utils import ClientDisconnected
from uvicorn.protocols.websockets.wsproto_impl import WSProtocol as _UvicornWSProtocol
from wsproto.connection import ConnectionState
from wsproto.events import CloseConnection

from sidecar.auth import Auth, AuthError, Grant, bearer, presented_token
from sidecar.config import Settings
from sidecar.control import HOUSEKEEPING
from sidecar.core.connection import SSE, WS, Connection
from sidecar.core.http_api import UNAVAILABLE, Refusal, publish_items, too_large
from sidecar.core.protocol import ProtocolError, dumps, error_body, loads_exact, validate_channel
from sidecar.core.session import (
    STORE_DOWN,
    Authenticate,
    Close,
    Session,
    Subscribe,
    Wait,
    Write,
    admission,
    busy,
    sse_request,
)
from sidecar.publish import Publisher
from sidecar.relay import Relay, drive_async
from sidecar.runtime import AsyncioRuntime
from sidecar.state_cache import Pulled
from sidecar.stats import CONTENT_TYPE_LATEST, exposition

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"

# The app's own way to authorise a request (a session cookie, say): a Grant, or None for the JWT path.
Authorize = Callable[[HTTPConnection], Grant | None | Awaitable[Grant | None]]
_FAILED = object()


class _Nothing:
    """The content EventSourceResponse is given: _EventStream runs the session's loop itself."""

    def __aiter__(self) -> _Nothing:
        return self

    async def __anext__(self) -> bytes:
        raise StopAsyncIteration


class _EventStream(EventSourceResponse):
    """sse-starlette's response (its headers, its HEAD answer, its send timeout, its shutdown watcher) run in the
    request's own task. EventSourceResponse's own __call__ runs an anyio task group of four tasks per stream (the
    body, the ping, the exit-signal and the disconnect listeners) with their cancel scopes and Events: most of an
    idle stream's memory (docs/performance.md). Here the body is the session's loop (`run`), the ping is the
    session's keepalive Write (the same `:` bytes), and one small task awaits receive() for the client leaving,
    which wakes the loop. A send that times out, or a stuck write aborted by the stuck check (control.py), ends
    the stream like any disconnect (no traceback)."""

    def __init__(self, run: Callable[[_EventStream], Awaitable[None]], wake: Callable[[], None], **kw: Any) -> None:
        super().__init__(_Nothing(), ping=0, sep="\n", **kw)
        self.run = run
        self.wake = wake
        self.aborted = False
        self._send: Any = None

    def set(self) -> None:
        """The client left, or the server shuts down (sse-starlette's watcher sets its registered events)."""
        self.active = False
        self.wake()

    def abort(self, task: asyncio.Task[Any]) -> None:
        self.aborted = True
        self.set()
        task.cancel()

    async def write(self, data: bytes) -> None:
        await self._send_with_timeout(self._send, {"type": "http.response.body", "body": data, "more_body": True})

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] == "HEAD":
            await super().__call__(scope, receive, send)
            return
        self._send = send
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        listener = asyncio.ensure_future(self._listen_for_disconnect(receive))
        listener.add_done_callback(lambda _: self.set())
        _ensure_watcher_started_on_this_loop()
        shutdown = _get_shutdown_state().events
        shutdown.add(self)  # type: ignore[arg-type]
        try:
            await self.run(self)
            # The end of the body: a no-op on uvicorn once the client left, a clean end on a server shutdown.
            await self._send_with_timeout(send, {"type": "http.response.body", "body": b"", "more_body": False})
        except (SendTimeoutError, OSError):
            pass
        except asyncio.CancelledError:
            if not self.aborted:
                raise
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
        finally:
            shutdown.discard(self)
            listener.cancel()


class Front:
    """One app's relay and what its routes share; the relay starts in the lifespan or at the first request."""

    def __init__(self, settings: Settings, authorize: Authorize | None) -> None:
        self.settings = settings
        self.authorize = authorize
        self.auth = Auth(settings)
        self.relay: Relay | None = None
        self.runtime: AsyncioRuntime | None = None
        self.publisher: Publisher | None = None
        self._starting: asyncio.Lock | None = None
        self._flights: dict[tuple[Any, ...], asyncio.Future[Any]] = {}

    async def ready(self) -> Relay:
        if self.relay is not None:
            return self.relay
        if self._starting is None:
            self._starting = asyncio.Lock()
        async with self._starting:
            if self.relay is None:
                loop = asyncio.get_running_loop()
                runtime = AsyncioRuntime(loop, self.settings.redis_pool)
                relay = Relay(self.settings, runtime=runtime)
                await loop.run_in_executor(None, relay.start)  # blocking reads; its hub steps come to the loop
                self.runtime, self.publisher, self.relay = runtime, Publisher(relay.store), relay
        return self.relay

    async def stop(self) -> None:
        relay, self.relay = self.relay, None
        if relay is not None:
            await asyncio.get_running_loop().run_in_executor(None, relay.stop)  # its last stats record: a Redis write

    @contextlib.asynccontextmanager
    async def lifespan(self, _app: Any = None) -> AsyncIterator[None]:
        await self.ready()
        try:
            yield
        finally:
            await self.stop()

    async def grant(self, conn: HTTPConnection, required: bool = True) -> Grant | None:
        """The app's own grant if it gives one, else the token's (`Authorization: Bearer` or `?token=`). With
        `required` false (a WebSocket), None when no token came and tokens are required: it must send one."""
        if self.authorize is not None:
            given = self.authorize(conn)
            if asyncio.iscoroutine(given) or isinstance(given, Awaitable):
                given = await given
            if given is not None:
                return given
        token = presented_token(conn.headers.get("authorization"), conn.query_params.getlist("token"))
        if not required and not token and self.auth.tokens_required:
            return None
        return self.auth.grant(token)

    async def read(self, fn: Callable[..., Any], *args: Any) -> Any:
        assert self.runtime is not None
        return await self.runtime.read(fn, *args)

    async def pull(self, channel: str) -> Pulled:
        """The state cache's pull (sidecar/state_cache.py) with asyncio flights: N pulls of one version, one read."""
        relay = await self.ready()
        relay.stats.count("pulled", channel)
        cache = relay.control.pulls
        hit, result, version, record = cache.cached(channel)
        if hit:
            return result
        flight = self._flights.get(version)
        if flight is not None:
            shared = await asyncio.shield(flight)
            if shared is not _FAILED:
                return shared
        flight = self._flights[version] = asyncio.get_running_loop().create_future()
        outcome: Any = _FAILED
        try:
            outcome = cache.keep(channel, record, await self.read(cache.read, channel))
            return outcome
        finally:
            if self._flights.get(version) is flight:
                del self._flights[version]
            flight.set_result(outcome)


def _canceller(task: asyncio.Task[Any] | None) -> Callable[[], None] | None:
    if task is None:
        return None

    def cancel() -> None:
        task.cancel()

    return cancel


def front_of(conn: HTTPConnection) -> Front:
    return conn.app.state.front


def error(status: int, code: str, message: str, **headers: str) -> Response:
    return Response(error_body(code, message), status, headers=headers, media_type="application/json")


def _cors(request: Request, response: Response) -> Response:
    """CORS for the browser-facing reads, as the Flask front (allowlist: SIDECAR_CORS_ORIGINS)."""
    response.headers.append("Vary", "Origin")
    allow = front_of(request).auth.cors_origin(request.headers.get("origin"))
    if allow:
        response.headers["Access-Control-Allow-Origin"] = allow
        response.headers["Access-Control-Expose-Headers"] = "ETag"
        if request.method == "OPTIONS":
            response.headers["Access-Control-Allow-Methods"] = "GET"
            response.headers["Access-Control-Allow-Headers"] = "Authorization, Last-Event-ID, If-None-Match"
            response.headers["Access-Control-Max-Age"] = "600"
    return response


async def read_body(request: Request, limit: int) -> bytes | None:
    """The body, or None when it is over `limit` (413), chunked or not."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        return None
    chunks, size = [], 0
    async for chunk in request.stream():
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            return None
    return b"".join(chunks)


def answer(refused: Refusal) -> Response:
    return Response(refused.body, refused.status, headers=dict(refused.headers), media_type="application/json")


def _too_large(limit: int) -> Response:
    return answer(too_large(limit))


# -- routes -------------------------------------------------------------------------------------------------
async def healthz(request: Request) -> Response:
    front = front_of(request)
    relay = await front.ready()
    status, body = relay.health(await front.read(relay.healthy))  # healthy(): a PING, blocking
    return Response(body, status, media_type="application/json")


async def metrics(request: Request) -> Response:
    front = front_of(request)
    front.auth.require_metrics(bearer(request.headers.get("authorization")))
    relay = await front.ready()
    return Response(exposition(relay.stats), headers={"Content-Type": CONTENT_TYPE_LATEST})


async def sse(request: Request) -> Response:
    """Server-Sent Events: `?channel=a&channel=b&mode=diff`, resumed by `Last-Event-ID` (or `last_event_id`)."""
    if request.method == "OPTIONS":
        return _cors(request, Response(status_code=200))
    front = front_of(request)
    settings, relay = front.settings, await front.ready()
    grant = await front.grant(request)
    assert grant is not None
    query = request.query_params
    cursor = request.headers.get("last-event-id") or query.get("last_event_id")
    channels, mode, positions = sse_request(
        query.getlist("channel"), query.get("mode", "diff"), cursor, settings.max_channels,
        lambda names: Auth.authorize(grant, names),  # all or nothing: 403 if any channel is outside the grant
    )  # fmt: skip
    retry = relay.control.admit(channels)  # before any Redis read: a refused client costs next to nothing
    if retry is not None:
        body, _, after = busy(retry)
        return _cors(request, Response(body, 503, headers={"Retry-After": after}, media_type="application/json"))
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    if request.method == "HEAD":
        return _cors(request, Response(headers=headers, media_type="text/event-stream"))
    wake = _Wake()
    conn = relay.connection(SSE, wake.set)
    try:
        await drive_async(relay.subscribing(conn, channels, mode, positions), front.runtime)  # type: ignore[arg-type]
    except BaseException:
        relay.hub.disconnect(conn)
        raise
    session = Session(conn, relay.hub, settings, grant, time.time())
    session.stream(channels, mode, random.random())  # queues `ready`; its first Write is the `retry:` line
    # The stuck check (control.py) closes a stream stuck in a write after stuck_timeout; the send timeout is
    # only a backstop, for a loop too busy to run it.
    response = _EventStream(
        lambda stream: _sse_loop(front, relay, conn, session, wake, stream), wake.set, headers=headers,
        send_timeout=relay.throttle.policy.stuck_timeout + 3 * HOUSEKEEPING,
    )  # fmt: skip
    return _cors(request, response)


async def _sse_loop(
    front: Front, relay: Relay, conn: Connection, session: Session, wake: _Wake, stream: _EventStream
) -> None:
    """The SSE connection's loop: the Session's actions carried out as the response's chunks, the keepalive
    included (as on the gevent front), until the client leaves (`stream.active`)."""
    task = asyncio.current_task()
    assert task is not None
    conn.abort = lambda: stream.abort(task)  # a stuck write (control.py)
    try:
        while stream.active:
            action = session.next(time.time())
            if isinstance(action, Write):
                if action.data:
                    with conn.writing(time.monotonic()):  # resumed once the chunk is sent
                        await stream.write(action.data)
                if action.frames:
                    relay.stats.observe_write(conn)
            elif isinstance(action, Wait):
                if not await _woken(wake, action.deadline - time.time()):
                    session.timer_fired()
                wake.clear()
            elif isinstance(action, Close):
                if action.data:
                    await stream.write(action.data)  # never outlive the token
                return
            else:
                await drive_async(relay.resyncing(conn), front.runtime)  # type: ignore[arg-type]
    finally:
        conn.abort = None
        relay.hub.disconnect(conn)


class _Wake:
    """A connection's wake-up, set by the hub (on the loop) and awaited by the connection's loop, like an
    asyncio.Event but with a future only while it waits: an Event keeps a deque for every idle connection."""

    __slots__ = ("flag", "waiter")

    def __init__(self) -> None:
        self.flag = False
        self.waiter: asyncio.Future[None] | None = None

    def set(self) -> None:
        self.flag = True
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def clear(self) -> None:
        self.flag = False

    def is_set(self) -> bool:
        return self.flag

    async def wait(self) -> None:
        if self.flag:
            return
        self.waiter = asyncio.get_running_loop().create_future()
        try:
            await self.waiter
        finally:
            self.waiter = None


async def _woken(wake: _Wake, timeout: float) -> bool:
    """Wait for `wake` up to `timeout` seconds: True if woken. In the connection's own task (wait_for would make
    one more task per wait: memory for every idle connection)."""
    if wake.is_set():
        return True
    try:
        async with asyncio.timeout(max(0.0, timeout)):
            await wake.wait()
    except TimeoutError:
        return False
    return True


async def channel_state(request: Request) -> Response:
    """The pull of poke/pull: the channel's snapshot with an ETag of its position (one Redis read per version)."""
    if request.method == "OPTIONS":
        return _cors(request, Response(status_code=200))
    front = front_of(request)
    grant = await front.grant(request)
    assert grant is not None
    channel = request.path_params["channel"]
    Auth.authorize(grant, [validate_channel(channel)])  # 403 before 404: no oracle for what exists
    pulled = await front.pull(channel)
    if pulled is None:
        message = "nothing has been published on this channel (or it expired)"
        return _cors(request, error(404, "unknown-channel", message))
    etag, body = pulled
    if_none_match = request.headers.get("if-none-match", "")
    if etag in if_none_match or if_none_match.strip() == "*":
        return _cors(request, Response(status_code=304, headers={"ETag": etag}))
    return _cors(request, Response(body, headers={"ETag": etag}, media_type="application/json"))


async def publish(request: Request) -> Response:
    """The publisher API over HTTP: one message object, or {"messages": [...]} for a batch."""
    front = front_of(request)
    front.auth.require_publisher(bearer(request.headers.get("authorization")))
    await front.ready()
    limit = front.settings.max_publish_bytes * 2
    data = await read_body(request, limit)
    if data is None:
        return _too_large(limit)
    publisher = front.publisher
    assert publisher is not None
    encoded = publish_items(loads_exact(data), publisher.item)  # ProtocolError (PublishError too): a 400
    published = await front.read(publisher._send, encoded)
    body = [{"channel": p.channel, "id": p.id, "seq": p.seq, "epoch": p.epoch} for p in published]  # protocol.md
    return Response(dumps({"published": body}), media_type="application/json")


async def admin_throttle(request: Request) -> Response:
    """GET the policy in force; PUT a new one (what it leaves out takes the settings'); DELETE: the settings'."""
    front = front_of(request)
    front.auth.require_admin(bearer(request.headers.get("authorization")))
    relay = await front.ready()
    control = relay.control
    if request.method != "GET":
        doc: object = None
        if request.method == "PUT":
            data = await read_body(request, front.settings.max_publish_bytes * 2)
            if data is None:
                return _too_large(front.settings.max_publish_bytes * 2)
            try:
                doc = orjson.loads(data)
            except orjson.JSONDecodeError:
                return error(400, "bad-json", "the body must be a JSON policy document")
            if not isinstance(doc, dict):
                message = "the policy is a JSON object (DELETE /admin/throttle restores the settings')"
                return error(400, "bad-policy", message)
        from sidecar.core.throttle import PolicyError

        try:
            control.applied(*await front.read(control.store_policy, doc))
        except PolicyError as exc:
            return error(400, "bad-policy", str(exc))
    return Response(orjson.dumps(control.describe()), media_type="application/json")


async def websocket(ws: WebSocket) -> None:
    """The WebSocket: the same checks and Session as sidecar/ws.py (uvicorn checked the upgrade itself)."""
    front = front_of(ws)
    settings = front.settings
    if not front.auth.origin_allowed(ws.headers.get("origin"), ws.headers.get("host")):
        await _deny(ws, AuthError(403, "forbidden-origin", "WebSockets from this origin are not allowed"))
        return
    try:
        grant = await front.grant(ws, required=False)
    except AuthError as exc:
        await _deny(ws, exc)
        return
    relay = await front.ready()
    # A socket without a token yet is admitted as a connection only when its auth frame brings one (_request).
    refused = admission(relay.control.admit() if grant is not None else relay.control.admit_unauthenticated())
    await ws.accept()
    if refused is not None:
        await ws.close(refused.code, refused.reason)
        return
    wake = _Wake()
    conn = relay.connection(WS, wake.set)
    if grant is None:
        relay.control.unauthenticated.add(conn.id)
    session = Session(conn, relay.hub, settings, grant, time.time())
    inbox: list[str | bytes] = []  # lists, not deques or Events: every idle socket holds these
    gone = False
    task = asyncio.current_task()
    conn.abort = _canceller(task)  # a stuck write (control.py)

    async def receive() -> None:
        nonlocal gone
        try:
            while True:
                message = await ws.receive()
                if message["type"] == "websocket.disconnect":
                    break
                raw = message.get("text")
                inbox.append(raw if raw is not None else message.get("bytes") or b"")
                wake.set()
        finally:
            gone = True
            wake.set()

    receiver = asyncio.create_task(receive())
    close: Close | None = None
    try:
        while not gone and close is None:
            action = session.next(time.time())
            if isinstance(action, Write):
                with conn.writing(time.monotonic()):
                    await _send_frames(ws, action.data)
                if action.frames:
                    relay.stats.observe_write(conn)
            elif isinstance(action, Wait):
                if not await _woken(wake, action.deadline - time.time()):
                    session.timer_fired()  # its keepalive is a ping frame: uvicorn's own ping sends those
                wake.clear()
                while inbox and close is None:
                    close = await _request(front, relay, session, session.receive(inbox.pop(0), time.time()))
            elif isinstance(action, Close):
                close = action
            else:
                await drive_async(relay.resyncing(conn), front.runtime)  # type: ignore[arg-type]
        if close is not None:
            await ws.close(close.code, close.reason)
    except redis.RedisError:
        with contextlib.suppress(Exception):
            await ws.close(STORE_DOWN.code, STORE_DOWN.reason)
    except (WebSocketDisconnect, OSError, RuntimeError):
        pass  # the client went away (Starlette raises RuntimeError for a send after the close)
    finally:
        receiver.cancel()
        conn.abort = None
        relay.control.unauthenticated.discard(conn.id)
        relay.hub.disconnect(conn)


async def _not_websocket(_request: Request) -> Response:
    return error(400, "not-websocket", "this endpoint speaks WebSocket only (RFC 6455)")


async def _deny(ws: WebSocket, exc: AuthError) -> None:
    """Refuse the upgrade with the HTTP status and JSON body the Flask front gives."""
    if "websocket.http.response" in ws.scope.get("extensions", {}):
        await ws.send_denial_response(error(exc.status, exc.code, exc.message, **exc.headers))
    else:
        await ws.close(1008, exc.message)


FRAMES = "sidecar.websocket.frames"  # the ASGI extension of WSProtocol below: pre-built frames in one send


async def _send_frames(ws: WebSocket, data: bytes) -> None:
    """The hub's WebSocket frames are whole RFC 6455 frames (shared by every socket on the gevent front). On
    WSProtocol (its FRAMES extension) they go to the transport as they are, one write per Write action. ASGI
    itself sends messages, so elsewhere each frame's payload goes as one message, and ping frames are left to the
    server's own."""
    if FRAMES in ws.scope.get("extensions", {}):
        await ws.send({"type": "websocket.send", FRAMES: data})
        return
    i, n = 0, len(data)
    while i < n:
        opcode, size = data[i] & 0x0F, data[i + 1] & 0x7F
        i += 2
        if size == 126:
            size, i = int.from_bytes(data[i : i + 2], "big"), i + 2
        elif size == 127:
            size, i = int.from_bytes(data[i : i + 8], "big"), i + 8
        payload, i = data[i : i + size], i + size
        if opcode == 0x1:
            await ws.send({"type": "websocket.send", "text": payload.decode()})
        elif opcode == 0x2:
            await ws.send({"type": "websocket.send", "bytes": payload})


async def _request(front: Front, relay: Relay, session: Session, asked: object) -> Close | None:
    """Carry out what a client frame asked for (sidecar/ws.py's _request, with the Redis read awaited)."""
    if isinstance(asked, Subscribe):
        since = {asked.channel: asked.since} if asked.since else {}
        try:
            steps = relay.subscribing(session.conn, [asked.channel], asked.mode, since)
            await drive_async(steps, front.runtime)  # type: ignore[arg-type]
        except ProtocolError as exc:
            session.error(exc, asked.channel)
    elif isinstance(asked, Authenticate):
        verdict: Grant | str
        try:
            verdict = front.auth.grant(asked.token)
        except AuthError as exc:
            verdict = exc.message
        # Its first token: from now on it counts as a connection (or it is refused, the replica being full).
        return session.authenticate(verdict, lambda: relay.control.authorised(session.conn.id))
    return asked if isinstance(asked, Close) else None


# -- errors -------------------------------------------------------------------------------------------------
async def _protocol_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ProtocolError)
    return error(400, exc.code, exc.message)


async def _auth_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, AuthError)
    return error(exc.status, exc.code, exc.message, **exc.headers)


async def _redis_down(_request: Request, exc: Exception) -> Response:
    log.warning("Redis unavailable: %s", type(exc).__name__)
    return answer(UNAVAILABLE)


async def _http_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = {404: "not-found", 405: "method-not-allowed"}.get(exc.status_code, "error")
    return error(exc.status_code, code, str(exc.detail), **(exc.headers or {}))


def create_app(settings: Settings, authorize: Authorize | None = None) -> Starlette:
    """The relay as an ASGI app. `authorize`: the app's own way to turn a request into a Grant (None: the token's)."""
    front = Front(settings, authorize)
    routes = [
        Route("/healthz", healthz),
        Route("/metrics", metrics),
        Route("/sse", sse, methods=["GET", "HEAD", "OPTIONS"]),
        Route("/channels/{channel}/state", channel_state, methods=["GET", "HEAD", "OPTIONS"]),
        Route("/publish", publish, methods=["POST"]),
        Route("/admin/throttle", admin_throttle, methods=["GET", "PUT", "DELETE"]),
        WebSocketRoute("/ws", websocket),
        Route("/ws", _not_websocket),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),  # realtime.js, as the Flask front serves it
    ]
    handlers = {
        ProtocolError: _protocol_error, AuthError: _auth_error, redis.RedisError: _redis_down,
        HTTPException: _http_error,
    }  # fmt: skip
    app = Starlette(routes=routes, exception_handlers=handlers, lifespan=front.lifespan)
    app.state.front = front
    return app


def app() -> Starlette:
    """For `uvicorn --factory sidecar.asgi:app`: the settings from the environment (docs/settings.md)."""
    return create_app(Settings.from_env())


class WSProtocol(_UvicornWSProtocol):
    """uvicorn's wsproto protocol, answering a frame wsproto cannot parse (invalid UTF-8 in a text frame, say)
    with its close frame (1007) instead of dropping the connection: RFC 6455 section 7.1.7, and what the gevent
    front does. wsproto reports such a frame as a CloseConnection while the connection is still open (a real
    close from the client is REMOTE_CLOSING), and uvicorn then closed TCP without a close frame. For uvicorn's
    command line: `--ws sidecar.asgi:WSProtocol` (docs/deployment.md).

    Its FRAMES extension (offered only without permessage-deflate, which compresses each message itself): a
    `websocket.send` carrying FRAMES is written to the transport as it is, after uvicorn's own checks (flow
    control, disconnect, close sent): the relay's pre-built frames, one write for all frames of a Write action
    instead of one ASGI send, one wsproto encoding and one transport write per frame."""

    def handle_connect(self, event: Any) -> None:
        super().handle_connect(event)
        if not self.config.ws_per_message_deflate:
            self.scope["extensions"][FRAMES] = {}

    async def send(self, message: Any) -> None:
        frames = message.get(FRAMES)
        if frames is None or message["type"] != "websocket.send":
            await super().send(message)
            return
        await self.writable.wait()
        if self.disconnected or self.close_sent or self.conn.state != ConnectionState.OPEN:
            raise ClientDisconnected()
        if not self.transport.is_closing():
            self.transport.write(frames)

    def handle_close(self, event: CloseConnection) -> None:
        if not self.close_sent and self.conn.state == ConnectionState.OPEN:
            reason = (event.reason or "").encode()[:123].decode(errors="ignore")
            self.transport.write(self.conn.send(CloseConnection(event.code, reason)))
            self.close_sent = True
            self.queue.put_nowait({"type": "websocket.disconnect", "code": event.code, "reason": reason})
            self.transport.close()
            return
        super().handle_close(event)


def serve(settings: Settings) -> None:
    """`sidecar serve --front asgi`: the app on uvicorn (uvloop and httptools when installed), with the same
    startup checks and embedded Redis as the gevent front. Production: docs/deployment.md."""
    import uvicorn

    from sidecar.embedded import prepare_to_serve

    settings, embedded = prepare_to_serve(settings, log)
    config = uvicorn.Config(
        create_app(settings), host=settings.host, port=settings.port, loop="auto", http="auto", ws=WSProtocol,
        ws_max_size=settings.max_frame_bytes, ws_ping_interval=settings.keepalive, ws_ping_timeout=None,
        ws_per_message_deflate=settings.ws_deflate,
        timeout_keep_alive=int(settings.idle_timeout), backlog=2048, log_config=None, access_log=False,
        lifespan="on",
    )  # fmt: skip
    log.info("sidecar (asgi) listening on http://%s:%d (Redis %s)", settings.host, settings.port, settings.redis_url)
    try:
        uvicorn.Server(config).run()
    finally:
        if embedded is not None:
            embedded.stop()
