"""A deadline on request bodies, for both WSGI servers (gevent.pywsgi and gunicorn's gevent worker).

A client that sends its body slowly, or not at all, holds a greenlet and a descriptor for as long as it likes;
with a deadline it gets a 408 and its connection is closed. (The request head has its own deadline, set where
each server reads it: sidecar/serve.py, sidecar/gunicorn.conf.py.)
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import gevent
from werkzeug.exceptions import RequestTimeout

from sidecar.writer import request_socket

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


class BodyTimeout(RequestTimeout):
    description = "the request body did not arrive in time"

    def get_headers(self, *args: Any, **kwargs: Any) -> list[tuple[str, str]]:
        return [*super().get_headers(*args, **kwargs), ("Connection", "close")]  # the rest is never read


class DeadlineInput:
    """`wsgi.input`, each read bounded by what is left of the body's deadline."""

    def __init__(self, stream: Any, deadline: float, environ: dict[str, Any]) -> None:
        self.stream = stream
        self.deadline = deadline
        self.environ = environ

    @property
    def rfile(self) -> Any:
        return getattr(self.stream, "rfile", None)

    def read(self, *args: Any) -> bytes:
        return self._bounded(self.stream.read, *args)

    def readline(self, *args: Any) -> bytes:
        return self._bounded(self.stream.readline, *args)

    def readlines(self, *args: Any) -> list[bytes]:
        return self._bounded(self.stream.readlines, *args)

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.readline, b"")

    def _bounded(self, read: Callable[..., Any], *args: Any) -> Any:
        left = self.deadline - time.monotonic()
        if left <= 0:
            self._expire()
        timer = gevent.Timeout(left)
        timer.start()
        try:
            return read(*args)
        except gevent.Timeout as exc:
            if exc is not timer:
                raise
            self._expire()
        finally:
            timer.close()

    def _expire(self) -> None:
        # The server must not read the rest after our answer (gevent.pywsgi would, to reach a next request):
        # shut the socket's read side, so that it finds the end of the stream at once.
        sock = request_socket(self.environ)
        if sock is not None:
            with contextlib.suppress(OSError):
                getattr(sock, "_sock", sock).shutdown(socket.SHUT_RD)
        raise BodyTimeout()


def body_deadline(app: WSGIApp, seconds: float) -> WSGIApp:
    """WSGI middleware: a request's body must arrive whole within `seconds` of its headers, or the request gets
    408 `request-timeout` (from the app's error handler) and its connection is closed."""

    def middleware(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        chunked = "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower()
        if chunked or environ.get("CONTENT_LENGTH", "") not in ("", "0"):
            environ["wsgi.input"] = DeadlineInput(environ["wsgi.input"], time.monotonic() + seconds, environ)
        return app(environ, start_response)

    return middleware
