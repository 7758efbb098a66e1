"""`sidecar serve`: the relay on gevent.pywsgi. Import this module first: it patches the standard library."""

from gevent import monkey

monkey.patch_all()

import contextlib  # noqa: E402
import http.client  # noqa: E402
import logging  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
from typing import Any  # noqa: E402

import gevent  # noqa: E402
import orjson  # noqa: E402
from flask import Flask  # noqa: E402
from gevent.pywsgi import WSGIHandler, WSGIServer, _InvalidClientInput  # noqa: E402

from sidecar.app import create_app  # noqa: E402
from sidecar.config import Settings  # noqa: E402
from sidecar.deadlines import body_deadline  # noqa: E402
from sidecar.embedded import prepare_to_serve  # noqa: E402

log = logging.getLogger("sidecar")


class HeadTimeout(OSError):
    """The request line and headers did not arrive in time (an OSError: pywsgi then just closes the socket)."""


class HeadTooLarge(ValueError):
    """Over 100 header lines, or a header line over 64 KiB (http.client's limits)."""


def answer(status: int, code: str, message: str) -> bytes:
    """A whole HTTP/1.1 response carrying the app's JSON error body, for what pywsgi answers itself."""
    body = orjson.dumps({"error": code, "message": message})
    reason = http.client.responses.get(status, "Error")
    head = f"HTTP/1.1 {status} {reason}\r\nConnection: close\r\nContent-Type: application/json\r\n"
    return head.encode() + b"Content-Length: %d\r\n\r\n%s" % (len(body), body)


class Handler(WSGIHandler):
    """gevent.pywsgi's connection handler with read deadlines on request heads, and plain answers (one INFO
    line at most, never a traceback) for what clients get wrong or cut short: a 4xx where one can be sent."""

    settings = Settings()  # listen() sets the server's
    served = 0  # requests handled on this connection
    deadline: gevent.Timeout | None = None

    def handle(self) -> None:
        with contextlib.suppress(OSError):  # the peer left while we answered its bad request
            super().handle()

    def handle_one_request(self) -> Any:
        # The first request's head must come whole within header_timeout of the connection; a kept-alive
        # connection's next one within idle_timeout (a connection trickling its headers holds a greenlet).
        wait = self.settings.idle_timeout if self.served else self.settings.header_timeout
        self.deadline = gevent.Timeout.start_new(wait, HeadTimeout(f"no request head within {wait:g} s"))
        try:
            return super().handle_one_request()
        finally:
            self.deadline.close()
            self.served += 1

    def read_request(self, raw_requestline: str) -> bool:
        try:
            return bool(super().read_request(raw_requestline))
        except http.client.HTTPException as exc:  # http.client's own limit: "got more than 100 headers"
            raise HeadTooLarge(str(exc)) from None
        except ValueError:
            if getattr(self.headers, "status", "") == "Line too long":  # a header line over 64 KiB
                raise HeadTooLarge("a header line is longer than 65536 bytes") from None
            raise
        finally:
            if self.deadline is not None:
                self.deadline.close()  # the head is in: the application's time is its own

    def _handle_client_error(self, ex: BaseException) -> tuple[str, bytes] | None:
        peer = self.client_address[0] if isinstance(self.client_address, tuple) else self.client_address
        if isinstance(ex, HeadTooLarge):
            log.info("refused a request from %s: %s", peer, ex)
            return "431", answer(431, "headers-too-large", "request headers too large")
        if isinstance(ex, HeadTimeout):  # (before any byte came, pywsgi closes without asking us)
            log.info("closed a connection from %s: %s", peer, ex)
            return None
        if isinstance(ex, OSError) and not isinstance(ex, _InvalidClientInput):
            return None  # the peer reset or closed in the middle of its request: nothing to answer
        log.info("bad request from %s: %s", peer, getattr(ex, "formatted_message", None) or ex)
        return "400", answer(400, "bad-request", "the request is not valid HTTP/1.1")

    def _log_error(self, t: type[BaseException], v: BaseException, tb: Any) -> None:
        # Through logging (and so its redaction), not the gevent hub's print to stderr.
        if not issubclass(t, gevent.GreenletExit):
            log.error("error serving %s %s", self.command, self.path, exc_info=(t, v, tb))


def listen(app: Flask, settings: Settings) -> WSGIServer:
    """The relay's gevent.pywsgi server, bound (a busy port fails here) but not yet serving."""
    handler = type("Handler", (Handler,), {"settings": settings})
    # A deep accept queue: a reconnect storm is admitted at a controlled rate, not refused by the kernel.
    server = WSGIServer(
        (settings.host, settings.port), body_deadline(app, settings.body_timeout), log=None, error_log=log,
        backlog=2048, handler_class=handler,
    )  # fmt: skip
    server.init_socket()
    # Frames are small and already batched per wakeup: Nagle would hold one behind the client's delayed ACK
    # (~40 ms). Accepted sockets inherit TCP_NODELAY from the listener (gunicorn sets it on its own).
    server.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return server


def serve(settings: Settings) -> None:
    settings, embedded = prepare_to_serve(settings, log)
    app = create_app(settings)
    relay = app.extensions["relay"]
    relay.start()
    server = listen(app, settings)

    def shutdown(*_: object) -> None:
        server.stop(timeout=1)

    signal.signal(signal.SIGTERM, shutdown)
    signal.signal(signal.SIGINT, shutdown)
    log.info("sidecar listening on http://%s:%d (Redis %s)", settings.host, settings.port, settings.redis_url)
    try:
        server.serve_forever()
    finally:
        relay.stop()
        if embedded is not None:
            embedded.stop()
    sys.exit(0)
