"""What the asyncio front's routes share: the app's Front (its relay, started in the lifespan or at the first
request), error answers, CORS, bodies, and a connection's wake-up (sidecar/asgi/__init__.py)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

from starlette.requests import HTTPConnection, Request
from starlette.responses import Response

from sidecar.asgi.writer import Writer
from sidecar.auth import Auth, Grant, presented_token
from sidecar.config import Settings
from sidecar.core.http_api import Refusal, cors_headers, too_large
from sidecar.core.protocol import error_body
from sidecar.publish import Publisher
from sidecar.relay import Relay
from sidecar.runtime import AsyncioRuntime
from sidecar.state_cache import Pulled

log = logging.getLogger(__name__)


Authorize = Callable[[HTTPConnection], Grant | None | Awaitable[Grant | None]]
_FAILED = object()




class Front:
    """One app's relay and what its routes share; the relay starts in the lifespan or at the first request."""

    def __init__(self, settings: Settings, authorize: Authorize | None) -> None:
        self.settings = settings
        self.authorize = authorize
        self.auth = Auth(settings)
        self.relay: Relay | None = None
        self.runtime: AsyncioRuntime | None = None
        self.publisher: Publisher | None = None
        self.writer: Writer | None = None  # the direct writes' pass, on the hub's loop (sidecar/asgi/writer.py)
        self.ticks: Ticks | None = None  # the detached SSE streams' timers (sidecar/asgi/sse.py)
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
                self.writer = Writer(loop)
                self.ticks = Ticks(loop)
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


def canceller(task: asyncio.Task[Any] | None) -> Callable[[], None] | None:
    if task is None:
        return None

    def cancel() -> None:
        task.cancel()

    return cancel


def front_of(conn: HTTPConnection) -> Front:
    return conn.app.state.front


def error(status: int, code: str, message: str, **headers: str) -> Response:
    return Response(error_body(code, message), status, headers=headers, media_type="application/json")


def cors(request: Request, response: Response) -> Response:
    """CORS for the browser-facing reads, as the Flask front (allowlist: SIDECAR_CORS_ORIGINS)."""
    response.headers.append("Vary", "Origin")
    allow = front_of(request).auth.cors_origin(request.headers.get("origin"))
    for name, value in cors_headers(allow, preflight=request.method == "OPTIONS"):
        response.headers[name] = value
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


def oversized(limit: int) -> Response:
    return answer(too_large(limit))


class Wake:
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

    def expired(self) -> None:
        """Its deadline on the front's Ticks: the wait ends, not woken (the flag stays as it is)."""
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self) -> None:
        if self.flag:
            return
        self.waiter = asyncio.get_running_loop().create_future()
        try:
            await self.waiter
        finally:
            self.waiter = None


async def woken(wake: Wake, timeout: float, ticks: Ticks | None = None) -> bool:
    """Wait for `wake` up to `timeout` seconds: True if woken. In the connection's own task, with its deadline on
    the front's shared `ticks` (else one timer handle: wait_for makes one more task per wait, asyncio.timeout a
    context manager and its handle, memory for every idle connection)."""
    if wake.flag:
        return True
    loop = asyncio.get_running_loop()
    waiter = wake.waiter = loop.create_future()
    if ticks is not None:
        tick = ticks.add(timeout, wake)
        try:
            await waiter
        finally:
            ticks.remove(tick, wake)
            wake.waiter = None
        return wake.flag
    timer = loop.call_later(max(0.0, timeout), _expire, waiter)
    try:
        await waiter
    finally:
        timer.cancel()
        wake.waiter = None
    return wake.flag


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class Ticks:
    """Many connections' deadlines on a few of the loop's timers: each deadline goes in the set of its tick (the
    next multiple of TICK seconds: never early, at most TICK late) and a tick in use is one `loop.call_at`. An idle
    stream's timer handle of its own (uvloop's, with its libuv timer and context) is ~0.65 KB; an entry here is a
    set's slot. `tick.expired()` is called at its tick unless :meth:`remove` came first."""

    TICK = 0.05

    __slots__ = ("loop", "due")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.due: dict[int, set[Any]] = {}

    def add(self, delay: float, sleeper: Any) -> int:
        """`sleeper.expired()` in `delay` seconds (rounded up to the tick): the tick, for :meth:`remove`."""
        tick = -int(-(self.loop.time() + max(0.0, delay)) // self.TICK)
        sleepers = self.due.get(tick)
        if sleepers is None:
            sleepers = self.due[tick] = set()
            self.loop.call_at(tick * self.TICK, self._fire, tick)
        sleepers.add(sleeper)
        return tick

    def remove(self, tick: int, sleeper: Any) -> None:
        sleepers = self.due.get(tick)
        if sleepers is not None:
            sleepers.discard(sleeper)

    def _fire(self, tick: int) -> None:
        for sleeper in self.due.pop(tick, ()):
            try:
                sleeper.expired()
            except Exception:  # that connection's own failure: the others of this tick still expire
                log.exception("a connection's timer failed")


class LeanEvent:
    """asyncio.Event's is_set/set/clear/wait for uvicorn's per-connection events (the HTTP cycle's message_event
    and flow control's writable event, the WebSocket's `writable`), with its waiters' list made only while
    someone waits: asyncio.Event keeps a deque, ~0.8 KB, for every idle connection."""

    __slots__ = ("_flag", "_waiters")

    def __init__(self, flag: bool = False) -> None:
        self._flag = flag
        self._waiters: list[asyncio.Future[None]] | None = None

    def is_set(self) -> bool:
        return self._flag

    def set(self) -> None:
        if not self._flag:
            self._flag = True
            for waiter in self._waiters or ():
                if not waiter.done():
                    waiter.set_result(None)

    def clear(self) -> None:
        self._flag = False

    async def wait(self) -> bool:
        if self._flag:
            return True
        waiter = asyncio.get_running_loop().create_future()
        if self._waiters is None:
            self._waiters = []
        self._waiters.append(waiter)
        try:
            await waiter
        finally:  # woken or cancelled: a cancelled waiter's future is not kept
            self._waiters.remove(waiter)
            if not self._waiters:
                self._waiters = None
        return True


class LeanQueue:
    """asyncio.Queue's put_nowait/get/empty/qsize for uvicorn's WebSocket queue: a list and one waiter
    (asyncio.Queue keeps three deques, ~3.3 KB, for every idle socket). One consumer: the app's receive()."""

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: list[Any] = []
        self._waiter: asyncio.Future[None] | None = None

    def put_nowait(self, item: Any) -> None:
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def empty(self) -> bool:
        return not self._items

    def qsize(self) -> int:
        return len(self._items)

    async def get(self) -> Any:
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._items.pop(0)


class LeanDeque(list[Any]):
    """deque's append/appendleft/pop/popleft on a list, for uvicorn's and wsproto's per-connection deques that
    hold nothing or an event or two: an empty deque is ~0.8 KB, an empty list 56 bytes."""

    __slots__ = ()

    def appendleft(self, item: Any) -> None:
        self.insert(0, item)

    def popleft(self) -> Any:
        return self.pop(0)


class _HandshakeDone:
    """What wsproto's WSConnection asks of its handshake once the connection is open: its pending events (none)."""

    __slots__ = ()

    def events(self) -> Iterator[Any]:
        return iter(())


HANDSHAKE_DONE = _HandshakeDone()


# -- the stand-ins' fit to the uvicorn and wsproto installed ------------------------------------------------------
_fits: bool | None = None  # the startup check's verdict, once per process
_misfits: set[str] = set()  # the attributes already warned about


def stand_in_problems() -> list[str]:
    """What of uvicorn's and wsproto's internals the lean stand-ins replace is missing or not as expected (empty:
    all fit), checked on objects built here, no I/O. The instances' own attributes are checked again where they
    are replaced (:func:`stand_in`)."""
    import inspect

    problems = []
    from uvicorn.protocols.http import h11_impl
    from uvicorn.protocols.http.flow_control import FlowControl

    if type(getattr(FlowControl(None), "_is_writable_event", None)) is not asyncio.Event:  # type: ignore[arg-type]
        problems.append("uvicorn FlowControl._is_writable_event is not an asyncio.Event")
    cycles: list[type] = [h11_impl.RequestResponseCycle]
    with contextlib.suppress(ImportError):
        from uvicorn.protocols.http import httptools_impl

        cycles.append(httptools_impl.RequestResponseCycle)
    for cycle in cycles:
        if "message_event" not in inspect.signature(cycle).parameters:
            problems.append(f"{cycle.__module__}.RequestResponseCycle takes no message_event")
    try:
        _wsproto_after_handshake()
    except Exception as exc:  # any shape of failure: the stand-ins do not fit this wsproto
        problems.append(f"wsproto without its handshake: {type(exc).__name__}: {exc}")
    return problems


def _wsproto_after_handshake() -> None:
    """A server WSConnection, its handshake replaced once open and its event deque a LeanDeque (sidecar/asgi/ws.py),
    still reads a client's text frame and ping."""
    from collections import deque

    from wsproto import ConnectionType, WSConnection
    from wsproto.events import AcceptConnection, Ping, Request, TextMessage

    client, server = WSConnection(ConnectionType.CLIENT), WSConnection(ConnectionType.SERVER)
    server.receive_data(client.send(Request(host="localhost", target="/ws")))
    request = next(server.events())
    assert isinstance(request, Request), request
    client.receive_data(server.send(AcceptConnection()))
    assert isinstance(next(client.events()), AcceptConnection)
    assert server.connection is not None and hasattr(server, "handshake")
    assert type(server.connection._events) is deque, type(server.connection._events)
    server.handshake = HANDSHAKE_DONE  # type: ignore[assignment]
    server.connection._events = LeanDeque(server.connection._events)  # type: ignore[assignment]
    server.receive_data(client.send(TextMessage("fit")) + client.send(Ping(b"p")))
    events = list(server.events())
    assert [type(e) for e in events] == [TextMessage, Ping], events
    assert isinstance(events[0], TextMessage) and events[0].data == "fit", events


def stand_ins_fit() -> bool:
    """The startup check's verdict (made at the first call: a server's first connection); a misfit is logged once."""
    global _fits
    if _fits is None:
        try:
            problems = stand_in_problems()
        except Exception as exc:  # the check itself no longer fits the libraries: neither do the stand-ins
            problems = [f"the check failed: {type(exc).__name__}: {exc}"]
        _fits = not problems
        if problems:
            log.warning("uvicorn/wsproto internals are not as sidecar's lean stand-ins expect (%s): running with "
                        "their own objects, more memory per connection", "; ".join(problems))  # fmt: skip
    return _fits


def stand_in(owner: Any, name: str, expected: type, lean: Callable[[Any], Any]) -> None:
    """`owner.name`, one of uvicorn's or wsproto's per-connection objects, replaced by `lean(it)` if it is an
    `expected` and the startup check passed; else left as it is (logged once per attribute)."""
    old = getattr(owner, name, None)
    if type(old) is expected and stand_ins_fit():
        setattr(owner, name, lean(old))
    elif _fits and name not in _misfits:
        _misfits.add(name)
        log.warning("%s.%s is a %s, not the %s sidecar's stand-in replaces: left as it is", type(owner).__name__,
                    name, type(old).__name__, expected.__name__)  # fmt: skip
