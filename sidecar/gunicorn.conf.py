# gunicorn -c sidecar/gunicorn.conf.py   (REDIS_URL and SIDECAR_* in the environment, read by Settings only)
import logging
import sys
from typing import Any

import gevent
from gunicorn.workers.ggevent import GeventWorker

from sidecar import logs
from sidecar.auth import InsecureConfig, check_startup
from sidecar.config import Settings

settings = Settings.from_env()


class Worker(GeventWorker):
    """The gevent worker, with the sidecar's read deadlines: a connection's first request head within
    `header_timeout` (gunicorn's keepalive bounds the later ones), each body within `body_timeout`."""

    def timeout_ctx(self) -> gevent.Timeout:
        current = gevent.getcurrent()  # one greenlet per connection
        first = not getattr(current, "sidecar_served", False)
        current.sidecar_served = True
        return gevent.Timeout(settings.header_timeout if first else self.cfg.keepalive, False)  # False: close


class ClientErrorsAtInfo(logging.Filter):
    """gunicorn logs a client's malformed request (its 4xx answer) at WARNING: it is no warning to ops."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.WARNING and str(record.msg).startswith("Invalid request from"):
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


def post_worker_init(worker: Worker) -> None:
    from sidecar.deadlines import body_deadline  # gevent is patched by now

    worker.wsgi = body_deadline(worker.wsgi, settings.body_timeout)
    # No token in any log line: the app's root handler (sidecar/wsgi.py) and gunicorn's own loggers.
    logs.install(logging.getLogger(), worker.log.error_log, worker.log.access_log)
    for handler in worker.log.error_log.handlers:
        handler.addFilter(ClientErrorsAtInfo())


def on_starting(server: Any) -> None:
    """Refuse open production settings in the master, once, in one line (as `sidecar serve` does), before any
    worker would fail on them with a traceback each."""
    try:
        check_startup(settings)
    except InsecureConfig as exc:
        server.log.critical("not starting: %s", exc)
        sys.exit(2)


def worker_exit(server: Any, worker: Any) -> None:
    """A worker that stops cleanly stops its relay, whose last stats record says so (the dashboard shows the
    replica as stopped, not stale)."""
    app = sys.modules.get("sidecar.wsgi")
    if app is not None:
        app.app.extensions["relay"].stop()


wsgi_app = "sidecar.wsgi:app"
worker_class = Worker  # one greenlet per connection; the worker patches before loading the app
workers = settings.workers
worker_connections = settings.worker_connections
bind = f"{settings.host}:{settings.port}"  # loopback unless SIDECAR_HOST says otherwise (the image: 0.0.0.0)
timeout = 30
graceful_timeout = 5
keepalive = max(1, round(settings.idle_timeout))  # whole seconds; also bounds a kept-alive request head
control_socket_disable = True
accesslog = None
# gunicorn's own lines follow SIDECAR_LOG_LEVEL down to INFO only: at debug the master logs its whole configuration
# (`-e` values, secrets among them) before any redacting filter is on; `--log-level debug` still gets it.
loglevel = "info" if settings.log_level == "DEBUG" else settings.log_level.lower()
