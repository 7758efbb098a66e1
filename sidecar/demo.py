"""`sidecar demo` (`make demo`): the whole stack on one machine, with traffic, for a first look.

It starts the embedded redis-server (AOF on, in ``data_dir``) unless ``REDIS_URL`` names one, a Celery worker of
the reference app (``tasks/``), the sidecar itself (in this process, on gevent), the Panel dashboard when it is
there, and a greenlet that starts demo jobs every few seconds. Ctrl-C or SIGTERM stops every child by its pid.

The ``demo`` blueprint (``POST /demo/jobs/<report|sprint|import>``) backs the buttons of the page at ``/demo``;
only :func:`run_demo` registers it, and only this module imports the reference app, lazily: ``tasks/`` lives in
the repository, not in the wheel. Jobs are announced on the channel ``demo:board``, whose state lists the latest
ones (``{"jobs": {<task id>: {"kind", "channel", "by", "started"}}}``), so every open page shows every job.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

import gevent
import orjson
from flask import Blueprint, Response, current_app
from gevent.event import Event
from gevent.pywsgi import WSGIServer

from sidecar.app import create_app, error
from sidecar.auth import InsecureConfig, check_startup
from sidecar.config import Settings
from sidecar.embedded import EmbeddedRedis
from sidecar.logs import configure
from sidecar.publish import Publisher
from sidecar.serve import listen

log = logging.getLogger("sidecar.demo")

REPO_ROOT = Path(__file__).resolve().parents[1]
BOARD = "demo:board"
USER = "demo"  # reports are run for this user: `user:demo` hears each one finish
SPRINT_ID = "demo"
KEEP_JOBS = 12  # jobs listed on the board; older ones are removed from its state
REPORT_STEPS, REPORT_DELAY = 10, 0.3  # a report takes about 3 s, in 10 progress steps
SPRINT_DELAY = 1.5  # seconds between a sprint reopening and its completion, so both can be seen
IMPORT_ROWS = 500
IMPORT_DELAY = 1.0  # seconds before an import starts: pages that see it announced subscribe before the burst
TRAFFIC_EVERY = 4.0  # seconds between demo traffic beats
STOP_TIMEOUT = 10.0  # a Celery warm shutdown waits for the running tasks

demo = Blueprint("demo", __name__, url_prefix="/demo")
KINDS = ("report", "sprint", "import")


@demo.post("/jobs/<kind>")
def start_job(kind: str) -> Response:
    """Start a demo job: 202 with ``{"id", "kind", "channel", "by", "started"}``."""
    if kind not in KINDS:
        return error(404, "unknown-job", f"demo jobs are {', '.join(KINDS)}")
    try:
        job = current_app.extensions["demo"].start(kind, by="button")
    except Exception as exc:  # the broker or Redis is down: say so, no traceback
        log.warning("demo: could not start a %s job: %s", kind, type(exc).__name__)
        return error(503, "unavailable", f"could not start the job ({type(exc).__name__}); retry shortly")
    return Response(orjson.dumps(job), status=202, mimetype="application/json")


class Jobs:
    """Starts the demo jobs through the reference Celery app and lists them on ``demo:board``."""

    def __init__(self, publisher: Publisher) -> None:
        self.publisher = publisher
        self._celery: Any = None
        snap = publisher.snapshot(BOARD)
        listed = (snap.state or {}).get("jobs", {}) if snap is not None else {}
        # Oldest first, so that a restarted demo goes on removing the jobs a previous run listed.
        self.listed = deque(sorted(listed, key=lambda job_id: listed[job_id].get("started", 0)))

    @property
    def celery(self) -> Any:
        if self._celery is None:
            if str(REPO_ROOT) not in sys.path:  # `sidecar` runs as a console script: the checkout is not on the path
                sys.path.append(str(REPO_ROOT))
            from tasks.celery_app import app  # the reference app reads REDIS_URL at import, as a worker does

            self._celery = app
        return self._celery

    def start(self, kind: str, by: str) -> dict[str, Any]:
        send = self.celery.send_task
        if kind == "report":
            result = send("tasks.jobs.report", (USER,), {"steps": REPORT_STEPS, "delay": REPORT_DELAY})
            channel = f"task:{result.id}"
        elif kind == "sprint":
            channel = f"sprint:{SPRINT_ID}"
            self._reopen_sprint(channel)
            result = send("tasks.jobs.complete_sprint", (SPRINT_ID,), countdown=SPRINT_DELAY)
        elif kind == "import":
            channel = f"import:{secrets.token_hex(4)}"
            self.publisher.state(channel, "import-started", {"rows": IMPORT_ROWS, "imported": 0, "items": {}})
            result = send("tasks.jobs.bulk_import", (channel, IMPORT_ROWS), countdown=IMPORT_DELAY)
        else:
            raise ValueError(kind)
        job = {"id": result.id, "kind": kind, "channel": channel, "by": by, "started": round(time.time() * 1000)}
        self._announce(job)
        return job

    def _reopen_sprint(self, channel: str) -> None:
        """A fresh sprint (a `state` publish) when there is none or the last one is completed."""
        from tasks.jobs import demo_sprint

        snap = self.publisher.snapshot(channel)
        state = snap.state if snap is not None and isinstance(snap.state, dict) else None
        if state is not None and not state.get("completed_date"):
            return
        number = (state or {}).get("number", 0) + 1
        sprint = {**demo_sprint(SPRINT_ID), "number": number, "name": f"Sprint {number}"}
        self.publisher.state(channel, "sprint-created", sprint)

    def _announce(self, job: dict[str, Any]) -> None:
        self.listed.append(job["id"])
        changes: dict[str, Any] = {job["id"]: job}
        while len(self.listed) > KEEP_JOBS:
            changes[self.listed.popleft()] = None  # RFC 7386: null removes the member
        self.publisher.diff(BOARD, "job-started", {"jobs": changes}, data=job)


def traffic(jobs: Jobs, stop: Event) -> None:
    """A report every beat, a sprint completion every sixth, an import burst every eighth."""
    beat = 0
    while True:
        kinds = ["report"] + (["sprint"] if beat % 6 == 2 else []) + (["import"] if beat % 8 == 4 else [])
        for kind in kinds:
            try:
                jobs.start(kind, by="traffic")
            except Exception as exc:  # Redis restarting, say: the next beat tries again
                log.warning("demo traffic: could not start a %s job: %s", kind, type(exc).__name__)
        beat += 1
        if stop.wait(TRAFFIC_EVERY):
            return


class Child:
    """A child process with its output in a log file, stopped by its own pid."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_path: Path) -> None:
        self.name = name
        self.log_path = log_path
        with open(log_path, "ab") as out:
            self.proc = subprocess.Popen(
                argv, cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
            )

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def run_demo(settings: Settings, dashboard_port: int, with_dashboard: bool, *, with_traffic: bool = True) -> int:
    """Run the demo until Ctrl-C or SIGTERM. gevent must have patched the standard library already."""
    configure()  # redacting, as sidecar serve (sidecar/logs.py)
    if not (REPO_ROOT / "tasks" / "celery_app.py").exists():
        print("sidecar demo runs from a checkout of the repository: it needs the reference app in tasks/")
        return 2
    try:
        check_startup(settings)  # the demo runs in dev mode: this says loudly what is open
    except InsecureConfig as exc:
        print(f"sidecar demo: {exc}")
        return 2
    data_dir = Path(settings.data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    embedded: EmbeddedRedis | None = None
    children: list[Child] = []
    stop = Event()
    relay = None
    server: WSGIServer | None = None
    try:
        if not settings.redis_url:
            embedded = EmbeddedRedis(data_dir).start()
            settings = settings.replace(redis_url=embedded.url)
        redis_url = settings.redis_url or ""
        os.environ["REDIS_URL"] = redis_url  # for the reference app imported here, and for the children
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}

        app = create_app(settings)
        app.register_blueprint(demo)
        relay = app.extensions["relay"]
        jobs = app.extensions["demo"] = Jobs(app.extensions["publisher"])
        try:
            server = listen(app, settings)  # bound now: a busy port fails here, before any child starts
        except OSError as exc:
            print(f"sidecar demo: cannot listen on {settings.host}:{settings.port}: {exc.strerror}")
            return 1

        worker_argv = [
            sys.executable, "-m", "celery", "-A", "tasks.celery_app:app", "worker", "-P", "threads", "-c", "4",
            "--without-heartbeat", "--without-gossip", "--without-mingle", "-l", "info", "-n", f"demo-{os.getpid()}@%h",
        ]  # fmt: skip
        children.append(Child("worker", worker_argv, env, data_dir / "worker.log"))
        dashboard_url = None
        if with_dashboard and (REPO_ROOT / "dashboard" / "app.py").exists() and importlib.util.find_spec("panel"):
            origins = [f"--allow-websocket-origin={h}:{dashboard_port}" for h in (settings.host, "localhost")]
            dashboard_argv = [
                sys.executable, "-m", "panel", "serve", str(REPO_ROOT / "dashboard" / "app.py"),
                "--address", settings.host, "--port", str(dashboard_port), *origins,
            ]  # fmt: skip
            children.append(Child("dashboard", dashboard_argv, env, data_dir / "dashboard.log"))
            dashboard_url = f"http://{settings.host}:{dashboard_port}/app"

        relay.start()
        server.start()
        _print_urls(settings, redis_url, embedded is not None, data_dir, children, dashboard_url)
        for signum in (signal.SIGINT, signal.SIGTERM):
            gevent.signal_handler(signum, stop.set)
        if with_traffic:
            gevent.spawn(traffic, jobs, stop)
        stop.wait()
        print("\nsidecar demo: stopping")
        return 0
    finally:
        stop.set()
        if server is not None:
            server.stop(timeout=1)
        if relay is not None:
            relay.stop()
        for child in reversed(children):
            child.stop()
        if embedded is not None:
            embedded.stop()


def _print_urls(
    settings: Settings, redis_url: str, embedded: bool, data_dir: Path, children: list[Child], dashboard: str | None
) -> None:
    base = f"http://{settings.host}:{settings.port}"
    where = f"embedded, data in {data_dir}" if embedded else "from REDIS_URL"
    lines = [
        "",
        "sidecar demo is running (Ctrl-C stops everything)",
        f"  demo page   {base}/demo",
        f"  sidecar     {base}   (health: {base}/healthz)",
        f"  dashboard   {dashboard}" if dashboard else "  dashboard   not started (needs dashboard/app.py and panel)",
        f"  stream      curl -N '{base}/sse?channel=demo:board&channel=sprint:{SPRINT_ID}'",
        f"  state       curl '{base}/channels/sprint:{SPRINT_ID}/state'",
        f"  Redis       {redis_url} ({where})",
    ]
    lines += [
        f"  {'children' if i == 0 else '':<11} {c.name} pid {c.proc.pid}, log {c.log_path}"
        for i, c in enumerate(children)
    ]
    print("\n".join(lines) + "\n", flush=True)
