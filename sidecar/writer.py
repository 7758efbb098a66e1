"""Direct writes: every connection's queued frames reach its socket in one pass per turn of the event loop.

Waking one greenlet per connection and writing through the WSGI server costs about twice the send(2) itself,
per connection and per batch (docs/performance.md). So once a stream is under way, its connection's `wake`
marks it for the next pass instead: one loop callback drains every marked connection and writes its frames
with a single non-blocking write each (for SSE, framed as one HTTP/1.1 chunk, exactly as the WSGI server
frames what the stream yields). The connection's greenlet wakes only for what needs it: the rest of a write
the socket could not take at once (a slow reader), a resync (it reads Redis), its keepalives and, for a
WebSocket, its client's frames.

Only for gevent sockets (non-blocking file descriptors); anything else keeps the greenlet path.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Callable, Mapping
from typing import Any

import gevent

from sidecar.core.connection import Connection


class Sink:
    """Who writes one connection's socket, built once per connection by its front (:meth:`Writer.sink`).

    Direct (a gevent socket): the :class:`Writer` pass writes queued frames, and the connection's greenlet
    writes what the pass could not finish (`pending`). Otherwise the greenlet writes everything, through
    `send` (a WebSocket's socket) or, when `send` is None, into `out` for the WSGI server (an SSE response's
    body). Whoever writes holds `conn.writing()`, so writes never interleave. After :meth:`close` the pass
    writes nothing more (a WebSocket's close frame must be the last thing sent)."""

    __slots__ = ("writer", "conn", "sock", "direct", "chunked", "wake_owner", "on_write", "send", "pending",
                 "broken", "closed", "out")  # fmt: skip

    def __init__(
        self, writer: Writer, conn: Connection, sock: socket.socket | None, direct: bool, chunked: bool,
        wake_owner: Callable[[], None], on_write: Callable[[list[Connection]], None],
        send: Callable[[bytes], Any] | None,
    ) -> None:  # fmt: skip
        self.writer = writer
        self.conn = conn
        # The socket object, not its number: a closed socket's number may be a new client's. Never None if direct.
        self.sock: Any = sock
        self.direct = direct
        self.chunked = chunked
        self.wake_owner = wake_owner  # wakes the connection's greenlet
        self.on_write = on_write
        self.send = send
        self.pending = b""  # the rest of a write the socket did not take; goes out before anything else
        self.broken = False  # a write failed: the peer is gone
        self.closed = False
        self.out = b""  # what the WSGI server is to write next (not direct, no `send`)
        conn.wake = self.wake if direct else wake_owner  # the only place a connection's wake is set after connect
        if sock is not None:
            conn.abort = self.abort

    @property
    def owed(self) -> bool:
        """The greenlet has a write to finish (or to fail: the peer is gone)."""
        return bool(self.pending) or self.broken

    def wake(self) -> None:
        """The connection's `wake` when direct (the hub calls it when frames are queued or it needs a resync)."""
        if not self.closed:  # marked for the next pass (the Writer's own work, inline: once per delivery)
            writer = self.writer
            writer.marked.append(self)
            if not writer.scheduled:
                writer.scheduled = True
                gevent.get_hub().loop.run_callback(writer.flush)

    def frame(self, data: bytes) -> bytes:
        return self.writer.chunk(data) if self.chunked and data else data

    def write(self, data: bytes) -> None:
        """From the connection's greenlet: write what is pending, then `data`, waiting (cooperatively) while the
        socket is full. Raises OSError when the peer is gone or the socket was closed meanwhile."""
        if not self.direct:
            if self.send is None:
                self.out = data
            elif data:
                self.send(data)
            return
        if self.broken:
            raise BrokenPipeError("the peer is gone")
        data = self.frame(data)
        data = self.pending + data if self.pending else data
        self.pending = b""
        self.sock.sendall(data)

    def take(self) -> bytes:
        """What :meth:`write` left for the WSGI server to write (empty when direct)."""
        out, self.out = self.out, b""
        return out

    def abort(self) -> None:
        """End the socket from outside, for a connection stuck in a write (control.py). The OS socket under
        gevent's: the greenlet blocked in sendall then wakes to EPIPE, an ordinary disconnect (gevent's own
        shutdown() would cancel it with EBADF, which the WSGI server logs as a failure)."""
        with contextlib.suppress(AttributeError, OSError):
            getattr(self.sock, "_sock", self.sock).shutdown(socket.SHUT_RDWR)  # the peer gets what was sent

    def close(self) -> None:
        """The greenlet is done with the socket: nothing is written through this sink any more."""
        self.closed = True


class Writer:
    """The per-process pass that writes every marked connection (see the module docstring)."""

    def __init__(self) -> None:
        self.marked: list[Sink] = []
        self.scheduled = False
        self._chunk_in = b""  # the last frame framed as a chunk, and its chunk: a frame shared by many
        self._chunk_out = b""  # connections is framed once, like the frame itself (sidecar/core/hub.py)

    def chunk(self, data: bytes) -> bytes:
        """`data` as one HTTP/1.1 chunk (RFC 9112 section 7.1)."""
        if data is not self._chunk_in:
            self._chunk_in, self._chunk_out = data, b"%x\r\n%s\r\n" % (len(data), data)
        return self._chunk_out

    def sink(
        self, conn: Connection, sock: socket.socket | None, wake_owner: Callable[[], None],
        on_write: Callable[[list[Connection]], None], *, chunked: bool = False,
        send: Callable[[bytes], Any] | None = None, direct: bool = True,
    ) -> Sink:  # fmt: skip
        """The one :class:`Sink` of `conn`, from now on what writes its socket: the pass, if `direct` and `sock`
        is a gevent socket (its descriptor non-blocking); else its greenlet, through `send` (None: the WSGI
        server, see :meth:`Sink.take`). `chunked`: frame direct writes as HTTP/1.1 chunks. The pass tells `on_write`
        (the stats: sidecar/stats.py) what it wrote, once per pass, every connection it wrote in a list."""
        direct = direct and _nonblocking(sock)
        return Sink(self, conn, sock, direct, chunked, wake_owner, on_write, send)

    def watch(self, sock: socket.socket | None, on_gone: Callable[[], None]) -> PeerWatch | None:
        """A :class:`PeerWatch` on `sock`, or None unless it is a gevent socket (nothing to watch it with)."""
        if not _nonblocking(sock):
            return None
        assert sock is not None
        return PeerWatch(sock, on_gone)

    def flush(self) -> None:
        self.scheduled = False
        marked, self.marked = self.marked, []
        observe: Callable[[list[Connection]], None] | None = None  # the written connections' stats, once per pass
        written: list[Connection] = []
        for direct in marked:
            if direct.closed:
                continue
            conn = direct.conn
            if direct.pending or direct.broken or conn.resync or conn.writing_since is not None:
                direct.wake_owner()  # its greenlet is writing, or has to: it drains after that
                continue
            frames = conn.drain()
            if not frames:
                direct.wake_owner()  # woken for something else than frames: let the greenlet look
                continue
            data = frames[0] if len(frames) == 1 else b"".join(frames)
            if direct.chunked and data:
                data = self._chunk_out if data is self._chunk_in else self.chunk(data)
            try:
                n = os.write(direct.sock.fileno(), data)  # fileno() is -1 once the socket is closed: EBADF
            except BlockingIOError:
                n = 0
            except OSError:
                direct.broken = True
                direct.wake_owner()
                continue
            if direct.on_write != observe:  # one stats per relay; a process may hold several (tests)
                if observe is not None:
                    observe(written)
                observe, written = direct.on_write, []
            written.append(conn)
            if n < len(data):
                direct.pending = data[n:]
                direct.wake_owner()
        if observe is not None:
            observe(written)


writer = Writer()  # one per process: the gevent hub's loop runs its pass


def _nonblocking(sock: socket.socket | None) -> bool:
    if sock is None:
        return False
    fd = sock.fileno()
    return fd >= 0 and not os.get_blocking(fd)


class PeerWatch:
    """Learns at once that a stream's client left, instead of at the next write (up to a keepalive later): a read
    watch on its socket. An SSE client sends nothing after its request, so a readable socket is the end of the
    stream or a reset; anything else (bytes it should not send) ends the watch, and the next write decides."""

    def __init__(self, sock: socket.socket, on_gone: Callable[[], None]) -> None:
        self.sock = getattr(sock, "_sock", sock)  # the OS socket: a peek must not wait
        self.on_gone = on_gone
        self.gone = False
        self.watcher = gevent.get_hub().loop.io(sock.fileno(), 1)  # 1: readable
        self.watcher.start(self._readable)

    def _readable(self) -> None:
        try:
            peeked = self.sock.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            return
        except OSError:
            peeked = b""  # reset by the peer
        self.stop()
        if not peeked:
            self.gone = True
            self.on_gone()

    def stop(self) -> None:
        """Before the socket is closed: a watcher must not outlive its descriptor."""
        self.watcher.stop()
        self.watcher.close()


def drop_read_buffer(environ: Mapping[str, Any]) -> None:
    """Give back the 8 KB read buffer gevent.pywsgi keeps per connection for its next request: a stream never
    reads through it again (a WebSocket reads its own socket) and its connection ends with it. pywsgi stops at
    a closed rfile instead of reading a next request."""
    if str(environ.get("SERVER_SOFTWARE", "")).startswith("gevent"):
        stream: Any = environ.get("wsgi.input")
        with contextlib.suppress(AttributeError, OSError):
            getattr(stream, "rfile", stream).close()


def request_socket(environ: Mapping[str, Any]) -> socket.socket | None:
    """The client socket of a WSGI request under gevent.pywsgi or gunicorn, else None (take it before
    :func:`drop_read_buffer`, which lets go of pywsgi's reference)."""
    sock = environ.get("gunicorn.socket")
    if sock is None:
        rfile = getattr(environ.get("wsgi.input"), "rfile", None)
        sock = getattr(getattr(rfile, "raw", None), "_sock", None)
    return sock if isinstance(sock, socket.socket) else None
