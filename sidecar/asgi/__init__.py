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

import logging
from pathlib import Path

import orjson
import redis
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles

from sidecar.asgi.front import Authorize, Front, answer, cors, error, front_of, oversized, read_body
from sidecar.asgi.sse import sse
from sidecar.asgi.ws import FRAMES, WSProtocol, not_websocket, websocket
from sidecar.auth import Auth, AuthError, bearer
from sidecar.config import Settings
from sidecar.core.http_api import UNAVAILABLE, publish_items
from sidecar.core.protocol import ProtocolError, dumps, loads_exact, validate_channel
from sidecar.stats import CONTENT_TYPE_LATEST, exposition

log = logging.getLogger(__name__)

__all__ = ["FRAMES", "Authorize", "Front", "WSProtocol", "app", "create_app", "serve"]

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
        return cors(request, Response(status_code=200))
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
    front.auth.require_admin(bearer(request.headers.get("authorization")))
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
        from sidecar.core.throttle import PolicyError

        try:
            control.applied(*await front.read(control.store_policy, doc))
        except PolicyError as exc:
            return error(400, "bad-policy", str(exc))
    return Response(orjson.dumps(control.describe()), media_type="application/json")


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
        Route("/ws", not_websocket),
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


def serve(settings: Settings) -> None:
    """`sidecar serve --front asgi`: the app on uvicorn (uvloop and httptools when installed), with the same
    startup checks and embedded Redis as the gevent front. Production: docs/deployment.md."""
    import uvicorn

    from sidecar.asgi.protocols import HTTPProtocol
    from sidecar.embedded import prepare_to_serve

    settings, embedded = prepare_to_serve(settings, log)
    # Our protocols offer the transport to the writer's pass (sidecar/asgi/writer.py). Without deflate the
    # session's keepalive pings go direct too: uvicorn's own ping would be a second one.
    ping = settings.keepalive if settings.ws_deflate else None
    config = uvicorn.Config(
        create_app(settings), host=settings.host, port=settings.port, loop="auto", http=HTTPProtocol, ws=WSProtocol,
        ws_max_size=settings.max_frame_bytes, ws_ping_interval=ping, ws_ping_timeout=None,
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
