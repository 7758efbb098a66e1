"""The production entry point: gunicorn with the gevent worker and sidecar/gunicorn.conf.py."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import redis
import requests

from dashboard.sources import parse_record
from sidecar.publish import Publisher
from tests.clients import SSEClient, WSClient
from tests.processes import REPO_ROOT, ManagedProcess, child_env, free_port


def healthy(url: str) -> bool:
    try:
        return requests.get(url + "/healthz", timeout=1).status_code == 200
    except requests.RequestException:
        return False


def test_gunicorn_gevent_worker_serves_sse_and_websocket(redis_server, tmp_path):
    port = free_port()
    argv = [sys.executable, "-m", "gunicorn", "-c", str(REPO_ROOT / "sidecar" / "gunicorn.conf.py"),
            "--bind", f"127.0.0.1:{port}"]  # fmt: skip
    proc = ManagedProcess("gunicorn", argv, child_env(redis_server.url, {"SIDECAR_DEV": "1"}), tmp_path / "g.log")
    url = f"http://127.0.0.1:{port}"
    try:
        proc.wait_until("GET /healthz 200", lambda: healthy(url), 30)
        sse, ws = SSEClient(url, ["gu:1"]), WSClient(f"ws://127.0.0.1:{port}")
        ws.subscribe("gu:1")
        sse.wait(lambda f: sse.last_id is not None)
        ws.wait(lambda f: ws.of_type("subscribed"))
        Publisher.from_url(redis_server.url).diff("gu:1", "changed", {"n": 1})
        for client in (sse, ws):
            assert client.wait(lambda f, c=client: c.messages()) and client.messages()[0]["diff"] == {"n": 1}
        sse.close()
        ws.close()
    finally:
        proc.stop()
    assert "Traceback" not in proc.log_text()


def gunicorn(redis_url: str, log: Path, **env: str) -> tuple[ManagedProcess, str]:
    port = free_port()
    argv = [sys.executable, "-m", "gunicorn", "-c", str(REPO_ROOT / "sidecar" / "gunicorn.conf.py")]
    env = {"SIDECAR_HOST": "127.0.0.1", "SIDECAR_PORT": str(port), **env}  # the bind comes from Settings
    return ManagedProcess("gunicorn", argv, child_env(redis_url, env), log), f"http://127.0.0.1:{port}"


def test_gunicorn_refuses_open_production_settings_in_one_line(redis_server, tmp_path):
    proc, _ = gunicorn(redis_server.url, tmp_path / "refused.log")
    deadline = time.monotonic() + 30
    while proc.running and time.monotonic() < deadline:
        time.sleep(0.1)
    assert proc.returncode == 2
    log = proc.log_text()
    assert "Traceback" not in log
    assert [line for line in log.splitlines() if "not starting:" in line] == [
        next(line for line in log.splitlines() if "not starting:" in line)
    ]
    assert "Booting worker" not in log  # the master refused before any worker ran


def test_a_gunicorn_worker_that_stops_cleanly_says_so_in_its_last_stats_record(redis_server, tmp_path):
    proc, url = gunicorn(redis_server.url, tmp_path / "stops.log", SIDECAR_DEV="1", SIDECAR_STATS_INTERVAL="0.2")
    try:
        proc.wait_until("GET /healthz 200", lambda: healthy(url), 30)
        client = redis.Redis.from_url(redis_server.url)
        time.sleep(0.5)

        def last() -> Any:
            return parse_record(*client.xrevrange("rt:stats", count=1)[0])

        assert not last().stopped
        proc.stop()  # SIGTERM: gunicorn's graceful shutdown
        assert last().stopped
        client.close()
    finally:
        proc.stop()
    assert "Traceback" not in proc.log_text()
