"""SIDECAR_LOG_LEVEL on real processes, every entry point that configures logging: `sidecar serve` (both fronts)
and gunicorn. At DEBUG the reader watchdog's rounds show (here: its failing reads while Redis is away), still
redacted; a bad value stops the process at once, with a line naming the setting and the levels."""

from __future__ import annotations

import socket
import sys
import time
from pathlib import Path

import pytest
import requests

from tests.processes import FRONTS, REPO_ROOT, ManagedProcess, SidecarProcess, child_env, free_port
from tests.tokens import mint

WATCHDOG_DEBUG = "DEBUG sidecar.reader: watchdog: shards"  # "... left out: their node did not answer"
REFUSED = "SIDECAR_LOG_LEVEL: 'loud' is not one of DEBUG, INFO, WARNING, ERROR (any case)"
SECRET = "log-level-test-secret-0123456789abcdef"


def wait_for(proc: ManagedProcess, text: str, timeout: float = 20) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in proc.log_text():
            return True
        time.sleep(0.1)
    return False


def send_bad_request_line(port: int, token: str) -> None:
    """A request line the server logs whole (as bad input), token and all."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(f"GET /sse?channels=a&token={token} HTTP/1.1 junk\r\n\r\n".encode())
        sock.recv(4096)


@pytest.mark.parametrize("sidecar_process", FRONTS, indirect=True)
def test_debug_shows_the_watchdog_rounds_redacted(sidecar_process, redis_server) -> None:
    proc: SidecarProcess = sidecar_process(redis_server.url, SIDECAR_LOG_LEVEL="debug", SIDECAR_JWT_SECRET=SECRET)
    token = mint(SECRET, ["a"])
    send_bad_request_line(proc.port, token)
    proc.allow_tracebacks = True  # Redis goes away under a running relay
    redis_server.kill()
    try:
        assert wait_for(proc, WATCHDOG_DEBUG), proc.log_tail()
    finally:
        redis_server.start()
    log = proc.log_text()
    assert token not in log and token.rsplit(".", 1)[1] not in log
    if proc.front == "gevent":  # gevent.pywsgi logs the bad line whole (uvicorn does not log it)
        assert "token=[redacted]" in log
    assert "DEBUG redis." not in log  # the libraries' debug lines stay off: only the sidecar's own


def test_info_by_default_shows_no_debug_line(sidecar_process, redis_server) -> None:
    proc: SidecarProcess = sidecar_process(redis_server.url)
    proc.allow_tracebacks = True
    redis_server.kill()
    try:
        assert wait_for(proc, "WARNING sidecar.reader"), proc.log_tail()  # the reader saw Redis go
        time.sleep(2)  # two watchdog rounds (reader.WATCH_INTERVAL) at least
    finally:
        redis_server.start()
    assert " DEBUG " not in proc.log_text()


def healthy(url: str) -> bool:
    try:
        return requests.get(url + "/healthz", timeout=1).status_code == 200
    except requests.RequestException:
        return False


def gunicorn_argv() -> list[str]:
    return [sys.executable, "-m", "gunicorn", "-c", str(REPO_ROOT / "sidecar" / "gunicorn.conf.py")]


def test_gunicorn_debug_shows_the_watchdog_rounds(redis_server, tmp_path: Path) -> None:
    port = free_port()
    env = {"SIDECAR_DEV": "1", "SIDECAR_HOST": "127.0.0.1", "SIDECAR_PORT": port, "SIDECAR_LOG_LEVEL": "DEBUG"}
    proc = ManagedProcess("gunicorn", gunicorn_argv(), child_env(redis_server.url, env), tmp_path / "gunicorn.log")
    try:
        proc.wait_until("GET /healthz 200", lambda: healthy(f"http://127.0.0.1:{port}"), 30)
        redis_server.kill()
        try:
            assert wait_for(proc, WATCHDOG_DEBUG), proc.log_tail()
        finally:
            redis_server.start()
    finally:
        proc.stop()
    assert "Current configuration" not in proc.log_text()  # gunicorn's own debug dump (its -e values) stays off


@pytest.mark.parametrize(
    "argv",
    [
        [sys.executable, "-m", "sidecar", "serve", "--front", "gevent"],
        [sys.executable, "-m", "sidecar", "serve", "--front", "asgi"],
        gunicorn_argv(),
    ],
    ids=["serve-gevent", "serve-asgi", "gunicorn"],
)
def test_a_bad_level_stops_the_process_with_the_setting_named(argv, redis_server, tmp_path: Path) -> None:
    env = {"SIDECAR_DEV": "1", "SIDECAR_PORT": free_port(), "SIDECAR_LOG_LEVEL": "loud"}
    proc = ManagedProcess("refused", argv, child_env(redis_server.url, env), tmp_path / "refused.log")
    deadline = time.monotonic() + 30
    while proc.running and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.stop()
    assert proc.returncode not in (0, None, -15)
    assert REFUSED in proc.log_text()
