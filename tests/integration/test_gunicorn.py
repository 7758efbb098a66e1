"""The production entry point: gunicorn with the gevent worker and sidecar/gunicorn.conf.py."""

from __future__ import annotations

import sys

import requests

from sidecar.publish import Publisher
from tests.clients import SSEClient, WSClient
from tests.processes import REPO_ROOT, ManagedProcess, child_env, free_port


def test_gunicorn_gevent_worker_serves_sse_and_websocket(redis_server, tmp_path):
    port = free_port()
    argv = [sys.executable, "-m", "gunicorn", "-c", str(REPO_ROOT / "sidecar" / "gunicorn.conf.py"),
            "--bind", f"127.0.0.1:{port}"]  # fmt: skip
    proc = ManagedProcess("gunicorn", argv, child_env(redis_server.url, {"SIDECAR_DEV": "1"}), tmp_path / "g.log")
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        try:
            return requests.get(url + "/healthz", timeout=1).status_code == 200
        except requests.RequestException:
            return False

    try:
        proc.wait_until("GET /healthz 200", healthy, 30)
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
