"""`sidecar serve`: the relay on gevent.pywsgi. Import this module first: it patches the standard library."""

from gevent import monkey

monkey.patch_all()

import logging  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402

from flask import Flask  # noqa: E402
from gevent.pywsgi import WSGIServer  # noqa: E402

from sidecar.app import create_app  # noqa: E402
from sidecar.auth import InsecureConfig, check_startup  # noqa: E402
from sidecar.config import Settings  # noqa: E402
from sidecar.embedded import EmbeddedRedis  # noqa: E402

log = logging.getLogger("sidecar")


def listen(app: Flask, settings: Settings) -> WSGIServer:
    """The relay's gevent.pywsgi server, bound (a busy port fails here) but not yet serving."""
    # A deep accept queue: a reconnect storm is admitted at a controlled rate, not refused by the kernel.
    server = WSGIServer((settings.host, settings.port), app, log=None, error_log=log, backlog=2048)
    server.init_socket()
    # Frames are small and already batched per wakeup: Nagle would hold one behind the client's delayed ACK
    # (~40 ms). Accepted sockets inherit TCP_NODELAY from the listener (gunicorn sets it on its own).
    server.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return server


def serve(settings: Settings) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        check_startup(settings)  # production refuses to run open; dev mode says loudly what is open
    except InsecureConfig as exc:
        log.critical("not starting: %s", exc)
        sys.exit(2)
    embedded = None
    if not settings.redis_url:
        embedded = EmbeddedRedis(settings.data_dir).start()
        settings = settings.replace(redis_url=embedded.url)
        log.warning(
            "no REDIS_URL: started an embedded redis-server at %s (data in %s)",
            embedded.url,
            settings.data_dir,
        )
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
