"""The dashboard in Chromium: `sidecar dashboard` serves it while traffic flows through a real sidecar; the test
reads the plotted data back from the page's Bokeh document and checks it against what was published.

The notebook runs top to bottom (nbclient) against the same kind of Redis, with stats in it.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
import requests

from dashboard.feed import read_records
from dashboard.sources import Window
from dashboard.whatif import compare
from sidecar.core.throttle import ChannelPolicy
from sidecar.publish import Publisher
from tests.clients import close_stream
from tests.processes import REPO_ROOT, ManagedProcess, child_env, free_port

pytestmark = pytest.mark.browser

ADMIN_KEY = "dashboard-test-admin-key-0123456789abcdef"
ALPHA, NOISE = "dash:alpha", "noise:42"  # patterns "dash:alpha" and "noise:*"

# The sum of a column of a named ColumnDataSource, and its length, as the page has them.
SOURCE_SUMS = """([name, columns]) => {
  const doc = window.Bokeh && Bokeh.documents[0];
  const src = doc && doc.get_model_by_name(name);
  if (!src) return null;
  const out = {n: src.data.t.length};
  for (const c of columns) out[c] = Array.from(src.data[c]).reduce((a, b) => a + (Number.isFinite(b) ? b : 0), 0);
  return out;
}"""


class DashboardProcess(ManagedProcess):
    """`sidecar dashboard` (it execs `panel serve dashboard/app.py`), ready when the page answers 200."""

    def __init__(self, redis_url: str, log_dir: Path, env: dict[str, str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/app"
        argv = [sys.executable, "-m", "sidecar", "dashboard", "--host", "127.0.0.1", "--port", str(self.port)]
        super().__init__("dashboard", argv, child_env(redis_url, env), log_dir / "dashboard.log", cwd=REPO_ROOT)
        self.wait_until("GET /app 200", self._up, 60.0)

    def _up(self) -> bool:
        # Each GET /app builds a whole Panel session: on a loaded machine a short timeout gave up on one still
        # being built and asked for another, piling sessions onto the server it waited for (CI: none in 30 s).
        try:
            return requests.get(self.url, timeout=15).status_code == 200
        except requests.RequestException:
            return False


@pytest.fixture
def dashboard_process(tmp_path: Path) -> Iterator[Callable[..., DashboardProcess]]:
    started: list[DashboardProcess] = []

    def start(redis_url: str, **env: str) -> DashboardProcess:
        started.append(DashboardProcess(redis_url, tmp_path, env))
        return started[-1]

    yield start
    for proc in started:
        proc.stop()
    for proc in started:  # no error in our code (tornado may log a socket the browser closed under it)
        ours = [tb for tb in proc.log_text().split("Traceback")[1:] if "/dashboard/" in tb]
        assert not ours, proc.log_tail(60)


class Subscriber:
    """A plain streaming GET /sse in a thread, counting `message` events."""

    def __init__(self, url: str, channel: str) -> None:
        self.messages = 0
        self._ready = threading.Event()
        self._response = requests.get(f"{url}/sse?channel={channel}&mode=event", stream=True, timeout=10)
        threading.Thread(target=self._read, daemon=True).start()
        assert self._ready.wait(5)

    def _read(self) -> None:
        try:
            for line in self._response.iter_lines():
                if line == b"event: ready":
                    self._ready.set()
                elif line == b"event: message":
                    self.messages += 1
        except (requests.RequestException, AttributeError):
            pass

    def close(self) -> None:
        close_stream(self._response)


def wait_for(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def sums(page: Any, name: str, *columns: str) -> dict[str, float] | None:
    return page.evaluate(SOURCE_SUMS, [name, list(columns)])


LABEL_TEXT = """(name) => {
  const m = Bokeh.documents[0].get_model_by_name(name);
  return m ? (m.visible ? m.text : "") : null;
}"""
WHATIF = """() => {
  const src = Bokeh.documents[0].get_model_by_name('whatif');
  return src && src.data.what.length ? {what: src.data.what, now: src.data.now, new: src.data.new, tags: src.tags}
                                     : null;
}"""
X_RANGE = "() => { const r = Bokeh.documents[0].get_model_by_name('x_range'); return [r.start, r.end]; }"


def old_records(client: redis.Redis, ago: float, n: int, pattern: str, per_record: int) -> None:
    """Records of a replica that ran ``ago`` seconds ago for ``n`` seconds and stopped: real records, as
    sidecar/stats.py writes them, to see what a time range leaves out."""
    now = time.time()
    for i in range(n):
        ts = round(now - ago + i + 1, 3)
        record = {"v": 1, "replica": "earlier:1", "host": "earlier", "pid": 1, "port": 8000, "ts": ts, "dt": 1.0,
                  "started": now - ago - 10, "reader": 1, "conn": {}, "slow": 0, "lat": [0] * 14,
                  "herd": {"pending": 0, "spread": 0.0}, "ch": {pattern: {"pub": per_record}}}  # fmt: skip
        if i == n - 1:
            record["stopped"] = 1
        client.xadd("rt:stats", {"r": orjson.dumps(record)}, id=f"{int(ts * 1000)}-0")


def test_the_dashboard_plots_the_traffic_filters_by_channel_and_changes_the_throttle(
    redis_server, sidecar_process, dashboard_process, browser, artifacts
):
    client = redis.Redis.from_url(redis_server.url)
    old_records(client, ago=480, n=10, pattern="earlier:*", per_record=5)  # 50 messages, 8 minutes ago
    sidecar = sidecar_process(redis_server.url, SIDECAR_ADMIN_KEY=ADMIN_KEY, SIDECAR_KEEPALIVE="1",
                              SIDECAR_STATS_PATTERNS=f"{ALPHA},noise:*")  # fmt: skip
    dash = dashboard_process(redis_server.url, SIDECAR_URL=sidecar.url, SIDECAR_ADMIN_KEY=ADMIN_KEY)
    page = browser.new_page(viewport={"width": 1400, "height": 1900}, accept_downloads=True)
    subscriber = None
    try:
        page.goto(dash.url)
        page.wait_for_function("() => window.Bokeh && Bokeh.documents.length && Bokeh.documents[0]"
                               ".get_model_by_name('rates')", timeout=20_000)  # fmt: skip
        page.get_by_text("1 sidecar replica reporting, 1 stopped").wait_for(timeout=10_000)

        # Empty states say why a plot is empty, and what to do.
        assert "open" in page.evaluate(LABEL_TEXT, "empty-latency") and "/demo" in page.evaluate(
            LABEL_TEXT, "empty-latency"
        )
        assert page.evaluate(LABEL_TEXT, "empty-connections").startswith("No client connected")
        assert page.evaluate(LABEL_TEXT, "empty-rates") == ""  # the earlier replica's 50 messages
        page.get_by_text("No policy set by ops").wait_for(timeout=5_000)  # ... and the settings' policy, as a table
        page.get_by_text("queue_frames", exact=True).wait_for(timeout=5_000)
        page.screenshot(path=str(artifacts / "dashboard-empty.png"), full_page=True)

        # Traffic while the page is open: 40 messages on ALPHA (one subscriber) and 20 on NOISE (none), over 1 s.
        subscriber = Subscriber(sidecar.url, ALPHA)
        pub = Publisher.from_url(redis_server.url)
        first = sums(page, "rates", "published")
        assert first is not None
        for i in range(40):
            pub.event(ALPHA, "tick", {"i": i})
            if i % 2:
                pub.event(NOISE, "tick")
            time.sleep(0.025)
        wait_for(lambda: subscriber.messages == 40, 5, "the deliveries")

        # The plotted seconds add up to what was published and delivered, once they have settled: in the
        # 15 minutes shown first, with the earlier replica's 50.
        def settled(published: float) -> Callable[[], dict[str, float] | None]:
            def check() -> dict[str, float] | None:
                got = sums(page, "rates", "published", "delivered")
                ok = got and abs(got["published"] - published) < 1e-3 and abs(got["delivered"] - 40) < 1e-3
                return got if ok else None

            return check

        last = wait_for(settled(110), 10, "the plotted rates to add up to 110 published, 40 delivered")
        # The top channels table (the last 10 s): both patterns, while their traffic is in it (NOISE has no
        # subscriber, so its row goes once its messages are older than that).
        page.get_by_text(ALPHA, exact=True).first.wait_for(timeout=5_000)
        page.get_by_text("noise:*", exact=True).first.wait_for(timeout=5_000)
        assert last["n"] > first["n"]  # the series grew while the page was open (stream(), one point a second)
        start, end = page.evaluate(X_RANGE)
        assert end - start == 900_000
        latency = sums(page, "latency", "p50", "p99")
        assert latency is not None and latency["p99"] >= latency["p50"] > 0
        assert page.evaluate(LABEL_TEXT, "empty-latency") == ""
        assert sums(page, "connections", "sse")["sse"] >= 1

        # The time range: 5 minutes leaves the earlier replica out of the plot, and the x axis shows 5 minutes.
        page.get_by_role("button", name="5 min", exact=True).click()
        wait_for(settled(60), 5, "the 5-minute view to hold only this run's 60 messages")
        start, end = page.evaluate(X_RANGE)
        assert end - start == 300_000

        # Pause freezes the plots (the x range too); Resume catches up.
        page.get_by_role("button", name="Pause").click()
        page.get_by_role("button", name="Resume").wait_for(timeout=5_000)
        frozen = page.evaluate(X_RANGE)
        time.sleep(2.5)
        assert page.evaluate(X_RANGE) == frozen
        page.get_by_role("button", name="Resume").click()
        wait_for(lambda: page.evaluate(X_RANGE)[1] > frozen[1], 5, "the plots to move again")

        # CSV of what a plot shows.
        with page.expect_download() as download:
            page.get_by_role("button", name="CSV: rates").click()
        csv = Path(download.value.path()).read_text().splitlines()
        assert csv[0] == "time,published,delivered"
        assert sum(float(line.split(",")[1]) for line in csv[1:]) == pytest.approx(60)

        # A click on a channel filters the plots to it.
        page.get_by_text(ALPHA, exact=True).first.click()
        filtered = wait_for(lambda: (s := sums(page, "rates", "published")) and abs(s["published"] - 40) < 1e-3 and s,
                            5, "the filtered plot")  # fmt: skip
        assert filtered["published"] == pytest.approx(40)

        # The throttle: the admin key enables the controls; the what-if shows what the edited rule would have
        # done over the recorded traffic, and matches the replay of the same records here.
        page.get_by_placeholder("sprint:*").fill("dash:*")
        page.get_by_placeholder("sprint:*").press("Tab")
        body = page.get_by_placeholder("poke_floor")
        body.fill('{"window": 0.25}')
        body.press("Tab")
        shown = wait_for(lambda: (w := page.evaluate(WHATIF)) and w["tags"][0]["rule"]["window"] == 0.25 and w, 5,
                         "the what-if of the edited rule")  # fmt: skip
        span = shown["tags"][0]
        assert span["labels"] == [ALPHA]
        window = Window(span=3600, stale_after=5.0)
        window.add(read_records(client, "rt:stats"))
        points = window.series(span["start"], span["end"], frozenset(span["labels"]))
        assert sum(p.published for p in points) == pytest.approx(40)
        expected = compare(points, ChannelPolicy(), ChannelPolicy(window=0.25))
        assert list(zip(shown["what"], shown["now"], shown["new"])) == expected
        frames_now, frames_new = (float(v) for v in expected[0][1:])
        assert frames_new < frames_now  # 20 messages/s into a 0.25 s window: about 4 frames/s, not 20
        shown_cell = page.locator(".tabulator-cell", has_text=expected[3][2])  # the table on screen shows it too
        shown_cell.first.wait_for(timeout=5_000)
        page.screenshot(path=str(artifacts / "dashboard-whatif.png"), full_page=True)

        # Apply goes through PUT /admin/throttle; success and failure look different.
        page.get_by_role("button", name="Apply").click()
        page.locator(".alert-success", has_text="Policy changed").wait_for(timeout=5_000)
        page.get_by_text("dash:*", exact=True).first.wait_for(timeout=5_000)  # the policy table shows it
        doc = orjson.loads(client.hget("rt:throttle", "doc"))
        assert doc["channels"]["dash:*"]["window"] == 0.25
        page.get_by_text("set by ops at").wait_for(timeout=5_000)
        body.fill('{"window": 99}')
        body.press("Tab")
        time.sleep(0.3)  # let the widgets' values reach the server before the click
        page.get_by_role("button", name="Apply").click()
        page.locator(".alert-danger", has_text="Not changed").wait_for(timeout=5_000)
        page.screenshot(path=str(artifacts / "dashboard.png"), full_page=True)
    finally:
        page.close()
        if subscriber is not None:
            subscriber.close()


def test_the_notebook_runs_top_to_bottom_against_redis_with_stats(redis_server, sidecar_process, monkeypatch):
    import nbclient
    import nbformat

    # A short keepalive: the sidecar sees the subscriber leave (and lets go of it) at once.
    sidecar = sidecar_process(redis_server.url, SIDECAR_STATS_INTERVAL="0.2", SIDECAR_KEEPALIVE="0.5")
    subscriber = Subscriber(sidecar.url, ALPHA)
    pub = Publisher.from_url(redis_server.url)
    for i in range(10):
        pub.event(ALPHA, "tick", {"i": i})
    wait_for(lambda: subscriber.messages == 10, 5, "the deliveries")
    time.sleep(0.5)  # a couple of records after the traffic
    subscriber.close()

    monkeypatch.setenv("REDIS_URL", redis_server.url)
    notebook = nbformat.read(REPO_ROOT / "dashboard" / "notebook.ipynb", as_version=4)
    client = nbclient.NotebookClient(
        notebook, timeout=60, kernel_name="python3", resources={"metadata": {"path": str(REPO_ROOT / "dashboard")}}
    )
    client.execute()  # raises CellExecutionError on any failing cell

    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    dashboard_html = [o for o in outputs if "application/vnd.holoviews_exec.v0+json" in o.get("data", {})]
    assert dashboard_html, "the dashboard cell displayed nothing"
    frame = notebook.cells[-1].outputs[-1]["data"]["text/plain"]
    assert "published" in frame and "replica" in frame
    # The p99 per pattern (v2 records' per-pattern histograms) and per stage.
    cell = next(c for c in notebook.cells if c.get("id") == "p99-pattern")
    shown = [o["data"]["text/plain"] for o in cell.outputs if "text/plain" in o.get("data", {})]
    assert len(shown) == 3 and "p99_ms" in shown[0] and "*" in shown[0], shown
    assert "lat" in shown[1] and "read" in shown[1] and "queue" in shown[1], shown
