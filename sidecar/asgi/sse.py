"""The asyncio front's Server-Sent Events: `/sse` (sidecar/asgi/__init__.py)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, runtime_checkable

from sse_starlette import EventSourceResponse
from sse_starlette.sse import SendTimeoutError, _ensure_watcher_started_on_this_loop, _get_shutdown_state
from starlette.requests import Request
from starlette.responses import Response

from sidecar.asgi.front import Front, Wake, cors, front_of, woken
from sidecar.asgi.writer import Outlet, Sink, outlet_of
from sidecar.auth import Auth
from sidecar.control import HOUSEKEEPING
from sidecar.core.connection import SSE, Connection
from sidecar.core.session import (
    Close,
    Session,
    Wait,
    Write,
    busy,
    sse_request,
)
from sidecar.relay import Relay, drive_async

log = logging.getLogger(__name__)

_NO_LOCK = contextlib.nullcontext()  # stateless: one for every stream


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
    session's keepalive Write (the same `:` bytes), and the client leaving wakes the loop: from our protocols'
    connection_lost (`Outlet.when_lost`), or, on the ASGI send path, from one small task awaiting
    receive(). A send that times out, or a stuck write aborted by the stuck check (control.py), ends the stream like
    any disconnect (no traceback)."""

    def __init__(
        self, run: Callable[[_EventStream], Awaitable[None]], wake: Callable[[], None],
        detach: Callable[[Outlet], bool] | None = None, **kw: Any,
    ) -> None:  # fmt: skip
        super().__init__(_Nothing(), ping=0, sep="\n", **kw)
        # Connection is hop-by-hop and the server's to say: sse-starlette's keep-alive went out beside uvicorn's
        # `close` when the client asked for one (and HTTP/1.1 keeps connections alive without it).
        self.raw_headers = [(name, value) for name, value in self.raw_headers if name != b"connection"]
        self._send_lock = _NO_LOCK  # type: ignore[assignment]  # only the session's task sends: no anyio Lock each
        self.run = run
        self.wake = wake
        self.detach = detach  # hands the stream to a _Detached once the head is out: True if it took it
        self.aborted = False
        self._send: Any = None
        self.outlet: Outlet | None = None  # the transport, from our uvicorn protocols (sidecar/asgi/writer.py)

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
        self.outlet = outlet_of(scope)
        if isinstance(self.outlet, Detachable):
            self.outlet.streaming()
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        if isinstance(self.outlet, Detachable) and not self.outlet.started():
            self.outlet.streaming(direct=False)  # before the middleware sends the head on
            self.outlet = None  # a middleware holds the head: the body goes through it too (the ASGI send path)
        if self.outlet is not None and self.detach is not None and self.detach(self.outlet):
            return  # the request's task ends here; the stream goes on without it
        listener: asyncio.Future[None] | None = None
        outlet = self.outlet
        if outlet is not None:  # our HTTP protocols call it back from connection_lost
            outlet.when_lost(self.set)
            if outlet.gone():
                self.set()
        else:  # uvicorn's send() is silent after a disconnect: a task awaits receive() for it
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
            if listener is not None:
                listener.cancel()
            elif outlet is not None:
                outlet.when_lost(None)


async def sse(request: Request) -> Response:
    """Server-Sent Events: `?channel=a&channel=b&mode=diff`, resumed by `Last-Event-ID` (or `last_event_id`)."""
    if request.method == "OPTIONS":
        return cors(request, Response(status_code=200, headers={"Allow": "GET, HEAD, OPTIONS"}))
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
        return cors(request, Response(body, 503, headers={"Retry-After": after}, media_type="application/json"))
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    if request.method == "HEAD":
        return cors(request, Response(headers=headers, media_type="text/event-stream"))
    wake = Wake()
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
    send_timeout = relay.throttle.policy.stuck_timeout + 3 * HOUSEKEEPING

    def detach(outlet: Outlet) -> bool:
        if not isinstance(outlet, Detachable) or front.writer is None or front.ticks is None or not outlet.detach():
            return False
        try:
            _Detached(front, relay, conn, session, outlet, send_timeout).start()
        except BaseException:  # detached but not started: nobody would end it, nor free its admission slot
            log.exception("SSE stream could not go on detached")
            relay.hub.disconnect(conn)
            outlet.transport.close()
            raise
        return True

    response = _EventStream(
        lambda stream: _sse_loop(front, relay, conn, session, wake, stream), wake.set, detach, headers=headers,
        send_timeout=send_timeout,
    )  # fmt: skip
    return cors(request, response)


@runtime_checkable
class Detachable(Outlet, Protocol):
    """An Outlet whose response can outlive the request's task (our uvicorn protocols: sidecar/asgi/protocols.py)."""

    def streaming(self, direct: bool = True) -> None:
        """Called before the head of a body of unknown length: the server frames it as the HTTP version allows
        (`direct`: the body's bytes go to the transport, else through the server's send())."""
        ...

    def started(self) -> bool:
        """The server has written the response's head (not held by a middleware wrapping send())."""
        ...

    def detach(self) -> bool:
        """The app returns with the response under way: the server neither finishes nor closes it (False: the
        head is not out, the response stays the app's)."""
        ...

    async def end(self) -> None:
        """Finish the detached response as the server would at `more_body: False` (nothing if it is gone)."""
        ...


class _Detached:
    """An SSE stream on the direct path once its head is out, with no task of its own: the request's task (and
    the coroutine frames of uvicorn's run_asgi, the dispatch, the response and a session loop) ends, and what
    _sse_loop does is driven by callbacks. The hub's wake marks the connection for the writer's pass, which writes
    the queued frames and calls `wake` when the stream has to look (sidecar/asgi/writer.py); the session's Wait is
    a tick of the front's shared timers (`Front.ticks`: keepalive, token expiry); the client leaving is
    `Outlet.when_lost` from connection_lost; a server shutdown is sse-starlette's watcher calling `set`. What
    awaits gets a task for as long as it lasts: the drain of a paused transport (inside `conn.writing()`, for
    the stuck check), a resync's Redis reads, and the end of the response (uvicorn's last chunk, its keep-alive
    or close)."""

    __slots__ = ("front", "relay", "conn", "session", "outlet", "sink", "send_timeout", "tick", "task", "active",
                 "running", "again", "done")  # fmt: skip

    def __init__(
        self, front: Front, relay: Relay, conn: Connection, session: Session, outlet: Detachable, send_timeout: float
    ) -> None:
        assert front.writer is not None
        self.front, self.relay, self.conn, self.session, self.outlet = front, relay, conn, session, outlet
        self.send_timeout = send_timeout
        self.sink = front.writer.sink(conn, outlet, self.wake, relay.stats.observe_write)
        self.tick: int | None = None  # the Wait's tick on front.ticks
        self.task: asyncio.Future[None] | None = None  # the drain, resync or end under way
        self.active = True  # False: the client left, the server shuts down, the token expired
        self.running = False  # in step()
        self.again = False  # woken while in step()
        self.done = False

    def start(self) -> None:
        outlet = self.outlet
        outlet.when_lost(self.set)
        _ensure_watcher_started_on_this_loop()
        _get_shutdown_state().events.add(self)  # type: ignore[arg-type]
        if outlet.gone():
            self.active = False
        self.step()

    def set(self) -> None:
        """The client left, or the server shuts down (sse-starlette's watcher sets its registered events)."""
        self.active = False
        self.wake()

    def wake(self) -> None:
        if self.running:
            self.again = True
        elif self.task is None and not self.done:  # a task under way steps when it is done
            self._cancel()
            self.step()

    def expired(self) -> None:
        """The Wait's deadline (front.ticks)."""
        self.tick = None
        self.step(fired=True)

    def _cancel(self) -> None:
        if self.tick is not None:
            assert self.front.ticks is not None
            self.front.ticks.remove(self.tick, self)
            self.tick = None

    def step(self, fired: bool = False) -> None:
        """_sse_loop's turn: the session's actions until it waits, or something has to be awaited. Whatever
        raises ends this stream (logged, its connection closed), never leaves it connected with no timer."""
        if self.done:
            return
        session, sink, conn = self.session, self.sink, self.conn
        self.running = True
        try:
            if fired:
                session.timer_fired()
            while self.active:
                if sink.paused:  # flow control: the frames wait in the queue, under its bounds
                    self._await(self._drain())
                    return
                action = session.next(time.time())
                if isinstance(action, Write):
                    sink.write(action.data)
                    if action.frames:
                        self.relay.stats.observe_write(conn)
                elif isinstance(action, Wait):
                    if self.again:  # woken meanwhile: look again
                        self.again = False
                        continue
                    assert self.front.ticks is not None
                    self.tick = self.front.ticks.add(action.deadline - time.time(), self)
                    return
                elif isinstance(action, Close):
                    sink.write(action.data)  # never outlive the token
                    self.active = False
                else:
                    self._await(drive_async(self.relay.resyncing(conn), self.front.runtime))  # type: ignore[arg-type]
                    return
        except Exception:
            log.exception("SSE stream failed")
            self.outlet.transport.close()
            self.active = False
        finally:
            self.running = False
            self.again = False
        try:
            self._finish()
        except Exception:
            log.exception("SSE stream failed")
            self.outlet.transport.close()

    async def _drain(self) -> None:
        conn = self.conn
        # Only here can the stream be stuck (its writes are not awaited): the stuck check's abort ends the drain.
        conn.abort = self.outlet.transport.abort
        try:
            with conn.writing(time.monotonic()):  # a drain that lasts is a stuck peer (control.py)
                await self.sink.drained()
        finally:
            conn.abort = None

    def _await(self, work: Awaitable[None]) -> None:
        self.task = asyncio.ensure_future(work)
        self.task.add_done_callback(self._awaited)

    def _awaited(self, task: asyncio.Future[None]) -> None:
        self.task = None
        if task.cancelled():
            self.active = False
        elif task.exception() is not None:
            log.error("SSE stream failed", exc_info=task.exception())
            self.outlet.transport.close()
            self.active = False
        self.step()

    def _finish(self) -> None:
        """_sse_loop's and _EventStream's ends: the hub lets go, then the response ends as uvicorn ends it."""
        self.done = True
        self._cancel()
        self.sink.close()  # before the end of the body: the pass writes nothing after it
        self.conn.abort = None
        self.relay.hub.disconnect(self.conn)
        _get_shutdown_state().events.discard(self)
        self.outlet.when_lost(None)
        if not self.outlet.gone():
            self.task = asyncio.ensure_future(self._end())

    async def _end(self) -> None:
        try:
            async with asyncio.timeout(self.send_timeout):  # a backstop, as the send path's send timeout
                await self.outlet.end()
        except (TimeoutError, OSError):
            self.outlet.transport.close()
        except Exception:  # the body cannot be ended: the close ends it, never a client left hanging
            if not self.outlet.gone():  # else uvloop's write to a handle closed meanwhile: nothing to say
                log.exception("SSE stream failed at its end")
            self.outlet.transport.close()
        finally:
            self.task = None


async def _sse_loop(
    front: Front, relay: Relay, conn: Connection, session: Session, wake: Wake, stream: _EventStream
) -> None:
    """The SSE connection's loop: the Session's actions carried out as the response's chunks, the keepalive
    included (as on the gevent front), until the client leaves (`stream.active`). With our protocols' transport
    (sidecar/asgi/protocols.py) the writer's pass writes the queued frames and this loop the rest, directly;
    otherwise every chunk is an ASGI send."""
    task = asyncio.current_task()
    assert task is not None
    sink: Sink | None = None
    if stream.outlet is not None and front.writer is not None:  # the head is out: the body is ours to frame
        sink = front.writer.sink(conn, stream.outlet, wake.set, relay.stats.observe_write)
        conn.abort = stream.outlet.transport.abort  # a stuck write: the drain ends, as a disconnect
    else:
        conn.abort = lambda: stream.abort(task)  # a stuck write (control.py)
    try:
        while stream.active:
            if sink is not None and sink.paused:  # flow control: the frames wait in the queue, under its bounds
                with conn.writing(time.monotonic()):  # a drain that lasts is a stuck peer (control.py)
                    await sink.drained()
                continue
            action = session.next(time.time())
            if isinstance(action, Write):
                if sink is not None:
                    sink.write(action.data)
                elif action.data:
                    with conn.writing(time.monotonic()):  # resumed once the chunk is sent
                        await stream.write(action.data)
                if action.frames:
                    relay.stats.observe_write(conn)
            elif isinstance(action, Wait):
                if not await woken(wake, action.deadline - time.time()):
                    session.timer_fired()
                wake.clear()
            elif isinstance(action, Close):
                if sink is not None:
                    sink.write(action.data)  # never outlive the token
                elif action.data:
                    await stream.write(action.data)
                return
            else:
                await drive_async(relay.resyncing(conn), front.runtime)  # type: ignore[arg-type]
    finally:
        if sink is not None:
            sink.close()  # before the end of the body: the pass writes nothing after it
        conn.abort = None
        relay.hub.disconnect(conn)
