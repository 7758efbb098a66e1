"""realtime.js in Chromium against real sidecars, a real Redis and real sockets.

The page is a small harness served by a balancer in front of the sidecar(s), so the page, the WebSocket and the
streams share one origin: it creates clients and records what each applies (per message id, so "applied once" is
checkable), its state, its events and its resets.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import jwt
import pytest

from sidecar.publish import Publisher
from tests.browser.balancer import Balancer
from tests.processes import FRONTS, REPO_ROOT

pytestmark = pytest.mark.browser

HARNESS = """<!doctype html><meta charset="utf-8"><title>realtime.js harness</title><link rel="icon" href="data:,">
<script type="module">
import * as realtime from "/static/realtime.js";
window.realtime = realtime;
window.clients = {};
window.tracks = {};
window.client = (name, options) => {
  const c = new realtime.Realtime(options);
  c.log = [];
  c.addEventListener("connection", (e) => c.log.push({ ...e.detail, t: performance.now() }));
  clients[name] = c;
};
window.track = (name, channel, mode) => {
  const t = (tracks[`${name} ${channel}`] = { applied: {}, seqs: [], events: [], resets: [], errors: [], state: null });
  t.sub = clients[name].subscribe(channel, {
    mode,
    onMessage: (m) => {
      t.applied[m.id] = (t.applied[m.id] || 0) + 1;
      t.seqs.push([m.seq_from ?? m.seq, m.seq]);
    },
    onEvent: (name, data) => t.events.push(data),
    onState: (state) => (t.state = state),
    onReset: (r) => t.resets.push(r),
    onError: (e) => t.errors.push(e.code),
  });
};
window.report = (key) => {
  const t = tracks[key];
  return { state: t.state, position: t.sub.position, applied: t.applied, seqs: t.seqs, events: t.events,
           resets: t.resets, errors: t.errors };
};
window.harnessReady = true;
</script>"""


def open_harness(browser: Any, origin: str, offline: bool = False) -> Any:
    """A page at `origin` running the harness; `offline`: no server, Playwright serves the page and realtime.js."""
    page = browser.new_page()
    page.errors = []
    page.on("pageerror", lambda exc: page.errors.append(exc))
    if offline:
        js = (REPO_ROOT / "sidecar" / "static" / "realtime.js").read_text()
        page.route(f"{origin}/harness", lambda route: route.fulfill(content_type="text/html", body=HARNESS))
        page.route(f"{origin}/static/realtime.js", lambda route: route.fulfill(content_type="text/javascript", body=js))
    page.goto(f"{origin}/harness")
    page.wait_for_function("window.harnessReady === true")
    return page


def until(page: Any, check: Callable[[], bool], timeout: float = 15.0, what: str = "condition") -> None:
    """Poll `check` while Playwright keeps serving the page's events (never time.sleep with routes installed)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        page.wait_for_timeout(50)
    raise AssertionError(f"timed out waiting for {what}")


def report(page: Any, key: str) -> dict[str, Any]:
    return page.evaluate("(key) => report(key)", key)


def all_open(page: Any) -> bool:
    return page.evaluate("Object.values(clients).every((c) => c.status === 'open')")


def random_patch(rng: random.Random, depth: int = 0) -> dict[str, Any]:
    """A merge patch over a few keys: deletions, nested objects, arrays, numbers and (non-ASCII) strings."""
    patch: dict[str, Any] = {}
    for key in rng.sample("abcdef", rng.randint(1, 3)):
        r = rng.random()
        if r < 0.2:
            patch[key] = None
        elif r < 0.45 and depth < 3:
            patch[key] = random_patch(rng, depth + 1)
        elif r < 0.6:
            patch[key] = [rng.randint(0, 9) for _ in range(rng.randint(0, 3))]
        elif r < 0.8:
            patch[key] = rng.randint(-1000, 1000)
        else:
            patch[key] = rng.choice(["x", "", "héllo", "✓ done"])
    return patch


def assert_applied_once_in_order(r: dict[str, Any]) -> None:
    assert r["applied"] and set(r["applied"].values()) == {1}, "a message was applied twice"
    for (_, prev), (first, _) in zip(r["seqs"], r["seqs"][1:]):
        assert first == prev + 1, f"hole or reorder in seqs: {r['seqs']}"


@pytest.fixture
def pub(request):
    """A publisher to the Redis of `shared_sidecar` when the test takes it, else to its own `redis_server`."""
    if "shared_sidecar" in request.fixturenames:
        return Publisher.from_url(request.getfixturevalue("shared_sidecar").redis_url)
    return Publisher.from_url(request.getfixturevalue("redis_server").url)


@pytest.fixture
def front(browser, sidecar_process) -> Iterator[Callable[..., Balancer]]:
    """Factory: ``front(sidecar_ports, **options)`` is a Balancer serving the harness page.

    At teardown (before the sidecars stop: this fixture depends on theirs) the test's pages are closed, then the
    balancers, so that no client is reconnecting while a sidecar shuts down."""
    started: list[Balancer] = []

    def start(ports: list[int], **options: Any) -> Balancer:
        balancer = Balancer(ports, pages={"/harness": HARNESS}, **options)
        started.append(balancer)
        return balancer

    yield start
    for context in browser.contexts:
        context.close()
    for balancer in started:
        balancer.close()


def test_merge_patch_follows_rfc_7386_and_ignores_proto_keys(browser):
    page = open_harness(browser, "http://harness.test", offline=True)
    # RFC 7386 Appendix A, every example.
    cases = [
        ({"a": "b"}, {"a": "c"}, {"a": "c"}), ({"a": "b"}, {"b": "c"}, {"a": "b", "b": "c"}),
        ({"a": "b"}, {"a": None}, {}), ({"a": "b", "b": "c"}, {"a": None}, {"b": "c"}),
        ({"a": ["b"]}, {"a": "c"}, {"a": "c"}), ({"a": "c"}, {"a": ["b"]}, {"a": ["b"]}),
        ({"a": {"b": "c"}}, {"a": {"b": "d", "c": None}}, {"a": {"b": "d"}}),
        ({"a": [{"b": "c"}]}, {"a": [1]}, {"a": [1]}), (["a", "b"], ["c", "d"], ["c", "d"]),
        ({"a": "b"}, ["c"], ["c"]), ({"a": "foo"}, None, None), ({"a": "foo"}, "bar", "bar"),
        ({"e": None}, {"a": 1}, {"e": None, "a": 1}), ([1, 2], {"a": "b", "c": None}, {"a": "b"}),
        ({}, {"a": {"bb": {"ccc": None}}}, {"a": {"bb": {}}}),
    ]  # fmt: skip
    got = page.evaluate("(cases) => cases.map(([t, p]) => realtime.mergePatch(t, p))", [[t, p] for t, p, _ in cases])
    assert got == [want for _, _, want in cases]
    polluted = page.evaluate(
        """() => {
          const out = realtime.mergePatch({}, JSON.parse('{"__proto__": {"admin": true}}'));
          return [Object.keys(out), ({}).admin === undefined, Object.getPrototypeOf(out) === Object.prototype];
        }"""
    )
    assert polluted == [["__proto__"], True, True]
    assert page.evaluate("realtime.compareIds('10-2', '9-5') > 0 && realtime.compareIds('10-2', '10-10') < 0")
    assert not page.errors
    page.close()


# These two run on both fronts (sidecar/asgi/ too): the page's whole state, and a resume across a killed
# replica, are what realtime.js must get alike from either; the rest test the client itself.
@pytest.mark.parametrize("sidecar_process", FRONTS, indirect=True)
def test_page_state_equals_the_server_snapshot_after_random_diffs_in_every_mode(browser, shared_sidecar, front, pub):
    sidecar = shared_sidecar
    rng = random.Random(5)
    pub.state("rand:1", "created", {"title": "start"})
    for _ in range(20):  # before anyone subscribes: clients start from a snapshot
        pub.diff("rand:1", "changed", random_patch(rng))
    page = open_harness(browser, front([sidecar.port]).url)
    page.evaluate(
        """() => {
          client("ws", {}); client("sse", { transports: ["sse"] });
          client("ws-state", {}); client("sse-poke", { transports: ["sse"] });
          track("ws", "rand:1", "diff"); track("sse", "rand:1", "diff");
          track("ws-state", "rand:1", "state"); track("sse-poke", "rand:1", "poke");
          track("ws", "rand:events", "event"); track("sse", "rand:events", "event");
        }"""
    )
    until(page, lambda: all_open(page), what="every client open")
    until(page, lambda: report(page, "ws rand:1")["position"] is not None, what="subscribed")
    for i in range(300):
        pub.diff("rand:1", "changed", random_patch(rng))
        if i % 3 == 0:
            pub.event("rand:events", "happened", i // 3)
        if i % 50 == 49:
            with pub.batch() as batch:  # a burst in one round trip
                for _ in range(30):
                    batch.diff("rand:1", "burst", random_patch(rng))
    final = pub.snapshot("rand:1")
    clients = ("ws", "sse", "ws-state", "sse-poke")
    until(
        page,
        lambda: all(report(page, f"{c} rand:1")["state"] == final.state for c in clients),
        what="every client's state equal to the server snapshot",
    )
    for name in ("ws", "sse"):
        r = report(page, f"{name} rand:1")
        assert r["position"] == {"id": final.id, "seq": final.seq, "epoch": final.epoch}
        assert_applied_once_in_order(r)
        assert not r["resets"]
    until(page, lambda: all(len(report(page, f"{c} rand:events")["events"]) == 100 for c in ("ws", "sse")))
    for name in ("ws", "sse"):
        assert report(page, f"{name} rand:events")["events"] == list(range(100))
    kinds = page.evaluate("Object.fromEntries(Object.entries(clients).map(([k, c]) => [k, c.transport.kind]))")
    assert kinds == {"ws": "ws", "sse": "sse", "ws-state": "ws", "sse-poke": "sse"}
    assert not page.errors


@pytest.mark.parametrize("sidecar_process", FRONTS, indirect=True)
def test_page_resumes_exactly_when_its_sidecar_is_killed_mid_stream(browser, redis_server, sidecar_process, front, pub):
    first = sidecar_process(redis_server.url, SIDECAR_SSE_RETRY_MS="200")
    second = sidecar_process(redis_server.url, SIDECAR_SSE_RETRY_MS="200")
    page = open_harness(browser, front([first.port, second.port]).url)  # new connections: first replica alive
    page.evaluate(
        """() => {
          client("ws", {}); client("sse", { transports: ["sse"] });
          for (const c of ["ws", "sse"]) { track(c, "fo:state", "diff"); track(c, "fo:events", "event"); }
        }"""
    )
    until(page, lambda: all_open(page), what="both clients open")
    until(page, lambda: report(page, "sse fo:events")["position"] is not None, what="subscribed")
    rng, count = random.Random(11), 400
    done = threading.Event()

    def publish() -> None:
        for i in range(count):
            pub.diff("fo:state", "changed", random_patch(rng))
            pub.event("fo:events", "tick", i)
            time.sleep(0.005)
        done.set()

    threading.Thread(target=publish, daemon=True).start()
    until(page, lambda: len(report(page, "ws fo:events")["events"]) > 50, what="the stream under way")
    first.kill()  # mid-stream, as a crash would
    until(page, done.is_set, timeout=30, what="the publisher")
    final = pub.snapshot("fo:state")

    def caught_up() -> bool:
        return all(
            report(page, f"{c} fo:state")["state"] == final.state
            and len(report(page, f"{c} fo:events")["events"]) >= count
            for c in ("ws", "sse")
        )

    until(page, caught_up, timeout=20, what="both clients caught up on the second replica")
    for name in ("ws", "sse"):
        state, events = report(page, f"{name} fo:state"), report(page, f"{name} fo:events")
        assert_applied_once_in_order(state)
        assert_applied_once_in_order(events)
        assert events["events"] == list(range(count))
        assert not state["resets"] and not events["resets"]
        log = page.evaluate("(name) => clients[name].log", name)
        assert [e["status"] for e in log].count("open") == 2, log  # it did reconnect, once
    assert not page.errors


def test_client_falls_back_to_sse_when_websocket_is_refused(browser, shared_sidecar, front, pub):
    sidecar = shared_sidecar
    balancer = front([sidecar.port], refuse_websocket=True)  # a proxy that does not pass upgrades
    page = open_harness(browser, balancer.url)
    page.evaluate("() => { client('c', {}); track('c', 'fb:1', 'diff'); }")
    until(page, lambda: all_open(page), what="the client open")
    for i in range(50):
        pub.diff("fb:1", "changed", {"n": i, "items": {f"i{i % 7}": i}})
    final = pub.snapshot("fb:1")
    until(page, lambda: report(page, "c fb:1")["state"] == final.state, what="state equal to the snapshot")
    log = [(e["status"], e.get("transport")) for e in page.evaluate("clients.c.log")]
    assert log == [("connecting", "ws"), ("connecting", "sse"), ("open", "sse")]
    assert len(balancer.upgrades) == 1  # it did try a WebSocket first, once
    assert_applied_once_in_order(report(page, "c fb:1"))
    assert not page.errors


def test_a_503_retry_after_is_honoured_before_reconnecting(browser, shared_sidecar, front, pub):
    sidecar = shared_sidecar
    page = open_harness(browser, front([sidecar.port], refuse_websocket=True).url)
    requests: list[float] = []

    def overloaded_once(route: Any) -> None:
        requests.append(time.monotonic())  # before answering: the client's wait starts after this
        if len(requests) == 1:
            body = json.dumps({"error": "overloaded", "message": "too many connections; retry later"})
            route.fulfill(status=503, headers={"Retry-After": "2"}, content_type="application/json", body=body)
        else:
            route.continue_()

    page.route(lambda url: "/sse?" in url, overloaded_once)
    pub.diff("ra:1", "changed", {"n": 1})
    page.evaluate("() => { client('c', {}); track('c', 'ra:1', 'diff'); }")
    until(page, lambda: len(requests) >= 2 and all_open(page), timeout=10, what="a second SSE request")
    assert requests[1] - requests[0] >= 2.0
    delays = [e["delay"] for e in page.evaluate("clients.c.log") if e["status"] == "reconnecting"]
    assert len(delays) == 1 and delays[0] >= 2000
    pub.diff("ra:1", "changed", {"n": 2})
    until(page, lambda: report(page, "c ra:1")["state"] == {"n": 2}, what="the stream working after the wait")
    assert not page.errors


def test_a_websocket_close_1013_with_a_retry_hint_is_honoured(browser, shared_sidecar, front, pub):
    sidecar = shared_sidecar
    balancer = front([sidecar.port])
    balancer.close_websockets.append((1013, "overloaded, retry in 2 s"))  # RFC 6455: "try again later"
    page = open_harness(browser, balancer.url)
    pub.diff("try:1", "changed", {"n": 1})
    page.evaluate("() => { client('c', {}); track('c', 'try:1', 'diff'); }")
    until(page, lambda: report(page, "c try:1")["state"] == {"n": 1}, timeout=10, what="the second socket")
    assert len(balancer.upgrades) == 2
    assert balancer.upgrades[1] - balancer.upgrades[0] >= 2.0
    assert page.evaluate("clients.c.transport.kind") == "ws"  # "later" is no reason to leave WebSocket
    assert not page.errors


def test_a_hole_in_seq_makes_the_channel_resync_from_the_snapshot(browser, shared_sidecar, front, pub):
    sidecar = shared_sidecar
    pub.state("hole:1", "created", {"n": 0, "tags": {"a": 1}})
    page = open_harness(browser, front([sidecar.port]).url)
    page.evaluate("() => { client('c', {}); track('c', 'hole:1', 'diff'); }")
    until(page, lambda: report(page, "c hole:1")["state"] == {"n": 0, "tags": {"a": 1}}, what="the snapshot")
    held: list[Any] = []  # the re-sync's read of the state, held until the publish below has happened
    page.route(lambda url: "/channels/hole%3A1/state" in url, lambda route: held.append(route))
    # A frame that skips a seq (as if one were lost on the way): its patch must never be applied.
    page.evaluate(
        """() => {
          const c = clients.c, sub = c.channels.get("hole:1");
          const [ms, n] = sub.id.split("-").map(Number);
          c._frame({ type: "message", channel: "hole:1", id: `${ms}-${n + 1}`, seq: sub.seq + 2,
                     epoch: sub.epoch, event: "changed", diff: { corrupt: true } }, c.transport);
        }"""
    )
    until(page, lambda: bool(held), what="the re-sync reading the state")
    pub.diff("hole:1", "changed", {"n": 1, "tags": {"b": 2}})
    held[0].continue_()
    final = pub.snapshot("hole:1")
    until(page, lambda: report(page, "c hole:1")["state"] == final.state, what="the state re-synced")
    r = report(page, "c hole:1")
    assert "corrupt" not in r["state"]
    assert [x["reason"] for x in r["resets"]] == ["hole"]
    pub.diff("hole:1", "changed", {"n": 2})
    until(page, lambda: report(page, "c hole:1")["state"]["n"] == 2, what="live again after the re-sync")
    assert page.evaluate("clients.c.stats.resyncs") == 1
    assert not page.errors


def test_token_hook_authenticates_every_connection_and_renews_before_expiry(
    browser, redis_server, sidecar_process, front, pub
):
    secret = "a-test-secret-of-at-least-32-bytes!"
    sidecar = sidecar_process(redis_server.url, SIDECAR_JWT_SECRET=secret, SIDECAR_JWT_LEEWAY="0")
    minted: list[float] = []

    def mint() -> str:
        minted.append(time.monotonic())
        claims = {"exp": int(time.time()) + 3, "channels": ["tok:*"]}  # short-lived: renewals happen in the test
        return jwt.encode(claims, secret, algorithm="HS256")

    page = open_harness(browser, front([sidecar.port]).url)
    page.expose_function("mintToken", mint)
    page.evaluate(
        """() => {
          client("ws", { token: () => mintToken() });
          client("sse", { token: () => mintToken(), transports: ["sse"] });
          track("ws", "tok:1", "diff"); track("sse", "tok:1", "diff"); track("ws", "secret:1", "diff");
        }"""
    )
    until(page, lambda: all_open(page), what="both clients open")
    for i in range(24):  # about 6 s: past two token lifetimes
        pub.diff("tok:1", "changed", {"n": i})
        page.wait_for_timeout(250)
    final = pub.snapshot("tok:1")
    until(page, lambda: all(report(page, f"{c} tok:1")["state"] == final.state for c in ("ws", "sse")))
    for name in ("ws", "sse"):
        assert_applied_once_in_order(report(page, f"{name} tok:1"))
    opens = {c: [e["status"] for e in page.evaluate(f"clients['{c}'].log")].count("open") for c in ("ws", "sse")}
    assert opens["ws"] == 1  # the socket sent a fresh token before its token expired, and stayed open
    assert opens["sse"] >= 2  # a stream ends with its token: reconnected (and resumed) with a fresh one
    assert len(minted) >= 4
    assert report(page, "ws secret:1")["errors"] == ["forbidden"]  # outside the grant: refused, socket kept
    assert not page.errors


@pytest.mark.parametrize("mode", ["state", "event", "poke"])
def test_a_hole_in_seq_resyncs_in_every_mode(browser, shared_sidecar, front, pub, mode):
    sidecar, channel = shared_sidecar, f"hole:{mode}"  # a channel per mode: the sidecar is the module's
    pub.state(channel, "created", {"n": 0})
    page = open_harness(browser, front([sidecar.port]).url)
    page.evaluate("([channel, mode]) => { client('c', {}); track('c', channel, mode); }", [channel, mode])
    known = (lambda r: r["position"] is not None) if mode == "event" else (lambda r: r["state"] == {"n": 0})
    until(page, lambda: known(report(page, f"c {channel}")), what="subscribed")
    held: list[Any] = []  # the re-sync's read of the state, held until the publish below has happened

    def hold_first(route: Any) -> None:
        if held:
            route.continue_()
        else:
            held.append(route)

    page.route(lambda url: f"/channels/hole%3A{mode}/state" in url, hold_first)
    page.evaluate(
        """(channel) => {
          const c = clients.c, sub = c.channels.get(channel);
          const [ms, n] = sub.id.split("-").map(Number);
          c._frame({ type: "message", channel, id: `${ms}-${n + 1}`, seq: sub.seq + 2, epoch: sub.epoch,
                     event: "changed", data: "lost", state: { corrupt: true } }, c.transport);
        }""",
        channel,
    )
    until(page, lambda: bool(held), what="the re-sync reading the state")
    pub.diff(channel, "changed", {"n": 1})
    held[0].continue_()
    until(page, lambda: report(page, f"c {channel}")["resets"] != [], what="the hole reported")
    pub.diff(channel, "changed", {"n": 2}, data="after")
    want = (lambda r: r["events"][-1:] == ["after"]) if mode == "event" else (lambda r: r["state"] == {"n": 2})
    until(page, lambda: want(report(page, f"c {channel}")), what="live again after the re-sync")
    r = report(page, f"c {channel}")
    assert [x["reason"] for x in r["resets"]] == ["hole"]
    assert "lost" not in r["events"] and r["state"] != {"corrupt": True}
    assert_applied_once_in_order({**r, "seqs": r["seqs"][1:]})  # after the re-sync, no hole nor repeat
    assert page.evaluate("clients.c.stats.resyncs") == 1
    assert not page.errors
