"""tests/vectors/protocol.json against realtime.js in Chromium: the same cases as the Python client's
(tests/unit/test_stream.py), run through realtime.js's exported `SseParser` and `ChannelTracker`.

No server: Playwright serves a blank page and the module from the worktree; the adapter below feeds each case
and returns what the client handed over, and the assertions are made here, in the same terms as the Python ones.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import orjson
import pytest

from tests.processes import REPO_ROOT

pytestmark = pytest.mark.browser

VECTORS = orjson.loads((REPO_ROOT / "tests" / "vectors" / "protocol.json").read_bytes())
ORIGIN = "http://vectors.test"

ADAPTER = """<!doctype html><meta charset="utf-8"><title>vectors</title><link rel="icon" href="data:,">
<script type="module">
import { ChannelTracker, SseParser } from "/static/realtime.js";

const bytesOf = (text) => new TextEncoder().encode(text);

window.runSse = (c, bytewise) => {
  let events = [];
  const parser = new SseParser((type, data) => events.push([type, data]));
  const steps = c.steps.map((step) => {
    events = [];
    const bytes = bytesOf(step.in);
    if (bytewise) for (let i = 0; i < bytes.length; i++) parser.push(bytes.subarray(i, i + 1));
    else parser.push(bytes);
    return events;
  });
  return { steps, retry: parser.retry, last_event_id: parser.lastEventId };
};

const handedOver = (f) => {
  if (f.type === "message") return { type: f.type, channel: f.channel, id: f.id };
  const keys = ["type", "channel", "id", "seq", "epoch", "state", "reason"];
  return Object.fromEntries(keys.filter((k) => k in f).map((k) => [k, f[k]]));
};

window.runTracker = (c) => {
  const trackers = new Map(c.channels.map((name) => [name, new ChannelTracker(name, c.mode)]));
  const feed = (f) => {
    const t = trackers.get(f.channel);
    return t ? t.frame(f).map((out) => [t, out]) : [];
  };
  let fromSse = [];
  const parser = new SseParser((type, data) => fromSse.push(...feed({ type, ...JSON.parse(data) })));
  return c.steps.map((step) => {
    let frames;
    if ("pulled" in step) {
      const t = trackers.get(step.pulled);
      frames = t.pulled(step.answer).map((out) => [t, out]);
    } else if ("frame" in step) frames = feed(step.frame);
    else {
      fromSse = [];
      parser.push(bytesOf(step.sse));
      frames = fromSse;
    }
    for (const [t, f] of frames) t.apply(f);
    const channels = {};
    for (const [name, t] of trackers) {
      channels[name] = { id: t.id ?? "0-0", seq: t.seq, epoch: t.epoch, state: t.state ?? null, stale: t.stale };
    }
    return { out: frames.map(([, f]) => handedOver(f)), channels };
  });
};
window.adapterReady = true;
</script>"""


@pytest.fixture(scope="module")
def page(browser: Any) -> Iterator[Any]:
    page = browser.new_page()
    errors: list[Exception] = []
    page.on("pageerror", lambda exc: errors.append(exc))
    js = (REPO_ROOT / "sidecar" / "static" / "realtime.js").read_text()
    page.route(f"{ORIGIN}/vectors", lambda route: route.fulfill(content_type="text/html", body=ADAPTER))
    page.route(f"{ORIGIN}/static/realtime.js", lambda route: route.fulfill(content_type="text/javascript", body=js))
    page.goto(f"{ORIGIN}/vectors")
    page.wait_for_function("window.adapterReady === true")
    yield page
    assert not errors
    page.close()


def name(case: dict) -> str:
    return case["name"]


@pytest.mark.parametrize("bytewise", [False, True], ids=["whole", "bytewise"])
@pytest.mark.parametrize("case", VECTORS["sse"], ids=name)
def test_sse_vectors(page: Any, case: dict, bytewise: bool) -> None:
    got = page.evaluate("([c, bytewise]) => runSse(c, bytewise)", [case, bytewise])
    assert got["steps"] == [step["events"] for step in case["steps"]]
    if "retry" in case:
        assert got["retry"] == case["retry"]
    if "last_event_id" in case:
        assert got["last_event_id"] == case["last_event_id"]


@pytest.mark.parametrize("case", VECTORS["tracker"], ids=name)
def test_tracker_vectors(page: Any, case: dict) -> None:
    got = page.evaluate("(c) => runTracker(c)", case)
    for i, (step, result) in enumerate(zip(case["steps"], got, strict=True)):
        assert result["out"] == step["out"], f"step {i}"
        for channel, want in step.get("expect", {}).items():
            assert result["channels"][channel] == want, f"step {i}"
