"""realtime.js in Chromium through Debian's nginx, running the shipped config, in front of three sidecar replicas.

nginx serves the harness page itself (one origin for the page, its WebSocket and its streams, as a site would
serve its pages beside the relay); everything else goes to the replicas, with no stickiness.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests

from sidecar.publish import Publisher
from tests.browser.test_realtime_js import (
    HARNESS,
    all_open,
    assert_applied_once_in_order,
    random_patch,
    report,
    until,
)
from tests.nginx import NginxProcess

pytestmark = [pytest.mark.browser, pytest.mark.slow]


@pytest.fixture
def proxy(browser, sidecar_process, tmp_path: Path) -> Iterator[Callable[[list[int]], NginxProcess]]:
    """Factory: nginx in front of the given replica ports, serving the harness at /harness. At teardown the pages
    close first (no client reconnects while the replicas stop), then nginx."""
    started: list[NginxProcess] = []

    def start(backends: list[int]) -> NginxProcess:
        proc = NginxProcess(backends, tmp_path, pages={"/harness": HARNESS})
        started.append(proc)
        return proc

    yield start
    for context in browser.contexts:
        context.close()
    for proc in started:
        proc.stop()


def connections(replica: object) -> int:
    return int(requests.get(replica.url + "/healthz", timeout=2).json()["connections"])  # type: ignore[attr-defined]


def test_page_resumes_exactly_through_nginx_when_its_replicas_are_killed_mid_stream(
    browser, redis_server, sidecar_process, proxy
):
    replicas = [sidecar_process(redis_server.url, SIDECAR_SSE_RETRY_MS="200") for _ in range(3)]
    nginx = proxy([r.port for r in replicas])
    pub = Publisher.from_url(redis_server.url)
    page = browser.new_page()
    page.errors = []
    page.on("pageerror", lambda exc: page.errors.append(exc))
    page.goto(f"{nginx.url}/harness")
    page.wait_for_function("window.harnessReady === true")
    page.evaluate(
        """() => {
          client("ws", {}); client("sse", { transports: ["sse"] });
          for (const c of ["ws", "sse"]) { track(c, "px:state", "diff"); track(c, "px:events", "diff"); }
        }"""
    )
    until(page, lambda: all_open(page), what="both clients open")
    until(page, lambda: report(page, "sse px:events")["position"] is not None, what="subscribed")
    # One WebSocket, and one SSE stream for both channels (its Last-Event-ID cursor holds both positions).
    until(page, lambda: sum(connections(r) for r in replicas) == 2, what="two connections on the replicas")
    rng, count = random.Random(13), 400
    done = threading.Event()

    def publish() -> None:
        for i in range(count):
            pub.diff("px:state", "changed", random_patch(rng))
            pub.event("px:events", "tick", i)
            time.sleep(0.005)
        done.set()

    threading.Thread(target=publish, daemon=True).start()
    until(page, lambda: len(report(page, "ws px:events")["events"]) > 50, what="the stream under way")
    # The replicas the page is on (found by their connections), killed mid-stream as a crash would; with two
    # connections on three replicas one replica always survives.
    victims = [r for r in replicas if connections(r) > 0]
    assert 1 <= len(victims) <= 2
    for victim in victims:
        victim.kill()
        victim.allow_tracebacks = True
    until(page, done.is_set, timeout=30, what="the publisher")
    final = pub.snapshot("px:state")
    assert final is not None

    def caught_up() -> bool:
        return all(
            report(page, f"{c} px:state")["state"] == final.state
            and len(report(page, f"{c} px:events")["events"]) >= count
            for c in ("ws", "sse")
        )

    until(page, caught_up, timeout=30, what="both clients caught up through the proxy")
    page.wait_for_timeout(300)  # a duplicate would arrive now
    survivors = [r for r in replicas if r not in victims]
    assert sum(connections(r) for r in survivors) == 2  # both came back through nginx, on the survivors
    for name in ("ws", "sse"):
        state, events = report(page, f"{name} px:state"), report(page, f"{name} px:events")
        assert_applied_once_in_order(state)
        assert_applied_once_in_order(events)
        assert events["events"] == list(range(count))  # nothing lost, nothing doubled, in order
        assert not state["resets"] and not events["resets"]  # resumed from history, not a snapshot
        log = page.evaluate("(name) => clients[name].log", name)
        assert [e["status"] for e in log].count("open") == 2, log  # it reconnected, once
    kinds = page.evaluate("Object.fromEntries(Object.entries(clients).map(([k, c]) => [k, c.transport.kind]))")
    assert kinds == {"ws": "ws", "sse": "sse"}  # the WebSocket upgrade passed through nginx
    assert not page.errors
