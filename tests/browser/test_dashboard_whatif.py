"""The dashboard's throttle editor used fast: a rule typed and Apply clicked at once, as a person pasting a rule
does. Panel runs a click that comes while a typed value is still pending (its 50 ms debounce) in a task of its
own, outside the Bokeh document lock: a Bokeh model of ours changed there (the what-if's source, the charts'
limits, the change markers) raised "_pending_writes should be non-None", and that update never reached the page.
"""

from __future__ import annotations

import time

import orjson
import redis

from dashboard.policy import read_policy
from sidecar.publish import Publisher
from tests.browser import test_dashboard as on_dashboard
from tests.browser.test_dashboard import ADMIN_KEY, WHATIF, wait_for

dashboard_process = on_dashboard.dashboard_process  # the fixture, by this name
PATTERN = "fast:*"


def test_a_rule_typed_and_applied_at_once_shows_its_what_if_and_changes_the_policy_without_an_error(
    redis_server, sidecar_process, dashboard_process, browser
):
    sidecar = sidecar_process(redis_server.url, SIDECAR_ADMIN_KEY=ADMIN_KEY, SIDECAR_STATS_PATTERNS=PATTERN)
    dash = dashboard_process(redis_server.url, SIDECAR_URL=sidecar.url, SIDECAR_ADMIN_KEY=ADMIN_KEY)
    pub = Publisher.from_url(redis_server.url)
    page = browser.new_page(viewport={"width": 1400, "height": 1900})
    try:
        for i in range(30):  # traffic under the pattern, so that the what-if has something to replay
            pub.event("fast:1", "tick", {"i": i})
            time.sleep(0.05)
        page.goto(dash.url)
        page.wait_for_function("() => window.Bokeh && Bokeh.documents.length && Bokeh.documents[0]"
                               ".get_model_by_name('whatif')", timeout=20_000)  # fmt: skip
        page.get_by_text("1 sidecar replica reporting").wait_for(timeout=10_000)
        pattern, body = page.get_by_placeholder("sprint:*"), page.get_by_placeholder("poke_floor")
        for window in (0.25, 0.5, 0.75):
            pattern.fill(PATTERN)
            body.fill(orjson.dumps({"window": window}).decode())
            page.get_by_role("button", name="Apply").click()  # its blur sends the body's value just before
            shown = wait_for(lambda w=window: (s := page.evaluate(WHATIF)) and s["tags"][0]["rule"]["window"] == w,
                             10, f"the what-if of window {window}")  # fmt: skip
            assert shown
        page.locator(".alert-success", has_text="Policy changed").wait_for(timeout=5_000)
        stored = read_policy(redis.Redis.from_url(redis_server.url), "rt:throttle").doc
        assert stored is not None and stored["channels"][PATTERN]["window"] == 0.75
        assert "_pending_writes" not in dash.log_text(), dash.log_tail(60)
    finally:
        page.close()
        pub.close()
