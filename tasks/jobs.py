"""Demo jobs: a report with progress, failures of every kind, the sprint example, an import burst and an echo.

Task names are ``tasks.jobs.<function>``; send them with ``app.send_task("tasks.jobs.report", (42,))``.
"""

from __future__ import annotations

import os
import time
from datetime import UTC, date, datetime
from typing import Any

from sidecar.celery_hooks import progress, publisher
from tasks.celery_app import app

IMPORT_CHUNK = 50  # diffs per round trip in bulk_import
HANG_TIME_LIMIT = 1.0  # seconds: hang()'s hard time limit


@app.task(bind=True, realtime_channels=["user:{user_id}"])
def report(self: Any, user_id: int | str, steps: int = 5, delay: float = 0.2) -> dict[str, Any]:
    """Build a report in ``steps`` steps, with progress on ``task:<id>``; ``user:<user_id>`` hears the end."""
    for step in range(1, steps + 1):
        time.sleep(delay)
        progress(step, steps, f"step {step} of {steps}")
    return {"rows": steps * 100, "url": f"/reports/{self.request.id}.csv"}


@app.task
def fail(message: str) -> None:
    """Always fails: the channel shows FAILURE with the type and message, never the traceback."""
    raise ValueError(message)


@app.task(time_limit=HANG_TIME_LIMIT, realtime_channels=["user:{user_id}"])
def hang(user_id: int | str, seconds: float = 30.0) -> None:
    """Sleeps past its hard time limit: the pool kills it (prefork: SIGKILL of the child) and fails it;
    ``user:<user_id>`` hears ``job-failed``."""
    time.sleep(seconds)


@app.task
def die(code: int = 1) -> None:
    """Ends its process at once, as a crash or the OOM killer would: prefork reports ``WorkerLostError``.
    Only for prefork, where the process is a pool child; on threads or solo it takes the worker down."""
    os._exit(code)


@app.task
def stamp() -> datetime:
    """A result JSON cannot encode (Celery's serializer can): the channel gets a summary of it."""
    return datetime.now(UTC)


@app.task
def echo(x: Any) -> Any:
    """Returns ``x`` at once: for latency benchmarks."""
    return x


def demo_sprint(sprint_id: str) -> dict[str, Any]:
    """A fresh sprint as channel state. Tasks are an object keyed by id, not an array: an RFC 7386 merge patch
    replaces arrays whole, but can change one member of an object (``{"tasks": {"t2": {...}}}``)."""
    return {
        "id": sprint_id,
        "name": f"Sprint {sprint_id}",
        "started_date": date.today().isoformat(),
        "tasks": {
            "t1": {"title": "Design the schema", "status": "completed"},
            "t2": {"title": "Write the importer", "status": "in_progress"},
            "t3": {"title": "Review the importer", "status": "review"},
            "t4": {"title": "Update the docs", "status": "todo"},
        },
    }


@app.task
def complete_sprint(sprint_id: str) -> dict[str, Any]:
    """Close a sprint with ONE diff on ``sprint:<id>``: its completed_date, and every open task completed.

    Creates the sprint first (a ``state`` publish) when the channel has none, so the demo works from scratch.
    """
    pub = publisher()
    channel = f"sprint:{sprint_id}"
    snap = pub.snapshot(channel)
    sprint = snap.state if snap is not None and isinstance(snap.state, dict) else None
    if sprint is None:
        sprint = demo_sprint(sprint_id)
        pub.state(channel, "sprint-created", sprint)
    tasks = sprint.get("tasks", {})
    open_ids = sorted(tid for tid, task in tasks.items() if task.get("status") != "completed")
    completed_date = date.today().isoformat()
    published = pub.diff(
        channel,
        "sprint-completed",
        {"completed_date": completed_date, "tasks": {tid: {"status": "completed"} for tid in open_ids}},
        data={"sprint_id": sprint_id, "completed_date": completed_date, "completed_tasks": open_ids},
    )
    return {"sprint_id": sprint_id, "completed_tasks": open_ids, "seq": published.seq}


@app.task
def bulk_import(channel: str, rows: int = 200) -> dict[str, Any]:
    """A burst: ``rows`` small diffs on ``channel`` as fast as Redis takes them, IMPORT_CHUNK a round trip.

    Each diff adds one item (keyed by id) and bumps the counter: what coalescing and the throttle are for.
    """
    pub = publisher()
    sent = 0
    for start in range(0, rows, IMPORT_CHUNK):
        with pub.batch() as batch:
            for i in range(start, min(start + IMPORT_CHUNK, rows)):
                item = {"n": i, "name": f"row {i}", "ok": i % 7 != 0}
                batch.diff(channel, "row-imported", {"imported": i + 1, "items": {f"r{i}": item}})
        sent += len(batch.results)
    return {"channel": channel, "rows": sent}
