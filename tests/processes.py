"""Child processes for tests and benchmarks: a sidecar server and a Celery worker.

Each is a real subprocess (gevent must patch before anything is imported, Celery's pool is chosen on the
command line), logs to a file, is ready only when it says so, and is stopped by its own pid, never by name.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path

import requests

from sidecar.embedded import EmbeddedRedis, free_port

__all__ = ["FRONTS", "REPO_ROOT", "EmbeddedRedis", "ManagedProcess", "SidecarProcess", "WorkerProcess", "free_port"]

REPO_ROOT = Path(__file__).resolve().parents[1]
# The two fronts of `sidecar serve --front`: a test module runs on both with
# `pytestmark = pytest.mark.parametrize("sidecar_process", FRONTS, indirect=True)` (tests/conftest.py).
FRONTS = ("gevent", "asgi")


def child_env(redis_url: str, env: Mapping[str, object]) -> dict[str, str]:
    """This process's environment without inherited SIDECAR_*/REDIS_URL, plus ``env``."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_") and k != "REDIS_URL"}
    base.update(PYTHONUNBUFFERED="1", REDIS_URL=redis_url)
    base.update({k: str(v) for k, v in env.items()})
    return base


class ManagedProcess:
    """A subprocess with stdout+stderr in ``log_path``."""

    stop_timeout = 5.0

    def __init__(
        self, name: str, argv: list[str], env: Mapping[str, str], log_path: Path, cwd: Path = REPO_ROOT
    ) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_path
        with open(log_path, "ab") as log:
            self._proc = subprocess.Popen(
                argv, env=dict(env), cwd=cwd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def running(self) -> bool:
        return self._proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return self._proc.poll()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.running:
            self._proc.kill()
        self._proc.wait()

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it is still there after ``stop_timeout`` seconds. Idempotent."""
        if self.running:
            self._proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(self.stop_timeout)
        self.kill()

    def wait_until(self, ready: str, check: Callable[[], bool], timeout: float) -> None:
        """Poll ``check()`` until true; raise with the log tail if the process exits or time runs out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.running:
                raise RuntimeError(
                    f"{self.name} exited with {self.returncode} before {ready}:\n{self.log_tail()}"
                )
            if check():
                return
            time.sleep(0.05)  # a start is often ~1 s: a finer poll saves a part of one per process
        self.stop()
        raise RuntimeError(f"{self.name}: no {ready} within {timeout:g} s:\n{self.log_tail()}")


class SidecarProcess(ManagedProcess):
    """``python -m sidecar serve --front <front>`` on a free port, ready when ``GET /healthz`` answers 200."""

    def __init__(
        self, redis_url: str, log_dir: Path, env: Mapping[str, object] = {}, ready_timeout: float = 20.0,
        front: str = "gevent",
    ) -> None:  # fmt: skip
        self.front = front
        self.redis_url = redis_url
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}"
        # A traceback in the log is a defect (e.g. one logged for bad client input); a test that provokes
        # one on purpose (killing Redis under load, say) sets this to True.
        self.allow_tracebacks = False
        argv = [sys.executable, "-m", "sidecar", "serve", "--host", "127.0.0.1", "--port", str(self.port)]
        argv += ["--front", front]
        env = {"SIDECAR_DEV": "1", **env}
        name = f"sidecar-{self.port}"
        super().__init__(name, argv, child_env(redis_url, env), log_dir / f"{name}.log")
        self.wait_until("GET /healthz 200", self._healthy, ready_timeout)

    def _healthy(self) -> bool:
        try:
            return requests.get(self.url + "/healthz", timeout=1).status_code == 200
        except requests.RequestException:
            return False


class WorkerProcess(ManagedProcess):
    """A Celery worker for ``tasks.celery_app:app`` on ``pool`` (``-P``), ready when it logs "ready."."""

    stop_timeout = 10.0  # warm shutdown waits for running tasks

    def __init__(
        self,
        redis_url: str,
        log_dir: Path,
        env: Mapping[str, object] = {},
        ready_timeout: float = 30.0,
        pool: str = "threads",
        concurrency: int = 4,
    ) -> None:
        self.node = f"test-{uuid.uuid4().hex[:8]}"
        self.pool = pool
        if pool == "gevent":
            # Celery's loop on a gevent pool sees SIGTERM only ~4-5 s later, idle or not (Warm shutdown is logged at
            # once, the steps after that); the pool has no child process to leave behind, and no test or bench
            # waits on a task across stop(): 1 s, then SIGKILL.
            self.stop_timeout = 1.0
        argv = [
            sys.executable, "-m", "celery", "-A", "tasks.celery_app:app", "worker",
            "-P", pool, "-c", str(concurrency), "--without-heartbeat", "--without-gossip", "--without-mingle",
            "-l", "info", "-n", f"{self.node}@%h",
        ]  # fmt: skip
        super().__init__(f"worker {self.node}", argv, child_env(redis_url, env), log_dir / f"{self.node}.log")
        self.wait_until('"ready."', lambda: "ready." in self.log_text(), ready_timeout)
