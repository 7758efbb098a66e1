"""Our uvicorn HTTP protocols: uvicorn's own (h11 or httptools), offering each request's transport to the app as
the ASGI extension `sidecar.direct` (sidecar/asgi/writer.py), so an SSE stream's frames go to the transport in one
write per turn of the loop instead of one ASGI send per chunk. Extensions are part of the scope, so a relay
mounted in a FastAPI or Starlette app gets it too. Everything else is uvicorn's.

For uvicorn's command line: `--http sidecar.asgi.protocols:HTTPProtocol` (httptools when installed, else h11),
or `:H11Protocol` / `:HttpToolsProtocol` (docs/deployment.md). `sidecar serve --front asgi` uses HTTPProtocol.

Direct chunks leave uvicorn's state as it is: h11's chunked writer and uvicorn's httptools cycle count no body
bytes, so the final `more_body: False` still ends the body with its `0\\r\\n\\r\\n` (tested on both).

They also swap uvicorn's two asyncio.Events of every connection (the cycle's `message_event`, the flow control's
writable event) for LeanEvents (sidecar/asgi/front.py: uvicorn uses their is_set/set/clear/wait only) and
httptools' pipeline deque for a LeanDeque, ~2.2 KB less per idle stream, and call back who asked
(`Outlet.when_lost`) from connection_lost: an SSE stream learns the client left without a task waiting in
receive().
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol as _H11Protocol

from sidecar.asgi.front import LeanDeque, LeanEvent, stand_in
from sidecar.asgi.writer import offer


class _CycleOutlet:
    """One request's transport (sidecar/asgi/writer.py's Outlet), from uvicorn's request-response cycle."""

    __slots__ = ("cycle", "transport", "protocol", "detached")

    def __init__(self, cycle: Any, protocol: Any) -> None:
        self.cycle = cycle
        self.transport: asyncio.WriteTransport = cycle.transport
        self.protocol = protocol
        self.detached = False

    def when_lost(self, callback: Callable[[], None] | None) -> None:
        # On the protocol: one response at a time runs on an HTTP/1.1 connection (a pipelined one waits its turn).
        self.protocol.lost = callback

    def paused(self) -> bool:
        return bool(self.cycle.flow.write_paused)

    async def drained(self) -> None:
        await self.cycle.flow.drain()  # set again by connection_lost too

    def gone(self) -> bool:
        cycle = self.cycle
        if self.detached:  # the cycle says `disconnected` while detached: the connection's own word
            return bool(self.protocol.dropped or self.transport.is_closing())
        return bool(cycle.disconnected or cycle.response_complete or self.transport.is_closing())

    def started(self) -> bool:
        """uvicorn has written the response's head (a middleware wrapping send() may hold it: the body must not
        go to the transport before it)."""
        return bool(self.cycle.response_started)

    def detach(self) -> bool:
        """The app is about to return with the response under way: uvicorn's cycle is told the client left (its
        send() and receive() do nothing, run_asgi ends without finishing the response or closing), so the
        request's task ends while the connection stays open; :meth:`end` finishes the response later. Only once
        uvicorn has written the head: False if a middleware wrapping send() holds it (the app then keeps its task)."""
        cycle = self.cycle
        if not cycle.response_started or cycle.response_complete or self.gone():
            return False
        self.detached = True
        self.cycle.disconnected = True
        asyncio.get_running_loop().call_soon(self._slim)  # once run_asgi is done
        return True

    def _slim(self) -> None:
        """What uvicorn keeps of the request that a detached response never reads again, let go (~1 KB a stream):
        the scope (its headers, state, path) for one with what uvicorn's send() reads of it for a body, the
        protocol's parse state of the request, and the lambda run_asgi's end leaves on the cycle."""
        if not self.detached:  # ended already
            return
        cycle, protocol = self.cycle, self.protocol
        cycle.on_response = _nothing
        scope = cycle.scope
        slim = {"type": "http", "method": scope["method"], "http_version": scope["http_version"], "headers": []}
        cycle.scope = slim
        if getattr(protocol, "scope", None) is scope:  # httptools: replaced at the next request's first byte
            protocol.scope = slim
            if hasattr(protocol, "url"):  # else it is a pipelined request's, maybe half parsed
                protocol.url = b""
        if getattr(protocol, "headers", None) is scope["headers"]:
            protocol.headers = slim["headers"]

    async def end(self) -> None:
        """Finish a detached response as uvicorn would have at the app's last `more_body: False`: the body's end
        (its last chunk), then uvicorn's own keep-alive or close (a server shutting down, an HTTP/1.0 client) and
        the connection's next request. Nothing if the connection is gone."""
        cycle, protocol = self.cycle, self.protocol
        self.detached = False
        if protocol.dropped or self.transport.is_closing() or cycle.response_complete:
            return
        cycle.disconnected = False  # connection_lost sets it again, and send() is then silent
        cycle.on_response = protocol.on_response_complete  # run_asgi's end let go of it
        await cycle.send({"type": "http.response.body", "body": b"", "more_body": False})

    def chunked(self) -> bool:
        raise NotImplementedError

    def streaming(self, direct: bool = True) -> None:
        """The app's next head starts a body of unknown length (no Content-Length): h11 frames it by itself."""


class _H11Outlet(_CycleOutlet):
    __slots__ = ()

    def chunked(self) -> bool:
        """h11 decided the framing with the head: chunked for an HTTP/1.1 client, plain bytes (then close) for
        HTTP/1.0. Read off its writer, the one thing it would frame with."""
        from h11._writers import ChunkedWriter

        return isinstance(getattr(self.cycle.conn, "_writer", None), ChunkedWriter)


class _HttpToolsOutlet(_CycleOutlet):
    __slots__ = ()

    def chunked(self) -> bool:
        return bool(self.cycle.chunked_encoding)

    def streaming(self, direct: bool = True) -> None:
        """uvicorn's httptools cycle would frame it as chunks even for an HTTP/1.0 client, which cannot read them
        (RFC 9112 section 7.1: chunked only for HTTP/1.1). As h11 does: the bytes as they are, ended by the close
        (uvicorn keeps no HTTP/1.0 connection alive). Not `direct` (a middleware holds the head, the body goes
        through uvicorn's send(), which checks unchunked bytes against a Content-Length): uvicorn frames it."""
        if self.cycle.scope["http_version"] == "1.0":
            self.cycle.chunked_encoding = False if direct else None


def _nothing() -> None:
    pass


def _new_cycle(outlet: _CycleOutlet) -> None:
    """A cycle was just made (its task has not run: nothing waits on its event yet, which may be set already)."""
    cycle = outlet.cycle
    stand_in(cycle, "message_event", asyncio.Event, lambda event: LeanEvent(event.is_set()))
    offer(cycle.scope, outlet)


def _lean_flow(flow: Any) -> None:
    stand_in(flow, "_is_writable_event", asyncio.Event, lambda event: LeanEvent(event.is_set()))


def _lost(protocol: Any) -> None:
    protocol.dropped = True
    callback, protocol.lost = protocol.lost, None
    if callback is not None:
        callback()


class H11Protocol(_H11Protocol):
    """uvicorn's h11 protocol with the `sidecar.direct` extension in every request's scope."""

    lost: Callable[[], None] | None = None  # the running response's Outlet.when_lost
    dropped = False  # connection_lost ran

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        _lean_flow(self.flow)

    def handle_events(self) -> None:
        cycle = self.cycle
        super().handle_events()  # makes the request's cycle and schedules its task: the app has not run yet
        if self.cycle is not cycle and self.cycle is not None:
            _new_cycle(_H11Outlet(self.cycle, self))

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        _lost(self)


try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as _HttpToolsProtocol
except ImportError:  # httptools is not installed
    HTTPProtocol: type[asyncio.Protocol] = H11Protocol
else:

    class HttpToolsProtocol(_HttpToolsProtocol):
        """uvicorn's httptools protocol with the `sidecar.direct` extension in every request's scope."""

        lost: Callable[[], None] | None = None  # the running response's Outlet.when_lost
        dropped = False  # connection_lost ran

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            _lean_flow(self.flow)
            stand_in(self, "pipeline", deque, LeanDeque)  # appendleft, pop, truth: empty but when pipelined

        def on_headers_complete(self) -> None:
            cycle = self.cycle
            super().on_headers_complete()  # makes the cycle (a pipelined one waits its turn): the app has not run
            if self.cycle is not cycle and self.cycle is not None:
                _new_cycle(_HttpToolsOutlet(self.cycle, self))

        def connection_lost(self, exc: Exception | None) -> None:
            super().connection_lost(exc)
            _lost(self)

    HTTPProtocol = HttpToolsProtocol
