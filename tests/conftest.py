"""Fixtures shared by every test folder: a real Redis, the sidecar and a Celery worker as subprocesses.

The factories stop everything they started, by pid, at teardown. The process classes live in
``tests/processes.py`` so that the benchmarks can use them too.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest

from tests.processes import REPO_ROOT, EmbeddedRedis, ManagedProcess, SidecarProcess, WorkerProcess
from tests.processes import free_port as _free_port

JWT_LIKE = re.compile(r"eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")


@pytest.fixture(scope="session", autouse=True)
def no_secret_in_any_log(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """No token the suite mints (jwt.encode: tests/tokens.py and the rest), nor any key or secret it gives a child
    process (SIDECAR_*_KEY, SIDECAR_*_SECRET), may be in any log the suite wrote (every *.log under pytest's
    base temp dir), whatever the test did to the server: this fails the session at its end."""
    tokens: set[str] = set()
    keys: set[str] = set()
    encode, start = jwt.encode, ManagedProcess.__init__

    def recording_encode(payload: Any, key: Any, *args: Any, **kwargs: Any) -> str:
        token = encode(payload, key, *args, **kwargs)
        tokens.add(token)
        if isinstance(key, str) and len(key) >= 16:
            keys.add(key)
        return token

    def recording_start(self: ManagedProcess, name: str, argv: list[str], env: Any, *args: Any, **kw: Any) -> None:
        for var, value in env.items():
            if var.startswith("SIDECAR_") and var.endswith(("_KEY", "_SECRET")) and "PUBLIC" not in var:
                keys.update(k for k in str(value).split(",") if len(k) >= 16)
        start(self, name, argv, env, *args, **kw)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(jwt, "encode", recording_encode)
        patch.setattr(ManagedProcess, "__init__", recording_start)
        yield
    signature_of = dict(t.rsplit(".", 1) for t in tokens)  # header.payload -> signature
    leaks = []
    for path in sorted(tmp_path_factory.getbasetemp().rglob("*.log")):
        text = path.read_text(errors="replace")
        # Linear in the log: JWT-shaped words looked up among the minted (a token cut short, with 8 characters
        # of its signature or more, still counts), then the handful of keys.
        found = set()
        for word in JWT_LIKE.findall(text):
            signed, signature = word.rsplit(".", 1)
            if len(signature) >= 8 and signature_of.get(signed, "").startswith(signature):
                found.add(word)
        found |= {k for k in keys if k in text}
        leaks += [f"{path}: ...{secret[-16:]}" for secret in sorted(found)]
    if leaks:
        pytest.fail("minted secrets in the logs:\n" + "\n".join(leaks), pytrace=False)


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
def sidecar_process(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Callable[..., SidecarProcess]]:
    """Factory: ``start(redis_url, **env)`` runs ``python -m sidecar serve`` and waits for /healthz.

    ``env`` holds extra variables such as ``SIDECAR_HISTORY_LEN="5"``. At teardown every process is stopped,
    and the test fails if a log shows a traceback, unless it set ``proc.allow_tracebacks = True``. The front is
    gevent unless the test parametrizes this fixture (``indirect=True``) by ``tests.processes.FRONTS``.
    """
    started: list[SidecarProcess] = []
    front = getattr(request, "param", "gevent")

    def start(redis_url: str, **env: str) -> SidecarProcess:
        proc = SidecarProcess(redis_url, tmp_path, env, front=front)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()
    broken = [p for p in started if not p.allow_tracebacks and "Traceback" in p.log_text()]
    if broken:
        pytest.fail("".join(f"traceback in {p.log_path}:\n{p.log_tail(60)}\n" for p in broken), pytrace=False)


@pytest.fixture(scope="module")
def module_sidecars(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[str], SidecarProcess]]:
    """``get(front)``: the module's one default sidecar on that front, on a Redis of its own, started when first
    asked for (see ``shared_sidecar``). Stopped at the module's end, where a traceback in a log fails the module's
    last test, as ``sidecar_process`` does."""
    started: dict[str, tuple[EmbeddedRedis, SidecarProcess]] = {}

    def get(front: str) -> SidecarProcess:
        if front not in started:
            logs = tmp_path_factory.mktemp(f"shared-{front}")
            server = EmbeddedRedis(logs / "redis").start()
            started[front] = server, SidecarProcess(server.url, logs, front=front)
        return started[front][1]

    yield get
    for server, proc in started.values():
        proc.stop()
        server.stop()
    broken = [p for _, p in started.values() if not p.allow_tracebacks and "Traceback" in p.log_text()]
    if broken:
        pytest.fail("".join(f"traceback in {p.log_path}:\n{p.log_tail(60)}\n" for p in broken), pytrace=False)


@pytest.fixture
def shared_sidecar(
    module_sidecars: Callable[[str], SidecarProcess], sidecar_process: Any, request: pytest.FixtureRequest
) -> SidecarProcess:
    """A default sidecar shared by the module's tests on this test's front (``sidecar_process`` is taken for its
    parametrization by front only), for a test that needs nothing but a sidecar and channels of its own: it must
    not kill, pause or configure it, nor restart its Redis (``.redis_url``). Those take ``sidecar_process``."""
    callspec = getattr(request.node, "callspec", None)
    return module_sidecars(callspec.params.get("sidecar_process", "gevent") if callspec else "gevent")


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
