"""The reference Celery app, with realtime enabled in one line.

Run a worker (the pool goes on the command line: set only in config, a gevent pool never runs tasks)::

    REDIS_URL=redis://127.0.0.1:6379/0 celery -A tasks.celery_app:app worker -P threads -c 4

The broker, the result backend and the sidecar's streams share one Redis here; they need not. On a Redis
Cluster they must not: Celery's Redis transport does not support Redis Cluster, so with a cluster ``REDIS_URL``
give the broker a plain Redis in ``CELERY_BROKER_URL`` (the result backend defaults to it;
``CELERY_RESULT_BACKEND`` says otherwise). Celery reads both variables itself; they are read here to default
them and to refuse a cluster broker with a clear message. The hooks keep publishing to ``REDIS_URL`` (the
tests use that to hang the sidecar's Redis alone).
"""

from __future__ import annotations

import os

from celery import Celery

from sidecar.celery_hooks import enable_realtime
from sidecar.config import Settings

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"

settings = Settings.from_env()
REDIS_URL = settings.redis_url or DEFAULT_REDIS_URL

BROKER_URL = os.environ.get("CELERY_BROKER_URL") or REDIS_URL
if "+cluster://" in BROKER_URL:
    raise ValueError(
        "Celery's Redis transport does not support Redis Cluster: set CELERY_BROKER_URL to a plain Redis "
        "(REDIS_URL may stay the cluster the realtime channels use)"
    )
BACKEND_URL = os.environ.get("CELERY_RESULT_BACKEND") or BROKER_URL

app = Celery("tasks", broker=BROKER_URL, backend=BACKEND_URL, include=["tasks.jobs"])
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    result_expires=3600,
    broker_connection_retry_on_startup=True,
)

enable_realtime(app, settings=settings.replace(redis_url=REDIS_URL))
