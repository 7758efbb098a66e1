"""The dashboard's v2 views in Chromium, read back from the page's Bokeh document: stage latencies, the heatmap,
admission, queue depth, the fleet tables and the policy-change markers.

The records are real v2 records (the agreed format, docs/dashboard.md "The stats record") written to a real
Redis by two simulated replicas and one simulated publisher, one record each per second while the page is open,
so every plotted figure can be compared with what was written. The same views with a real sidecar's traffic
are in tests/browser/test_dashboard.py.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis

from dashboard.sources import N_BUCKETS, percentile
from sidecar.stats import LATENCY_BOUNDS_MS
from tests.browser.test_dashboard import X_RANGE, DashboardProcess, wait_for

pytestmark = pytest.mark.browser

REPLICAS = ("web-1:11", "web-2:12")
BACKLOG = 20  # seconds of records written before the page opens


def hist(**buckets: int) -> list[int]:
    counts = [0] * N_BUCKETS
    for name, n in buckets.items():
        counts[LATENCY_BOUNDS_MS.index(float(name[1:].replace("_", ".")))] = n
    return counts


READ, HELD, QUEUE, LAT = hist(b1=8), hist(b200=2), hist(b2=6), hist(b5=5, b500=1)
ACK = hist(b0_5=9, b2=1)
ADM = {"ok": 3, "defer": 2, "rej": 1, "tries": 6, "level": 4.0, "rate": 5, "burst": 10}
QD = [4, 1, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0]  # 4 empty queues, one with 1 frame, one with 201-500


def relay_record(replica: str, ts: int, started: float) -> dict[str, Any]:
    i = REPLICAS.index(replica)
    return {
        "v": 2, "replica": replica, "host": replica.split(":")[0], "pid": 11 + i, "port": 8000, "ts": ts, "dt": 1.0,
        "started": started, "reader": 1, "conn": {"sse": 4, "ws": 2}, "slow": 0, "lat": LAT,
        "herd": {"pending": 0, "spread": 0.0}, "front": "gevent", "version": "0.1.0",
        "stage": {"read": READ, "held": HELD, "queue": QUEUE},
        "shards": {"0": {"lag": 2.0 + 10 * i, "reconn": 0}, "1": {"lag": 1.0, "reconn": 0}},
        "adm": ADM, "qd": QD, "stuck": 0,
        "slowest": [{"t": "ws", "ch": 2 + i, "qb": 40_000 + i, "qf": 300, "age": 12.0}],
        "ch": {"orders:*": {"pub": 20, "dlv": 4, "coal": 16, "win": 2, "subs": 1, "lat": LAT,
                            "modes": {"event": 1, "diff": 0, "state": 0, "poke": 0}}},
    }  # fmt: skip


class Writers:
    """Two replicas and a publisher writing one v2 record each per second (whole seconds), in a thread."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self.started = time.time() - BACKLOG - 10
        self._stop = threading.Event()
        now = int(time.time())
        for ts in range(now - BACKLOG, now + 1):
            self.write(ts)
        self.last = now
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def write(self, ts: int) -> None:
        for n, replica in enumerate(REPLICAS):
            record = orjson.dumps(relay_record(replica, ts, self.started))
            self.client.xadd("rt:stats", {"r": record}, id=f"{ts * 1000}-{n}")
        pub = {"v": 2, "kind": "pub", "replica": "worker:7", "host": "worker", "pid": 7, "ts": ts, "dt": 1.0,
               "n": 10, "ack": ACK}  # fmt: skip
        self.client.xadd("rt:stats", {"r": orjson.dumps(pub)}, id=f"{ts * 1000}-9")

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            now = int(time.time())
            while self.last < now:
                self.last += 1
                self.write(self.last)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)


@pytest.fixture
def dashboard(tmp_path: Path, redis_server) -> Iterator[Callable[..., DashboardProcess]]:
    started: list[DashboardProcess] = []

    def start(**env: str) -> DashboardProcess:
        started.append(DashboardProcess(redis_server.url, tmp_path, env))
        return started[-1]

    yield start
    for proc in started:
        proc.stop()
    for proc in started:
        ours = [tb for tb in proc.log_text().split("Traceback")[1:] if "/dashboard/" in tb]
        assert not ours, proc.log_tail(60)


COLUMNS = """([name, columns]) => {
  const src = window.Bokeh && Bokeh.documents.length && Bokeh.documents[0].get_model_by_name(name);
  if (!src) return null;
  const out = {};
  for (const c of columns) out[c] = Array.from(src.data[c]);
  return out;
}"""


MARKER_AT = """() => {
  const marker = [...Bokeh.documents[0].all_models].find(m => m.name === 'policy-marker');
  const view = Bokeh.index.find_one(marker), plot = view.parent, box = plot.canvas_view.el.getBoundingClientRect();
  const sx = view.coordinates.x_scale.compute(marker.data_source.data.t[0]);
  return [box.left + sx, box.top + plot.frame.bbox.top + plot.frame.bbox.height / 2];
}"""  # the page position of the first policy marker, halfway down its chart


def columns(page: Any, name: str, *cols: str) -> dict[str, list[Any]]:
    return page.evaluate(COLUMNS, [name, list(cols)])


def full_seconds(data: dict[str, list[Any]], column: str) -> list[Any]:
    """The column's values in the seconds every writer covered (the backlog's first second has none)."""
    return [v for v in data[column] if v is not None and v == v and v != 0][1:]


def test_the_v2_views_show_what_the_replicas_and_publishers_recorded(redis_server, dashboard, browser, artifacts):
    client = redis.Redis.from_url(redis_server.url)
    changes = [(time.time() - 12, "ops-anna", "orders:* window 0 -> 0.25 s"),
               (time.time() - 6, "ops-bo", "admit_rate 0 -> 5")]  # fmt: skip
    for at, who, what in changes:
        client.xadd("rt:policy:log", {"at": f"{at:.3f}", "who": who, "what": what, "policy": "{}"})
    writers = Writers(client)
    dash = dashboard()
    page = browser.new_page(viewport={"width": 1400, "height": 3600})
    try:
        page.goto(dash.url)
        page.wait_for_function("() => window.Bokeh && Bokeh.documents.length && Bokeh.documents[0]"
                               ".get_model_by_name('stages')", timeout=20_000)  # fmt: skip
        page.get_by_text("2 sidecar replicas reporting").wait_for(timeout=10_000)

        # Where the time goes: each stage's p99 per second is the p99 of both replicas' summed histograms.
        def stages() -> dict[str, list[Any]] | None:
            data = columns(page, "stages", "t", "read_p99", "held_p99", "queue_p99", "lat_p99", "ack_p99", "lag")
            return data if data and len(full_seconds(data, "read_p99")) >= 5 else None

        data = wait_for(stages, 10, "five seconds of stage latencies")
        for stage, counts in (("read", READ), ("held", HELD), ("queue", QUEUE), ("lat", LAT), ("ack", ACK)):
            expected = percentile([2 * n for n in counts] if stage != "ack" else counts, 99)
            shown = full_seconds(data, f"{stage}_p99")
            assert shown == pytest.approx([expected] * len(shown)), stage
        assert set(full_seconds(data, "lag")) == {12.0}  # the worst shard of the worst replica

        # The heatmap: both replicas' writes per second and bucket.
        heat = columns(page, "heatmap", "bucket", "count")
        cells = {(b, c) for b, c in zip(heat["bucket"], heat["count"])}
        assert ("\u22645", 10.0) in cells and ("\u2264500", 2.0) in cells

        # What the throttle did: per replica 20 messages in; 4 sent at once and 2 windows sent ("win", the two
        # "held" observations): 6 frames out.
        ratio = full_seconds(columns(page, "throttle", "ratio"), "ratio")
        assert ratio == pytest.approx([20 / 6] * len(ratio)) and ratio
        adm = columns(page, "admission", "admitted", "deferred", "rejected", "attempts", "bucket")
        for column, per_second in (("admitted", 6), ("deferred", 4), ("rejected", 2), ("attempts", 12),
                                   ("bucket", 8)):  # fmt: skip
            shown = full_seconds(adm, column)
            assert shown == pytest.approx([per_second] * len(shown)) and shown, column

        # Connections that struggle: 12 connections, p50 0 frames, p99 in (200, 500]; the slowest first.
        queues = columns(page, "queues", "p50", "p99")
        shown = full_seconds(queues, "p99")
        assert shown == pytest.approx([200 + 300 * (11.88 - 10) / 2] * len(shown)) and shown
        page.get_by_text("40,001", exact=True).wait_for(timeout=5_000)

        # Fleet: front and version per replica, one row per shard.
        page.get_by_text("gevent", exact=True).first.wait_for(timeout=5_000)
        page.get_by_text("web-2:12", exact=True).first.wait_for(timeout=5_000)

        # Policy changes: markers on every time chart, and the history table.
        marks = wait_for(lambda: (c := columns(page, "changes", "who", "what", "t")) and c["who"] and c, 10,
                         "the policy-change markers")  # fmt: skip
        assert marks["who"] == ["ops-anna", "ops-bo"] and marks["what"][1] == "admit_rate 0 -> 5"
        assert marks["t"][0] == pytest.approx(changes[0][0] * 1000, abs=1)
        when = columns(page, "changes", "when")["when"]
        assert when == [time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(at)) for at, _, _ in changes]
        # Hovering a marker says who, what and when (a hover tool on each chart's markers): the mouse on the first
        # marker of the first chart shows its time, written nowhere else on the page.
        hovers = page.evaluate("""() => [...Bokeh.documents[0].all_models].filter(m => m.name === 'policy-hover')
            .map(h => [h.tooltips.map(t => t.join(' ')).join('; '), h.renderers.map(r => r.name).join()])""")
        assert len(hovers) == 11 and set(map(tuple, hovers)) == {("who @who; what @what; when @when", "policy-marker")}
        assert page.get_by_text(when[0], exact=True).count() == 0
        page.mouse.move(*page.evaluate(MARKER_AT))
        page.get_by_text(when[0], exact=True).first.wait_for(timeout=5_000)
        page.get_by_text("orders:* window 0 -> 0.25 s", exact=True).first.wait_for(timeout=5_000)
        page.screenshot(path=str(artifacts / "dashboard-v2.png"), full_page=True)
    finally:
        page.close()
        writers.stop()


# -- with real traffic through a real sidecar ---------------------------------------------------------------
ADMIN_KEY = "dashboard-v2-test-admin-key-0123456789abcdef"
WINDOW = 0.5  # the coalescing window the test sets through the page
MESSAGES, SPACING = 30, 0.1  # published on win:a, one every SPACING s: 3 s of traffic
STORM = 10  # SSE connections opened at once against admit_rate 1, admit_burst 3


def sums_of(page: Any, name: str, *cols: str) -> dict[str, float]:
    data = columns(page, name, *cols)
    return {c: sum(v for v in data[c] if v is not None and v == v) for c in cols}


def test_real_traffic_shows_stages_the_windows_coalescing_the_storms_admission_and_the_pages_change(
    redis_server, sidecar_process, dashboard, browser, artifacts
):
    import requests

    from dashboard.feed import read_records
    from sidecar.publish import Publisher
    from tests.browser.test_dashboard import Subscriber

    client = redis.Redis.from_url(redis_server.url)
    sidecar = sidecar_process(redis_server.url, SIDECAR_ADMIN_KEY=ADMIN_KEY, SIDECAR_KEEPALIVE="1",
                              SIDECAR_STATS_PATTERNS="win:*")  # fmt: skip
    dash = dashboard(SIDECAR_URL=sidecar.url, SIDECAR_ADMIN_KEY=ADMIN_KEY)
    page = browser.new_page(viewport={"width": 1400, "height": 3600})
    subscriber = None
    try:
        page.goto(dash.url)
        page.wait_for_function("() => window.Bokeh && Bokeh.documents.length && Bokeh.documents[0]"
                               ".get_model_by_name('changes')", timeout=20_000)  # fmt: skip
        page.get_by_text("1 sidecar replica reporting").wait_for(timeout=10_000)

        # A policy change made through the page: a marker on the charts, with who and what.
        page.get_by_placeholder("sprint:*").fill("win:*")
        page.get_by_placeholder("sprint:*").press("Tab")
        body = page.get_by_placeholder("poke_floor")
        body.fill(f'{{"window": {WINDOW}}}')
        body.press("Tab")
        time.sleep(0.3)  # the widgets' values reach the server before the click
        page.get_by_role("button", name="Apply").click()
        page.locator(".alert-success", has_text="Policy changed").wait_for(timeout=10_000)
        marks = wait_for(lambda: (c := columns(page, "changes", "who", "what", "t")) and c["who"] and c, 10,
                         "the page's change as a marker")  # fmt: skip
        assert marks["who"] == ["admin"] and "win:*" in marks["what"][0] and "0.5" in marks["what"][0]
        assert abs(marks["t"][0] / 1000 - time.time()) < 15
        time.sleep(1.5)  # every replica applies a policy within a second

        # Traffic: 30 messages into the 0.5 s window of one event-mode subscriber.
        subscriber = Subscriber(sidecar.url, "win:a")
        pub = Publisher.from_url(redis_server.url)
        began = time.time()
        for i in range(MESSAGES):
            pub.event("win:a", "tick", {"i": i})
            time.sleep(SPACING)
        took = time.time() - began
        wait_for(lambda: subscriber.messages == MESSAGES, 5, "every message (event mode batches, drops nothing)")

        # The storm: admission at 1/s after a burst of 3, set through the admin API.
        headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
        doc = requests.get(f"{sidecar.url}/admin/throttle", headers=headers, timeout=5).json()["policy"]
        doc.update(admit_rate=1, admit_burst=3)
        assert requests.put(f"{sidecar.url}/admin/throttle", json=doc, headers=headers, timeout=5).ok
        time.sleep(1.5)
        statuses = []
        for _ in range(STORM):
            response = requests.get(f"{sidecar.url}/sse?channel=storm:x", stream=True, timeout=5)
            statuses.append(response.status_code)
            response.close()
        admitted, deferred = statuses.count(200), statuses.count(503)
        assert admitted + deferred == STORM and 0 < admitted < STORM

        # Admission as plotted: every connection this test opened (the subscriber's too), as the sidecar
        # answered them.
        def admission() -> dict[str, float] | None:
            got = sums_of(page, "admission", "admitted", "deferred", "rejected", "attempts")
            ok = got["admitted"] == pytest.approx(admitted + 1) and got["deferred"] == pytest.approx(deferred)
            return got if ok else None

        got = wait_for(admission, 15, f"{admitted + 1} admitted and {deferred} deferred on the admission chart")
        assert got["rejected"] == 0 and got["attempts"] == pytest.approx(STORM + 1)
        level = [v for v in columns(page, "admission", "bucket")["bucket"] if v == v]
        assert max(level) <= 3  # the bucket never holds more than its burst

        # The coalescing as plotted is the records' (messages in / frames out), and what a 0.5 s window
        # allows: at most one frame per window, the first at once.
        # Frames out: the messages sent at once (not coalesced) and the windows flushed, as the records count them
        # per pattern ("win").
        records = [r for r in read_records(client, "rt:stats") if r.kind == "relay"]
        pub_n = sum(r.channels.get("win:*", {}).get("pub", 0) for r in records)
        coal = sum(r.channels.get("win:*", {}).get("coal", 0) for r in records)
        flushed = sum(r.channels.get("win:*", {}).get("win", 0) for r in records)
        shown = sums_of(page, "throttle", "messages_in", "frames_out")
        assert shown["messages_in"] == pytest.approx(pub_n) and pub_n == MESSAGES
        assert flushed and shown["frames_out"] == pytest.approx(pub_n - coal + flushed)
        # At most one frame per window from the first message to the last one's window end.
        assert took / WINDOW - 1 <= shown["frames_out"] <= (took + WINDOW) / WINDOW + 1

        # Where the time goes: every stage has latencies, and no frame was held longer than a window allows
        # (its histogram bucket's upper bound).
        def stages() -> dict[str, list[Any]] | None:
            data = columns(page, "stages", "read_p99", "held_p99", "queue_p99", "lat_p99", "ack_p99")
            have = {c: [v for v in vs if v == v and v is not None] for c, vs in data.items()}
            return have if all(have.values()) else None

        have = wait_for(stages, 10, "every stage's latency on the chart")
        assert max(have["held_p99"]) <= 1000 and max(have["lat_p99"]) >= max(have["read_p99"])
        page.get_by_text("gevent", exact=True).first.wait_for(timeout=5_000)  # the replica's front
        page.get_by_text("none has bytes queued now").wait_for(timeout=5_000)  # an empty table says why
        page.get_by_role("button", name="5 min", exact=True).click()
        wait_for(lambda: (r := page.evaluate(X_RANGE)) and r[1] - r[0] == 300_000, 5, "the 5-minute view")
        page.screenshot(path=str(artifacts / "dashboard-traffic.png"), full_page=True)
    finally:
        page.close()
        if subscriber is not None:
            subscriber.close()
