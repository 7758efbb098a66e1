"""The demo page's three scenarios, clicked in Chromium, against `run_demo` with a real Celery worker.

Screenshots of each scenario go to artifacts/ (gitignored).
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from sidecar.publish import Publisher
from tests.processes import ManagedProcess, child_env, free_port

pytestmark = pytest.mark.browser

# `sidecar demo` without its traffic loop (the cli's entry point, with one more option) and without a dashboard.
LAUNCH = """\
from gevent import monkey; monkey.patch_all()
import sys
from sidecar.config import Settings
from sidecar.demo import run_demo
sys.exit(run_demo(Settings.from_env(dev=True, port=int(sys.argv[1])), 0, False, with_traffic=False))
"""


class DemoProcess(ManagedProcess):
    stop_timeout = 20.0  # it stops its Celery worker with a warm shutdown

    def __init__(self, redis_url: str, log_dir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = child_env(redis_url, {"SIDECAR_DATA_DIR": log_dir / "demo-data"})
        super().__init__("demo", [sys.executable, "-c", LAUNCH, str(self.port)], env, log_dir / "demo.log")
        self.wait_until("the URLs printed", lambda: "sidecar demo is running" in self.log_text(), 30)

    def child_pids(self) -> dict[str, int]:
        return {name: int(pid) for name, pid in re.findall(r"(\w+) pid (\d+)", self.log_text())}


@pytest.fixture
def demo(redis_server, tmp_path) -> Iterator[DemoProcess]:
    proc = DemoProcess(redis_server.url, tmp_path)
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture
def page(browser, demo) -> Iterator[Any]:
    """A page, closed before the demo stops (it depends on it), so nothing reconnects during the shutdown."""
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    try:
        yield context.new_page()
    finally:
        context.close()


def test_the_demo_pages_three_scenarios_work_by_clicking_their_buttons(page, demo, redis_server, artifacts):
    errors: list[Any] = []
    page.on("pageerror", lambda exc: errors.append(exc))
    page.goto(f"{demo.url}/demo")
    page.wait_for_selector('#connection[data-status="open"]')
    assert page.get_attribute("#connection", "data-transport") == "ws"

    # A report: a live progress bar, then "ready" with the result.
    page.click("#start-report")
    card = page.wait_for_selector('.report[data-status="SUCCESS"]', timeout=30_000)
    assert "Ready: 1000 rows" in card.inner_text()
    assert page.evaluate("[...demo.reports.values()].map((r) => r.seen)") == [["STARTED", "PROGRESS", "SUCCESS"]]
    page.wait_for_function("document.querySelector('.report .bar > div').style.width === '100%'")
    page.screenshot(path=str(artifacts / "demo-report.png"), full_page=True)

    # The sprint: its card and every task change from ONE diff.
    page.click("#start-sprint")
    page.wait_for_function("document.querySelector('#sprint-card').dataset.completed !== ''", timeout=15_000)
    statuses = page.eval_on_selector_all("#sprint-tasks li", "items => items.map((li) => li.dataset.status)")
    assert statuses == ["completed"] * 4
    messages = page.evaluate("demo.sprintMessages")
    assert [m["event"] for m in messages] == ["sprint-created", "sprint-completed"]
    completed = messages[1]["diff"]
    assert completed["completed_date"] and sorted(completed["tasks"]) == ["t2", "t3", "t4"]
    page.screenshot(path=str(artifacts / "demo-sprint.png"), full_page=True)

    # A bulk import: 500 diffs in a burst, drawn once per frame.
    page.click("#start-import")
    page.wait_for_function("document.querySelector('#import-card').dataset.imported === '500'", timeout=15_000)
    page.wait_for_timeout(300)  # the progress bar's CSS transition, for the screenshot
    imported = page.evaluate("({ ...demo.imports, sub: null, frames: demo.renders - demo.imports.rendersAtStart })")
    assert imported["state"] == Publisher.from_url(redis_server.url).snapshot(imported["channel"]).state
    assert imported["published"] == 500  # every diff reached the page (some may share a frame: seq_from)
    assert imported["frames"] < imported["published"] / 5  # drawn far fewer times than it changed
    page.screenshot(path=str(artifacts / "demo-import.png"), full_page=True)

    counters = {k: int(page.inner_text(f"#count-{k}")) for k in ("messages", "frames", "published")}
    assert counters["published"] >= 500 + 4 and counters["frames"] >= counters["messages"] > 0
    assert not errors


def test_demo_stops_its_worker_by_pid_and_answers_bad_jobs_with_a_clear_404(demo):
    response = requests.post(f"{demo.url}/demo/jobs/nope", timeout=5)
    assert response.status_code == 404 and response.json()["error"] == "unknown-job"
    worker = demo.child_pids()["worker"]
    os.kill(worker, 0)  # running
    demo.stop()
    assert demo.returncode == 0
    with pytest.raises(ProcessLookupError):
        os.kill(worker, 0)
    assert "Traceback" not in demo.log_text()
