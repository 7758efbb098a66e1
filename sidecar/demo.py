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
from flask import Blueprint, Response, current_app, send_from_directory
from gevent.event import Event
from gevent.pywsgi import WSGIServer

from sidecar.app import STATIC, create_app, error
from sidecar.auth import InsecureConfig, check_startup
from sidecar.cli import port_free, port_taken
from sidecar.config import Settings
from sidecar.embedded import URL_FILE, EmbeddedRedis, die_with_parent
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
# The patterns the demo's stats count by (docs/dashboard.md), unless SIDECAR_STATS_PATTERNS names others.
STATS_PATTERNS = f"{BOARD},task:*,sprint:*,import:*,user:*"


@demo.get("")
def page() -> Response:
    """The demo job board at ``/demo``: served only here, where its buttons work."""
    return send_from_directory(STATIC, "demo.html")


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
    """A child process with its output in a log file, stopped by its own pid.

    It runs in its own session, so a terminal's Ctrl-C (SIGINT to the whole foreground process group) reaches only
    the demo, which stops the children in dependency order instead of all of them in the same instant."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_path: Path) -> None:
        self.name = name
        self.log_path = log_path
        with open(log_path, "ab") as out:
            self.proc = subprocess.Popen(
                argv, cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True, preexec_fn=die_with_parent,  # gone with the demo, even a SIGKILLed one
            )  # fmt: skip

    def stop(self) -> None:
        """SIGTERM (for a Celery worker: a warm shutdown, running tasks finish), SIGKILL after STOP_TIMEOUT."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def run_demo(settings: Settings, dashboard_port: int, with_dashboard: bool, *, with_traffic: bool = True) -> int:
    """Run the demo until Ctrl-C or SIGTERM. gevent must have patched the standard library already."""
    configure(settings.log_level)  # redacting, as sidecar serve (sidecar/logs.py)
    if not (REPO_ROOT / "tasks" / "celery_app.py").exists():
        print("sidecar demo runs from a checkout of the repository: it needs the reference app in tasks/")
        return 2
    try:
        check_startup(settings)  # the demo runs in dev mode: this says loudly what is open
    except InsecureConfig as exc:
        print(f"sidecar demo: {exc}")
        return 2
    settings = settings.replace(stats_patterns=settings.stats_patterns or STATS_PATTERNS)
    with_dashboard = with_dashboard and (REPO_ROOT / "dashboard" / "app.py").exists()
    with_dashboard = with_dashboard and importlib.util.find_spec("panel") is not None
    if with_dashboard and not port_free(settings.host, dashboard_port):
        how = ("make demo DASHBOARD_PORT={}", "sidecar demo --dashboard-port {}")
        print(f"sidecar demo: {port_taken('dashboard', settings.host, dashboard_port, *how)}")
        return 1
    data_dir = Path(settings.data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    url_file = data_dir / URL_FILE
    embedded: EmbeddedRedis | None = None
    worker: Child | None = None
    dashboard: Child | None = None
    stop = Event()
    relay = None
    server: WSGIServer | None = None
    beats: gevent.Greenlet | None = None
    try:
        if not settings.redis_url:
            embedded = EmbeddedRedis(data_dir, die_with_parent=True).start()
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
        except OSError:
            ways = ("make demo PORT={}", "sidecar demo --port {}", "SIDECAR_PORT={}")
            print(f"sidecar demo: {port_taken('relay', settings.host, settings.port, *ways)}")
            return 1
        reset = _reset_policy(relay)

        worker_argv = [
            sys.executable, "-m", "celery", "-A", "tasks.celery_app:app", "worker", "-P", "threads", "-c", "4",
            "--without-heartbeat", "--without-gossip", "--without-mingle", "-l", "info", "-n", f"demo-{os.getpid()}@%h",
        ]  # fmt: skip
        worker = Child("worker", worker_argv, env, data_dir / "worker.log")
        dashboard_url = None
        if with_dashboard:
            dashboard_argv = [
                sys.executable, "-m", "sidecar", "dashboard", "--host", settings.host, "--port", str(dashboard_port),
            ]  # fmt: skip
            dashboard = Child("dashboard", dashboard_argv, env, data_dir / "dashboard.log")
            dashboard_url = f"http://{settings.host}:{dashboard_port}/app"

        relay.start()
        server.start()
        url_file.write_text(redis_url + "\n")  # the notebook and `sidecar dashboard` read it when REDIS_URL is unset
        url_file.chmod(0o600)
        children = [c for c in (worker, dashboard) if c is not None]
        _print_urls(settings, redis_url, embedded is not None, data_dir, children, dashboard_url, reset)
        for signum in (signal.SIGINT, signal.SIGTERM):
            gevent.signal_handler(signum, stop.set)
        if with_traffic:
            beats = gevent.spawn(traffic, jobs, stop)
        gevent.spawn(_watch, children, stop)
        stop.wait()
        print("\nsidecar demo: stopping", flush=True)
        return 0
    finally:
        # Dependency order: nothing new is started, running tasks finish while Redis and the relay still take
        # their results, clients hear the end, and Redis goes last.
        stop.set()
        if beats is not None:
            _step("traffic")
            beats.join(timeout=STOP_TIMEOUT)
        if worker is not None:
            _step("worker (warm shutdown: running tasks finish)")
            worker.stop()
        if server is not None:
            _step("sidecar")
            server.stop(timeout=1)
        if relay is not None:
            relay.stop()
            if relay.reader.thread is not None:  # its blocking read ends before Redis does: no "lost Redis"
                relay.reader.thread.join(settings.read_block_ms / 1000 + 1)
        if dashboard is not None:
            _step("dashboard")
            dashboard.stop()
        url_file.unlink(missing_ok=True)
        if embedded is not None:
            _step("Redis")
            embedded.stop()


def _step(what: str) -> None:
    print(f"sidecar demo: stopping {what}", flush=True)


def _reset_policy(relay: Any) -> int | None:
    """Back to the settings' throttle policy if a previous run left one in Redis (it would silently still be in
    force); the version that was reset, or None."""
    version, doc, _ = relay.store.read_policy()
    if doc is None:
        return None
    relay.control.put_policy(None)
    return int(version)


def _watch(children: list[Child], stop: Event) -> None:
    """Say so when a child exits on its own (its log says why); the demo goes on without it."""
    running = list(children)
    while running and not stop.wait(1.0):
        for child in [c for c in running if c.proc.poll() is not None]:
            running.remove(child)
            print(f"sidecar demo: the {child.name} exited with status {child.proc.returncode}; see {child.log_path}",
                  flush=True)  # fmt: skip


def _print_urls(
    settings: Settings,
    redis_url: str,
    embedded: bool,
    data_dir: Path,
    children: list[Child],
    dashboard: str | None,
    reset: int | None,
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
        f"  Redis       {redis_url} ({where}; also in {data_dir / URL_FILE} for the notebook)",
        f"  throttle    reset to the settings' policy (a previous run left version {reset} in Redis)"
        if reset
        else "  throttle    the settings' policy",
    ]
    lines += [
        f"  {'children' if i == 0 else '':<11} {c.name} pid {c.proc.pid}, log {c.log_path}"
        for i, c in enumerate(children)
    ]
    lines.append(f"  state       {data_dir} (make clean removes it)")
    print("\n".join(lines) + "\n", flush=True)
