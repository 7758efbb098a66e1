"""The server's logging: one redacting filter on every handler, so no token or key reaches a log line.

A client may put its token in the query string (`?token=`, for EventSource, which sets no headers), and the
WSGI servers log a malformed request line whole. The filter rewrites each record's message, exception text
and stack before any handler formats it, whoever logged it: our code, Flask, gevent.pywsgi or gunicorn.

Example::

    configure(settings.log_level)                # sidecar serve, demo and the gunicorn app (sidecar/wsgi.py)
    install(gunicorn_logger.error_log)           # gunicorn's own loggers (sidecar/gunicorn.conf.py)
"""

from __future__ import annotations

import logging
import re

# `token=` (and `access_token=`) in a query string, up to the next separator; and a bearer credential.
SECRET_PARAM = re.compile(r"(?i)((?:^|[?&;\s'\"])(?:access_)?token=)[^&;\s'\"\\]+")
BEARER = re.compile(r"(?i)(\bbearer\s+)[^\s'\",;\\]+")
REDACTED = "[redacted]"


def redact(text: str) -> str:
    """`text` with every query-string secret and bearer credential replaced by ``[redacted]``."""
    if "=" not in text and "earer" not in text:
        return text
    return BEARER.sub(r"\1" + REDACTED, SECRET_PARAM.sub(r"\1" + REDACTED, text))


class Redact(logging.Filter):
    """Rewrites a record so that whatever formats it next sees no secret."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: the handler reports it, with the raw message redacted
            message = str(record.msg)
        record.msg, record.args = redact(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


REDACT = Redact()


def install(*loggers: logging.Logger) -> None:
    """Put the filter on every handler of `loggers` (the root logger when none is given). A handler filter
    sees every record the handler writes, those propagated from other loggers too."""
    for logger in loggers or (logging.getLogger(),):
        for handler in logger.handlers:
            if REDACT not in handler.filters:
                handler.addFilter(REDACT)


def configure(level: str = "INFO") -> None:
    """The process's logging: one stderr handler on the root logger, redacting, at `level` (`Settings.log_level`:
    DEBUG, INFO, WARNING or ERROR). DEBUG is the sidecar's own debug lines (the `sidecar.*` loggers); the
    libraries' stay off (redis-py logs one per connection). The filter is on the handler: it rewrites records of
    every level and logger, debug lines included."""
    number = logging.getLevelNamesMapping()[level]
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(max(number, logging.INFO))  # also when basicConfig found a handler and did nothing
    logging.getLogger("sidecar").setLevel(number)
    install()
