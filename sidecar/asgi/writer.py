"""Direct writes on the asyncio front: what sidecar/writer.py does on gevent, on the event loop.

Per message per socket, the ASGI send path costs a task wakeup, Starlette's send wrappers, sse-starlette's
per-chunk cancel scope and uvicorn's framing (docs/performance.md). So once a stream is under way its
connection's `wake` marks it instead, and ONE `loop.call_soon` callback per turn of the loop drains every marked
connection and writes its frames to its transport in one write: for SSE framed as one HTTP/1.1 chunk, exactly
the bytes uvicorn would have framed; for a WebSocket the frames as the hub built them. The connection's task
wakes only for what needs it: the transport paused (flow control: the task awaits the drain inside
`conn.writing()`, so the stuck check in sidecar/control.py closes a consumer that stopped reading, and the
frames wait in the connection's queue meanwhile, under its slow-consumer bounds), a resync (it reads Redis),
its keepalive, its token's expiry, a WebSocket's client frames, the client leaving.

The transport comes from our uvicorn protocols (sidecar/asgi/protocols.py, sidecar/asgi/ws.py) as the ASGI
extension `DIRECT`; without it (another server, permessage-deflate on) the routes keep the ASGI send path.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Protocol

from sidecar.core.connection import Connection

DIRECT = "sidecar.direct"  # the ASGI extension: scope["extensions"][DIRECT]["outlet"] is the connection's Outlet


class Outlet(Protocol):
    """A connection's transport as our protocols offer it (sidecar/asgi/protocols.py, sidecar/asgi/ws.py)."""

    transport: asyncio.WriteTransport

    def chunked(self) -> bool:
        """Body bytes go as HTTP/1.1 chunks (asked once the response's head is sent; False for a WebSocket)."""
        ...

    def paused(self) -> bool:
        """The transport's buffer is over its high-water mark (asyncio's pause_writing)."""
        ...

    async def drained(self) -> None:
        """Until the transport takes more (or the connection is lost)."""
        ...

    def gone(self) -> bool:
        """Nothing may be written any more: the peer left, the response or the WebSocket is closed."""
        ...

    def when_lost(self, callback: Callable[[], None] | None) -> None:
        """`callback()` once when the connection is lost (None: no more). HTTP only: a WebSocket's app sees the
        client leave in its receive()."""
        ...


def offer(scope: Any, outlet: Outlet) -> None:
    """Put `outlet` in the scope as the DIRECT extension (an extension's value is a dict: the ASGI spec)."""
    scope.setdefault("extensions", {})[DIRECT] = {"outlet": outlet}


def outlet_of(scope: Any) -> Outlet | None:
    """The connection's Outlet if the server offers one (our uvicorn protocols), else None: the ASGI send path."""
    return (scope.get("extensions") or {}).get(DIRECT, {}).get("outlet")


class Sink:
    """Who writes one connection's transport once its stream is under way (:meth:`Writer.sink`): the writer's pass
    for queued frames, and the connection's task, synchronously, for what it writes itself (a keepalive, a resync's
    frames, the last frame before a close). Both run on the loop and neither awaits between taking frames from
    the queue and writing them, so writes never interleave or reorder. After :meth:`close` the pass writes
    nothing more (a WebSocket's close frame must be the last thing sent)."""

    __slots__ = ("writer", "conn", "outlet", "transport", "chunked", "wake_owner", "on_write", "closed")

    def __init__(
        self, writer: Writer, conn: Connection, outlet: Outlet, wake_owner: Callable[[], None],
        on_write: Callable[[list[Connection]], None],
    ) -> None:  # fmt: skip
        self.writer = writer
        self.conn = conn
        self.outlet = outlet
        self.transport = outlet.transport
        self.chunked = outlet.chunked()
        self.wake_owner = wake_owner  # wakes the connection's task
        self.on_write = on_write
        self.closed = False
        conn.wake = self.wake  # from now on the hub's wake marks the connection for the pass

    def wake(self) -> None:
        if not self.closed:  # marked for the next pass (the Writer's own work, inline: once per delivery)
            writer = self.writer
            writer.marked.append(self)
            if not writer.scheduled:
                writer.scheduled = True
                writer.loop.call_soon(writer.flush)

    @property
    def paused(self) -> bool:
        return self.outlet.paused() and not self.outlet.gone()

    async def drained(self) -> None:
        await self.outlet.drained()

    def frame(self, data: bytes) -> bytes:
        return self.writer.chunk(data) if self.chunked else data

    def write(self, data: bytes) -> None:
        """From the connection's task: `data` to the transport now (nothing once the peer is gone)."""
        if data and not self.closed and not self.outlet.gone():
            self.transport.write(self.frame(data))

    def close(self) -> None:
        """The task is done with the transport: the pass writes nothing more, the hub wakes the task again."""
        self.closed = True
        self.conn.wake = self.wake_owner


class Writer:
    """The pass that writes every marked connection, one per event loop (the hub's: sidecar/asgi/front.py)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.marked: list[Sink] = []
        self.scheduled = False
        self._chunk_in = b""  # the last frame framed as a chunk, and its chunk: a frame shared by many
        self._chunk_out = b""  # connections is framed once, like the frame itself (sidecar/core/hub.py)

    def chunk(self, data: bytes) -> bytes:
        """`data` as one HTTP/1.1 chunk (RFC 9112 section 7.1), the bytes h11 and uvicorn's httptools protocol
        write for a body message (never an empty chunk: that is the end of the body)."""
        if not data:
            return data
        if data is not self._chunk_in:
            self._chunk_in, self._chunk_out = data, b"%x\r\n%s\r\n" % (len(data), data)
        return self._chunk_out

    def sink(
        self, conn: Connection, outlet: Outlet, wake_owner: Callable[[], None],
        on_write: Callable[[list[Connection]], None],
    ) -> Sink:  # fmt: skip
        """The one :class:`Sink` of `conn`: from now on the pass writes its queued frames, and tells `on_write`
        (the stats: sidecar/stats.py) what it wrote, once per pass, every connection it wrote in a list."""
        return Sink(self, conn, outlet, wake_owner, on_write)

    def flush(self) -> None:
        self.scheduled = False
        marked, self.marked = self.marked, []
        chunk = self.chunk
        observe: Callable[[list[Connection]], None] | None = None  # the written connections' stats, once per pass
        written: list[Connection] = []
        for sink in marked:
            if sink.closed:
                continue
            conn, outlet = sink.conn, sink.outlet
            if conn.resync or conn.writing_since is not None or outlet.paused() or outlet.gone():
                sink.wake_owner()  # its task has to act (or is waiting for the drain): it writes after that
                continue
            frames = conn.drain()
            if not frames:
                sink.wake_owner()  # woken for something else than frames: let the task look
                continue
            data: Any = frames[0] if len(frames) == 1 else b"".join(frames)
            if sink.chunked:
                data = self._chunk_out if data is self._chunk_in else chunk(data)
            sink.transport.write(data)
            if sink.on_write != observe:  # one stats per relay; a process may hold several (tests)
                if observe is not None:
                    observe(written)
                observe, written = sink.on_write, []
            written.append(conn)
        if observe is not None:
            observe(written)
