"""`sidecar demo` as a user runs it: a subprocess in its own process group, stopped by a SIGINT to that whole
group, as a terminal's Ctrl-C does. And a relay that stops cleanly saying so in its last stats record."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import redis
import requests

from dashboard.feed import DashboardConfig
from dashboard.sources import Record, parse_record
from sidecar.embedded import EmbeddedRedis
from sidecar.publish import Publisher
from tests.processes import REPO_ROOT, child_env


def records(url: str) -> list[Record]:
    client = redis.Redis.from_url(url)
    try:
        parsed = [parse_record(i, f) for i, f in client.xrange("rt:stats")]
    finally:
        client.close()
    return [r for r in parsed if r is not None]


def wait_for(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=5).ok
    except requests.ConnectionError:
        return False


class Demo:
    """`python -m sidecar demo ...` in a new session (its own process group), output in a file."""

    def __init__(self, tmp_path: Path, *args: str, **env: str) -> None:
        self.out = tmp_path / "demo.out"
        environ = child_env("", env)
        del environ["REDIS_URL"]  # the embedded Redis, as `make demo` runs
        with open(self.out, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "sidecar", "demo", *args], cwd=REPO_ROOT, env=environ,
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip

    def text(self) -> str:
        return self.out.read_text(errors="replace")

    def ctrl_c(self) -> int:
        os.killpg(self.proc.pid, signal.SIGINT)  # the whole group, as a terminal does
        return self.proc.wait(60)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def test_a_relay_that_stops_cleanly_says_so_in_its_last_stats_record(redis_server, sidecar_process):
    sidecar = sidecar_process(redis_server.url, SIDECAR_STATS_INTERVAL="0.2")
    wait_for(lambda: any(r.pid == sidecar.pid for r in records(redis_server.url)), 5, "a stats record")
    assert not [r for r in records(redis_server.url) if r.pid == sidecar.pid][-1].stopped
    sidecar.stop()  # SIGTERM: a clean stop
    assert [r for r in records(redis_server.url) if r.pid == sidecar.pid][-1].stopped


@pytest.mark.slow
def test_the_demo_honours_sidecar_port_resets_the_last_policy_and_stops_in_dependency_order(
    tmp_path, free_port, monkeypatch
):
    data = tmp_path / "state"
    with EmbeddedRedis(data) as previous:  # a previous run left a throttle policy in the demo's Redis (AOF)
        redis.Redis.from_url(previous.url).hset("rt:throttle", mapping={"v": 7, "doc": b'{"admit_rate": 1}', "at": 1})
    port, dashboard_port = free_port(), free_port()
    demo = Demo(tmp_path, "--dashboard-port", str(dashboard_port), SIDECAR_PORT=str(port), SIDECAR_DATA_DIR=str(data))
    try:
        wait_for(lambda: "sidecar demo is running" in demo.text() or demo.proc.poll() is not None, 60, "the URLs")
        text = demo.text()
        assert f"demo page   http://127.0.0.1:{port}/demo" in text, text
        assert "reset to the settings' policy (a previous run left version 7 in Redis)" in text
        url = re.search(r"Redis +(redis://\S+)", text)[1]
        assert (data / "redis.url").read_text().strip() == url
        assert DashboardConfig.from_env({"SIDECAR_DATA_DIR": str(data)}).redis_url == url  # REDIS_URL unset
        base = f"http://127.0.0.1:{port}"
        assert requests.get(f"{base}/admin/throttle", timeout=5).json()["source"] == "settings"
        wait_for(lambda: answers(f"http://127.0.0.1:{dashboard_port}/app"), 60, "the dashboard")

        run_notebook(data, demo.proc.pid, monkeypatch)

        job = requests.post(f"{base}/demo/jobs/report", timeout=5).json()
        pub = Publisher.from_url(url)

        def running() -> bool:
            snap = pub.snapshot(job["channel"])  # None until the worker's first publish on the channel
            return snap is not None and (snap.state or {}).get("status") == "PROGRESS"

        wait_for(running, 10, "the report to run")
        assert demo.ctrl_c() == 0
    finally:
        demo.kill()

    steps = re.findall(r"sidecar demo: stopping (\w+)", demo.text())
    assert steps == ["traffic", "worker", "sidecar", "dashboard", "Redis"], demo.text()
    assert "Traceback" not in (data / "worker.log").read_text()
    assert "lost Redis" not in demo.text()  # the relay stopped reading before Redis stopped
    assert "Warm shutdown" in (data / "worker.log").read_text()
    assert not (data / "redis.url").exists()
    with EmbeddedRedis(data) as after:  # the AOF holds what the run wrote, its last moments included
        state = Publisher.from_url(after.url).snapshot(job["channel"]).state
        assert state["status"] == "SUCCESS", state  # the running task finished: Redis outlived the worker
        demo_records = [r for r in records(after.url) if r.port == port]
        assert demo_records[-1].stopped  # the relay stopped cleanly, before Redis
        assert redis.Redis.from_url(after.url).hget("rt:throttle", "doc") is None


def run_notebook(data: Path, relay_pid: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """dashboard/notebook.ipynb top to bottom, started in dashboard/ as Jupyter does, with REDIS_URL unset: it
    must find the demo's Redis by itself and show the demo relay's records."""
    import nbclient
    import nbformat

    notebook = nbformat.read(REPO_ROOT / "dashboard" / "notebook.ipynb", as_version=4)
    for name in [k for k in os.environ if k == "REDIS_URL" or k.startswith("SIDECAR_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("SIDECAR_DATA_DIR", str(data))  # the kernel inherits this environment
    client = nbclient.NotebookClient(notebook, timeout=60, kernel_name="python3",
                                     resources={"metadata": {"path": str(REPO_ROOT / "dashboard")}})  # fmt: skip
    client.execute()
    frame = notebook.cells[-1].outputs[-1]["data"]["text/plain"]
    assert f":{relay_pid}" in frame, frame  # the demo relay's records, read from the Redis in redis.url


def busy(port: int) -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", port))
    sock.listen()
    return sock


@pytest.mark.parametrize("which", ["relay", "dashboard"])
def test_the_demo_refuses_a_busy_port_and_says_how_to_pick_another(tmp_path, free_port, which):
    port, dashboard_port = free_port(), free_port()
    with busy(port if which == "relay" else dashboard_port):
        demo = Demo(tmp_path, "--port", str(port), "--dashboard-port", str(dashboard_port),
                    SIDECAR_DATA_DIR=str(tmp_path / "state"))  # fmt: skip
        try:
            assert demo.proc.wait(60) == 1
        finally:
            demo.kill()
    text = demo.text()
    taken = port if which == "relay" else dashboard_port
    assert f"the {which} port 127.0.0.1:{taken} is in use" in text, text
    hint = f"make demo PORT={taken + 1}" if which == "relay" else f"make demo DASHBOARD_PORT={taken + 1}"
    assert hint in text
    assert "sidecar demo is running" not in text


@pytest.mark.slow
def test_a_killed_demo_leaves_none_of_its_processes_running(tmp_path, free_port):
    port, dashboard_port = free_port(), free_port()
    demo = Demo(tmp_path, "--port", str(port), "--dashboard-port", str(dashboard_port),
                SIDECAR_DATA_DIR=str(tmp_path / "state"))  # fmt: skip
    try:
        wait_for(lambda: "sidecar demo is running" in demo.text() or demo.proc.poll() is not None, 60, "the URLs")
        children = psutil.Process(demo.proc.pid).children(recursive=True)
        names = " ".join(" ".join(c.cmdline()) for c in children)
        assert "redis-server" in names and "celery" in names and "dashboard" in names, names
        os.kill(demo.proc.pid, signal.SIGKILL)  # the demo alone, as the OOM killer would: not its group
        demo.proc.wait(10)
        gone, alive = psutil.wait_procs(children, timeout=20)
        assert not alive, [" ".join(p.cmdline()) for p in alive]
    finally:
        demo.kill()
