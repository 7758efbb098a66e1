"""Fixtures shared by every test folder: a real Redis, the sidecar and a Celery worker as subprocesses.

The factories stop everything they started, by pid, at teardown. The process classes live in
``tests/processes.py`` so that the benchmarks can use them too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.processes import REPO_ROOT, EmbeddedRedis, SidecarProcess, WorkerProcess
from tests.processes import free_port as _free_port


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture
def free_port() -> Callable[[], int]:
    """``free_port()`` gives a port on 127.0.0.1 that nothing listens on right now."""
    return _free_port


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    """A started redis-server with AOF on, its own port and data dir; tests may kill() and restart() it."""
    server = EmbeddedRedis(tmp_path / "redis").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def sidecar_process(tmp_path: Path) -> Iterator[Callable[..., SidecarProcess]]:
    """Factory: ``start(redis_url, **env)`` runs ``python -m sidecar serve`` and waits for /healthz.

    ``env`` holds extra variables such as ``SIDECAR_HISTORY_LEN="5"``. At teardown every process is stopped,
    and the test fails if a log shows a traceback, unless it set ``proc.allow_tracebacks = True``.
    """
    started: list[SidecarProcess] = []

    def start(redis_url: str, **env: str) -> SidecarProcess:
        proc = SidecarProcess(redis_url, tmp_path, env)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()
    broken = [p for p in started if not p.allow_tracebacks and "Traceback" in p.log_text()]
    if broken:
        pytest.fail("".join(f"traceback in {p.log_path}:\n{p.log_tail(60)}\n" for p in broken), pytrace=False)


@pytest.fixture
def celery_worker(tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    """Factory: ``start(redis_url, pool="threads", concurrency=4, **env)`` runs a Celery worker on that pool
    (``-P``) and waits for "ready."."""
    started: list[WorkerProcess] = []

    def start(redis_url: str, pool: str = "threads", concurrency: int = 4, **env: str) -> WorkerProcess:
        proc = WorkerProcess(redis_url, tmp_path, env, pool=pool, concurrency=concurrency)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()
