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

The app is a Starlette app (`RelayApp`) whose own `__call__` sends `/sse` and `/ws` straight to their handlers,
outside Starlette's middleware stack and router (their frames would be held for a stream's whole life), with
the same exception handlers; everything else goes through Starlette.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from pathlib import Path
from typing import Any

import orjson
import redis
from starlette._utils import get_route_path
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import HTTPConnection, Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket

from sidecar.asgi.front import Authorize, Front, answer, cors, error, front_of, oversized, read_body
from sidecar.asgi.sse import sse
from sidecar.asgi.ws import FRAMES, WSProtocol, not_websocket, websocket, ws_protocol
from sidecar.auth import Auth, AuthError, bearer
from sidecar.config import Settings
from sidecar.core.http_api import UNAVAILABLE, publish_items
from sidecar.core.protocol import ProtocolError, dumps, loads_exact, validate_channel
from sidecar.core.throttle import LOG_MAX, PolicyError, change_summary, log_count, policy_changes
from sidecar.stats import CONTENT_TYPE_LATEST, exposition

log = logging.getLogger(__name__)

__all__ = ["FRAMES", "Authorize", "Front", "RelayApp", "WSProtocol", "app", "create_app", "serve"]

STATIC = Path(__file__).parent.parent / "static"


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


async def channel_state(request: Request) -> Response:
    """The pull of poke/pull: the channel's snapshot with an ETag of its position (one Redis read per version)."""
    if request.method == "OPTIONS":
        return cors(request, Response(status_code=200, headers={"Allow": "GET, HEAD, OPTIONS"}))
    front = front_of(request)
    grant = await front.grant(request)
    assert grant is not None
    channel = request.path_params["channel"]
    Auth.authorize(grant, [validate_channel(channel)])  # 403 before 404: no oracle for what exists
    pulled = await front.pull(channel)
    if pulled is None:
        message = "nothing has been published on this channel (or it expired)"
        return cors(request, error(404, "unknown-channel", message))
    etag, body = pulled
    if_none_match = request.headers.get("if-none-match", "")
    if etag in if_none_match or if_none_match.strip() == "*":
        return cors(request, Response(status_code=304, headers={"ETag": etag}))
    return cors(request, Response(body, headers={"ETag": etag}, media_type="application/json"))


async def publish(request: Request) -> Response:
    """The publisher API over HTTP: one message object, or {"messages": [...]} for a batch."""
    front = front_of(request)
    front.auth.require_publisher(bearer(request.headers.get("authorization")))
    await front.ready()
    limit = front.settings.max_publish_bytes * 2
    data = await read_body(request, limit)
    if data is None:
        return oversized(limit)
    publisher = front.publisher
    assert publisher is not None
    encoded = publish_items(loads_exact(data), publisher.item)  # ProtocolError (PublishError too): a 400
    published = await front.read(publisher._send, encoded)
    body = [{"channel": p.channel, "id": p.id, "seq": p.seq, "epoch": p.epoch} for p in published]  # protocol.md
    return Response(dumps({"published": body}), media_type="application/json")


async def admin_throttle(request: Request) -> Response:
    """GET the policy in force; PUT a new one (what it leaves out takes the settings'); DELETE: the settings'."""
    front = front_of(request)
    who = front.auth.require_admin(bearer(request.headers.get("authorization")))
    relay = await front.ready()
    control = relay.control
    if request.method != "GET":
        doc: object = None
        if request.method == "PUT":
            data = await read_body(request, front.settings.max_publish_bytes * 2)
            if data is None:
                return oversized(front.settings.max_publish_bytes * 2)
            try:
                doc = orjson.loads(data)
            except orjson.JSONDecodeError:
                return error(400, "bad-json", "the body must be a JSON policy document")
            if not isinstance(doc, dict):
                message = "the policy is a JSON object (DELETE /admin/throttle restores the settings')"
                return error(400, "bad-policy", message)
        before = control.throttle.policy
        try:
            policy, stored, version, at = await front.read(control.store_policy, doc)
        except PolicyError as exc:
            return error(400, "bad-policy", str(exc))
        control.applied(policy, stored, version, at)
        try:  # as sidecar/admin.py: a log Redis refuses leaves the change standing, with a warning
            await front.read(control.store.log_policy_change, at, who, change_summary(before, policy, stored), stored)
        except redis.RedisError as exc:
            log.warning("throttle: the policy change was applied but not logged (%s)", type(exc).__name__)
    return Response(orjson.dumps(control.describe()), media_type="application/json")


async def admin_throttle_log(request: Request) -> Response:
    """The last `n` (1-1000, default 50) policy changes, newest first."""
    front = front_of(request)
    front.auth.require_admin(bearer(request.headers.get("authorization")))
    relay = await front.ready()
    n = log_count(request.query_params.get("n", "50"))
    if n is None:
        return error(400, "bad-request", f"n must be an integer from 1 to {LOG_MAX}")
    changes = policy_changes(await front.read(relay.store.read_policy_log, n))
    return Response(orjson.dumps({"changes": changes}), media_type="application/json")


# -- errors -------------------------------------------------------------------------------------------------
# The browser-facing reads answer their errors with CORS too, as the Flask front's after_request does: a page on
# another origin can then read why it was refused. (Starlette's Router sets the scope's endpoint, RelayApp too.)
def _read_cors(conn: HTTPConnection, response: Response) -> Response:
    if isinstance(conn, Request) and conn.scope.get("endpoint") in (sse, channel_state):
        return cors(conn, response)
    return response


async def _protocol_error(request: HTTPConnection, exc: Exception) -> Response:
    assert isinstance(exc, ProtocolError)
    return _read_cors(request, error(400, exc.code, exc.message))


async def _auth_error(request: HTTPConnection, exc: Exception) -> Response:
    assert isinstance(exc, AuthError)
    return _read_cors(request, error(exc.status, exc.code, exc.message, **exc.headers))


async def _redis_down(request: HTTPConnection, exc: Exception) -> Response:
    log.warning("Redis unavailable: %s", type(exc).__name__)
    return _read_cors(request, answer(UNAVAILABLE))


async def _http_error(_request: HTTPConnection, exc: Exception) -> Response:
    """The reason phrase as the message, as on the Flask front: {"error": "not-found", "message": "Not Found"}."""
    assert isinstance(exc, HTTPException)
    status = exc.status_code
    return error(status, HTTPStatus(status).phrase.lower().replace(" ", "-"), HTTPStatus(status).phrase,
                 **(exc.headers or {}))  # fmt: skip


SSE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})  # the /sse route's: any other goes to Starlette's 405


class RelayApp(Starlette):
    """The relay's Starlette app, whose own `__call__` sends `/sse` and `/ws` (relative to the mount's
    root_path) straight to their handlers. Through Starlette, a stream holds the coroutine frames of its
    middleware stack, router and route wrappers for its whole life (about 4 KB per idle connection,
    docs/performance.md). The answers are the routes': the same exception handlers, Starlette's 500 for an
    unhandled error, the same Request and WebSocket objects. Everything else goes through Starlette: other
    paths, other methods (a 405), the lifespan, and every request once middleware is added to this app."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind != "lifespan" and not self.user_middleware:
            path = get_route_path(scope)
            if path == "/sse" and kind == "http" and scope["method"] in SSE_METHODS:
                scope["app"], scope["router"], scope["endpoint"] = self, self.router, sse
                await self._http(sse, scope, receive, send)
                return
            if path == "/ws" and kind == "websocket":
                scope["app"], scope["router"], scope["endpoint"] = self, self.router, websocket
                await self._websocket(scope, receive, send)
                return
        await super().__call__(scope, receive, send)

    async def _http(self, endpoint: Callable[[Request], Awaitable[Response]], scope: Scope, receive: Receive,
                    send: Send) -> None:  # fmt: skip
        response = await self._response(endpoint, scope, receive, send)
        await response(scope, receive, send)  # a stream's whole life: the Request (and its parsed headers) is gone

    async def _response(self, endpoint: Callable[[Request], Awaitable[Response]], scope: Scope, receive: Receive,
                        send: Send) -> Response:  # fmt: skip
        request = Request(scope, receive, send)
        try:
            return await endpoint(request)
        except Exception as exc:
            answered = await self._handled(request, exc)
            if answered is None:  # Starlette's ServerErrorMiddleware: a 500, and the error to the server's log
                await PlainTextResponse("Internal Server Error", 500)(scope, receive, send)
                raise
            return answered

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        ws = WebSocket(scope, receive, send)
        try:
            await websocket(ws)
        except Exception as exc:
            answered = await self._handled(ws, exc)
            if answered is None:
                raise
            await answered(scope, receive, send)  # before the accept: the denial response, as Starlette's

    async def _handled(self, conn: HTTPConnection, exc: Exception) -> Response | None:
        """The answer of this app's exception handler for `exc` (looked up by its class's MRO, as Starlette)."""
        for cls in type(exc).__mro__:
            handler = self.exception_handlers.get(cls)
            if handler is not None:
                response = await handler(conn, exc)
                exc.__traceback__ = None
                return response
        return None


def create_app(settings: Settings, authorize: Authorize | None = None) -> RelayApp:
    """The relay as an ASGI app. `authorize`: the app's own way to turn a request into a Grant (None: the token's)."""
    front = Front(settings, authorize)
    routes = [
        Route("/healthz", healthz),
        Route("/metrics", metrics),
        Route("/sse", sse, methods=["GET", "HEAD", "OPTIONS"]),
        Route("/channels/{channel}/state", channel_state, methods=["GET", "HEAD", "OPTIONS"]),
        Route("/publish", publish, methods=["POST"]),
        Route("/admin/throttle", admin_throttle, methods=["GET", "PUT", "DELETE"]),
        Route("/admin/throttle/log", admin_throttle_log),
        WebSocketRoute("/ws", websocket),
        Route("/ws", not_websocket),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),  # realtime.js, as the Flask front serves it
    ]
    handlers = {
        ProtocolError: _protocol_error, AuthError: _auth_error, redis.RedisError: _redis_down,
        HTTPException: _http_error,
    }  # fmt: skip
    app = RelayApp(routes=routes, exception_handlers=handlers, lifespan=front.lifespan)
    app.state.front = front
    return app


def app() -> RelayApp:
    """For `uvicorn --factory sidecar.asgi:app`: the settings from the environment (docs/settings.md)."""
    return create_app(Settings.from_env())


def uvicorn_config(settings: Settings, app: Any = None, **overrides: Any) -> Any:
    """The uvicorn.Config of `sidecar serve --front asgi` (bench/fronts_profile.py measures the same one).

    uvicorn's ProxyHeadersMiddleware (a frame per request, for a stream's whole life) only when uvicorn's own
    FORWARDED_ALLOW_IPS is set: the relay reads neither the client's address nor the scheme it rewrites from
    X-Forwarded-*, and the gevent front reads neither header; set it for code of yours mounted beside the relay."""
    import uvicorn

    from sidecar.asgi.front import stand_ins_fit
    from sidecar.asgi.protocols import HTTPProtocol

    stand_ins_fit()  # the lean stand-ins' check against the installed uvicorn and wsproto, logged if they misfit

    # Our protocols offer the transport to the writer's pass (sidecar/asgi/writer.py). Without deflate the
    # session's keepalive pings go direct too: uvicorn's own ping would be a second one.
    ping = settings.keepalive if settings.ws_deflate else None
    options: dict[str, Any] = dict(
        host=settings.host, port=settings.port, loop="auto", http=HTTPProtocol, ws=ws_protocol(settings),
        ws_max_size=settings.max_frame_bytes, ws_ping_interval=ping, ws_ping_timeout=None,
        ws_per_message_deflate=settings.ws_deflate, proxy_headers="FORWARDED_ALLOW_IPS" in os.environ,
        timeout_keep_alive=int(settings.idle_timeout), backlog=2048, log_config=None, access_log=False,
        lifespan="on",
    )  # fmt: skip
    options.update(overrides)
    return uvicorn.Config(app if app is not None else create_app(settings), **options)


def serve(settings: Settings) -> None:
    """`sidecar serve --front asgi`: the app on uvicorn (uvloop and httptools when installed), with the same
    startup checks and embedded Redis as the gevent front. Production: docs/deployment.md."""
    import uvicorn

    from sidecar.embedded import prepare_to_serve

    settings, embedded = prepare_to_serve(settings, log)
    config = uvicorn_config(settings)
    log.info("sidecar (asgi) listening on http://%s:%d (Redis %s)", settings.host, settings.port, settings.redis_url)
    try:
        uvicorn.Server(config).run()
    finally:
        if embedded is not None:
            embedded.stop()
