"""The reference Celery app, with realtime enabled in one line.

Run a worker (the pool goes on the command line: set only in config, a gevent pool never runs tasks)::

    REDIS_URL=redis://127.0.0.1:6379/0 celery -A tasks.celery_app:app worker -P threads -c 4

The broker, the result backend and the sidecar's streams share one Redis here; they need not: Celery itself
reads ``CELERY_BROKER_URL`` and ``CELERY_RESULT_BACKEND`` from the environment over the URLs given below,
while the hooks keep publishing to ``REDIS_URL`` (the tests use that to hang the sidecar's Redis alone).
"""

from __future__ import annotations

from celery import Celery

from sidecar.celery_hooks import enable_realtime
from sidecar.config import Settings

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"

settings = Settings.from_env()
REDIS_URL = settings.redis_url or DEFAULT_REDIS_URL

app = Celery("tasks", broker=REDIS_URL, backend=REDIS_URL, include=["tasks.jobs"])
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    result_expires=3600,
    broker_connection_retry_on_startup=True,
)

enable_realtime(app, settings=settings.replace(redis_url=REDIS_URL))
