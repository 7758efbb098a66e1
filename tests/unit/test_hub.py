"""The hub as pure logic: subscriptions, the handshake, dedupe, resync, shared frames, and the throttle inside it.

Frames are read back from the connections' queues (WebSocket frames decode without a socket); time is a fake
clock moved by hand, the way the scheduler would.
"""

from __future__ import annotations

import random
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.core import merge
from sidecar.core.connection import SSE, WS, Connection
from sidecar.core.hub import Hub, Sync
from sidecar.core.protocol import Message, Position, stream_key
from sidecar.core.throttle import ChannelPolicy, Policy, Throttle


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def message(channel: str, seq: int, kind: str = "diff", change: Any = None, data: Any = None, epoch: str = "e1",
            ts: float = 0.0) -> Message:  # fmt: skip
    stream_id = f"{1000 + seq}-0"
    return Message(
        channel, stream_id, stream_key(stream_id), seq, epoch, "changed", ts, kind,
        orjson.dumps(data) if data is not None else None,
        orjson.dumps(change) if kind in ("diff", "state") else None,
    )  # fmt: skip


def at(seq: int, epoch: str = "e1") -> Position:
    return Position(f"{1000 + seq}-0", epoch)


def decode(frame: bytes) -> dict:
    """A whole WebSocket text frame (unmasked, as the hub builds them) -> its JSON."""
    n = frame[1] & 0x7F
    start = 2 if n < 126 else 4 if n == 126 else 10
    return orjson.loads(frame[start:])


def nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = {"a": value}
    return value


def received(conn: Connection) -> list[dict]:
    return [decode(f) for f in conn.drain()]


def messages(frames: list[dict]) -> list[dict]:
    return [f for f in frames if f["type"] == "message"]


def subscribed(hub: Hub, channel: str, mode: str = "diff", transport: str = WS, state: Any = None, seq: int = 0,
               **limits: int) -> Connection:  # fmt: skip
    conn = hub.connect(Connection(transport, lambda: None, **limits))
    sub = hub.subscribe(conn, channel, mode)
    position = at(seq) if seq else Position()
    hub.start(sub, Sync(position, seq, orjson.dumps(state) if state is not None else None))
    conn.drain()
    return conn


def throttled(**channels: ChannelPolicy) -> tuple[Hub, FakeClock]:
    clock = FakeClock()
    pol = Policy(channels={"*": ChannelPolicy(), **{k + ":*": v for k, v in channels.items()}})
    return Hub(Throttle(pol, clock, random.Random(3))), clock


def run_until(hub: Hub, clock: FakeClock, t: float) -> None:
    """What the scheduler does: flush at each due time up to `t`."""
    while (due := hub.due()) is not None and due <= t:
        clock.now = max(clock.now, due)
        hub.flush()
    clock.now = max(clock.now, t)


# -- the spine's guarantees ---------------------------------------------------------------------------------
def test_messages_during_the_handshake_are_held_and_only_the_newer_ones_follow_the_snapshot() -> None:
    hub = Hub()
    conn = hub.connect(Connection(WS, lambda: None))
    sub = hub.subscribe(conn, "c:1", "diff")
    hub.dispatch([message("c:1", 3, change={"n": 3}), message("c:1", 4, change={"n": 4})])  # live, mid-read
    assert conn.drain() == []
    hub.start(sub, Sync(at(3), 3, b'{"n": 3}'))  # the read saw seq 3
    frames = received(conn)
    assert [f["type"] for f in frames] == ["subscribed", "message"]
    assert frames[0]["state"] == {"n": 3} and frames[1]["seq"] == 4


def test_a_message_seen_twice_is_delivered_once() -> None:
    hub = Hub()
    conn = subscribed(hub, "c:1", state={}, seq=1)
    m = message("c:1", 2, change={"a": 1})
    hub.dispatch([m])
    hub.dispatch([m])  # a reader that restarted from an older id
    assert [f["seq"] for f in messages(received(conn))] == [2]


def test_a_hole_in_seq_resynchronises_instead_of_skipping() -> None:
    hub = Hub()
    conn = subscribed(hub, "c:1", state={}, seq=1)
    hub.dispatch([message("c:1", 2, change={"a": 2})])
    hub.dispatch([message("c:1", 4, change={"a": 4})])  # seq 3 never arrived
    assert [f["seq"] for f in messages(received(conn))] == [2]
    assert conn.resync == {"c:1"}
    hub.hold(conn.subs["c:1"])  # the relay's resync: hold, read, start
    hub.start(conn.subs["c:1"], Sync(at(4), 4, b'{"a": 4}', resumed=True, gap=True, resync=True))
    snapshot = received(conn)
    assert [(f["type"], f["seq"], f["reason"]) for f in snapshot] == [("snapshot", 4, "gap")]


@pytest.mark.parametrize("transport", [SSE, WS])
@pytest.mark.parametrize("mode", ["diff", "state", "event", "poke"])
def test_the_first_live_message_after_subscribing_is_checked_against_the_snapshot(transport: str, mode: str) -> None:
    hub = Hub()
    conn = subscribed(hub, "c:1", mode, transport, state={}, seq=1)
    hub.dispatch([message("c:1", 3, change={"a": 3})])  # seq 2 never reached the hub
    assert conn.drain() == [] and conn.resync == {"c:1"}


def test_a_fresh_channel_must_start_at_seq_1() -> None:
    hub = Hub()
    conn = subscribed(hub, "c:1", "event")  # nothing was published when it subscribed
    hub.dispatch([message("c:1", 2)])
    assert conn.drain() == [] and conn.resync == {"c:1"}


def test_the_broadcast_checks_each_subscription_against_what_it_last_got() -> None:
    hub = Hub()
    early = subscribed(hub, "c:1", state={}, seq=1)
    late = subscribed(hub, "c:1", state={"a": 4}, seq=4)
    hub.dispatch([message("c:1", 5, change={"a": 5})])  # the first live message: 2 to 4 were lost for `early`
    assert early.drain() == [] and early.resync == {"c:1"}
    assert [f["seq"] for f in messages(received(late))] == [5] and late.resync == set()


def test_a_coalesced_delivery_is_checked_against_what_the_subscription_last_got() -> None:
    hub, clock = throttled(c=ChannelPolicy(window=0.1))
    conn = subscribed(hub, "c:1", state={}, seq=1)
    hub.dispatch([message("c:1", 2, change={"n": 2})])  # opens the window
    conn.drain()
    conn.subs["c:1"].seq = 1  # as if 2 had not reached it: the held 3 no longer follows
    hub.dispatch([message("c:1", 3, change={"n": 3})])
    run_until(hub, clock, 1001)
    assert conn.drain() == [] and conn.resync == {"c:1"}


def test_a_message_held_during_the_handshake_that_does_not_follow_the_read_resyncs() -> None:
    hub = Hub()
    conn = hub.connect(Connection(WS, lambda: None))
    sub = hub.subscribe(conn, "c:1", "diff")
    hub.dispatch([message("c:1", 4, change={"n": 4})])  # live, mid-read; 3 was lost
    hub.start(sub, Sync(at(2), 2, b'{"n": 2}'))
    assert [f["type"] for f in received(conn)] == ["subscribed"]
    assert conn.resync == {"c:1"}


def test_a_resync_asked_for_during_a_resync_read_is_done_after_it() -> None:
    hub = Hub()
    conn = subscribed(hub, "c:1", state={}, seq=1, max_frames=1)
    hub.dispatch([message("c:1", 2, change={"n": 2}), message("c:1", 3, change={"n": 3})])  # dropped
    sub = conn.subs["c:1"]
    hub.hold(sub)  # the resync's read begins (it sees seq 3) ...
    hub.resync("c:1")  # ... and meanwhile the reader finds that it fell off the shard's live stream
    hub.start(sub, Sync(at(3), 3, b'{"n": 3}', resumed=True, gap=True, resync=True))
    assert [(f["type"], f["seq"]) for f in received(conn)] == [("snapshot", 3)]
    assert conn.resync == {"c:1"}  # another read follows: the first may predate what was lost


def test_a_message_that_fails_dispatch_costs_only_itself_and_resynchronises_its_channel() -> None:
    hub = Hub()
    errors: list[tuple[str, type]] = []
    hub.on_error = lambda msg, exc: errors.append((msg.channel, type(exc)))
    poisoned = subscribed(hub, "p:1", "state", state={}, seq=1)
    bystander = subscribed(hub, "c:1", state={}, seq=1)
    batch = [message("c:1", 2, change={"n": 2}), message("p:1", 2, change=nested(merge.MAX_DEPTH + 1))]
    batch += [message("c:1", seq, change={"n": seq}) for seq in range(3, 33)]
    hub.dispatch(batch)
    assert [f["seq"] for f in messages(received(bystander))] == list(range(2, 33))
    assert poisoned.resync == {"p:1"} and errors == [("p:1", merge.MergeError)] and hub.dispatch_errors == 1


def test_a_message_held_during_the_handshake_that_fails_costs_only_a_resync() -> None:
    hub = Hub()
    conn = hub.connect(Connection(WS, lambda: None))
    sub = hub.subscribe(conn, "c:1", "state")
    hub.dispatch([message("c:1", 2, change=nested(merge.MAX_DEPTH + 1))])  # mid-read: the hub has no state yet
    hub.start(sub, Sync(at(1), 1, b"{}"))  # its state starts here, and the held patch cannot be applied
    assert [f["type"] for f in received(conn)] == ["subscribed"]
    assert conn.resync == {"c:1"} and hub.dispatch_errors == 1


def test_a_slow_consumer_loses_its_backlog_and_gets_a_snapshot_instead() -> None:
    hub = Hub()
    slow = subscribed(hub, "c:1", state={}, seq=1, max_frames=3)
    fast = subscribed(hub, "c:1", state={}, seq=1)
    hub.dispatch([message("c:1", seq, change={"n": seq}) for seq in range(2, 7)])
    assert slow.drain() == [] and slow.resync == {"c:1"} and slow.dropped == 4
    assert [f["seq"] for f in messages(received(fast))] == [2, 3, 4, 5, 6]  # the others lose nothing
    assert hub.take_counts() == {("dropped", "c:1"): 4}
    hub.hold(slow.subs["c:1"])
    hub.start(slow.subs["c:1"], Sync(at(6), 6, b'{"n": 6}', resumed=True, gap=True, resync=True))
    hub.dispatch([message("c:1", 7, change={"n": 7})])
    frames = received(slow)
    assert [(f["type"], f["seq"]) for f in frames] == [("snapshot", 6), ("message", 7)]


def test_nothing_is_held_for_a_stalled_consumer_until_its_resync_read_begins() -> None:
    hub = Hub()
    slow = subscribed(hub, "c:1", state={}, seq=1, max_frames=3)
    hub.dispatch([message("c:1", seq, change={"n": seq}) for seq in range(2, 7)])  # over budget: dropped
    hub.dispatch([message("c:1", seq, change={"n": seq}) for seq in range(7, 5000)])  # its writer is blocked
    sub = slow.subs["c:1"]
    assert sub.buffer is None and slow.drain() == []
    hub.hold(sub)  # the resync read begins; what arrives during it is kept
    hub.dispatch([message("c:1", 5000, change={"n": 5000})])
    hub.start(sub, Sync(at(4999), 4999, b'{"n": 4999}', resumed=True, gap=True, resync=True))
    assert [(f["type"], f["seq"]) for f in received(slow)] == [("snapshot", 4999), ("message", 5000)]


def test_a_frame_is_encoded_once_per_message_mode_and_transport() -> None:
    hub = Hub()
    conns = [subscribed(hub, "c:1", mode, transport, state={}, seq=1)
             for mode in ("diff", "state", "poke") for transport in (SSE, WS) for _ in range(10)]  # fmt: skip
    before = hub.frames_encoded
    hub.dispatch([message("c:1", 2, change={"a": 1})])
    assert hub.frames_encoded - before == 6
    assert all(len(c.drain()) == 1 for c in conns)


def test_a_hub_without_a_throttle_policy_sends_every_message_as_it_comes() -> None:
    hub, clock = throttled()
    conn = subscribed(hub, "c:1", state={}, seq=1)
    hub.dispatch([message("c:1", seq, change={"n": seq}) for seq in range(2, 12)])
    assert [f["seq"] for f in messages(received(conn))] == list(range(2, 12))
    assert hub.due() is None


# -- coalescing ---------------------------------------------------------------------------------------------
def test_a_coalesced_diff_frame_carries_the_composed_patch_and_its_seq_range() -> None:
    hub, clock = throttled(c=ChannelPolicy(window=0.1))
    conn = subscribed(hub, "c:1", state={}, seq=1)
    hub.dispatch([message("c:1", 2, change={"a": 1, "b": {"x": 1}})])
    hub.dispatch([message("c:1", 3, change={"b": {"y": 2}})])
    hub.dispatch([message("c:1", 4, change={"a": None}, data={"last": True})])
    first = messages(received(conn))
    assert [(f["seq"], f.get("seq_from")) for f in first] == [(2, None)]
    run_until(hub, clock, 1000.1)
    [frame] = messages(received(conn))
    assert frame["seq_from"] == 3 and frame["seq"] == 4 and frame["id"] == "1004-0"
    assert frame["diff"] == {"b": {"y": 2}, "a": None} and frame["data"] == {"last": True}


def test_patches_that_cannot_be_one_are_sent_as_two_frames() -> None:
    hub, clock = throttled(c=ChannelPolicy(window=0.1))
    conn = subscribed(hub, "c:1", state={"a": {"k": 1}}, seq=1)
    hub.dispatch([message("c:1", 2, change={"z": 0})])  # opens the window
    hub.dispatch([message("c:1", 3, change={"a": None})])
    hub.dispatch([message("c:1", 4, change={"a": {"b": 1}})])  # after a delete: RFC 7386 has no one patch
    hub.dispatch([message("c:1", 5, change=None)])  # the null patch, which compose() also reports as None
    hub.dispatch([message("c:1", 6, change={"c": 1})])
    run_until(hub, clock, 1001)
    frames = messages(received(conn))
    assert [(f["seq"], f.get("seq_from")) for f in frames] == [(2, None), (3, None), (4, None), (5, None), (6, None)]
    state: Any = {"a": {"k": 1}}
    for f in frames:
        state = merge.apply(state, f["diff"])
    assert state == {"c": 1}


def test_state_mode_sends_the_latest_state_and_poke_mode_one_poke_and_event_mode_every_event() -> None:
    hub, clock = throttled(c=ChannelPolicy(window=0.1))
    conns = {mode: subscribed(hub, "c:1", mode, state={}, seq=1) for mode in ("state", "poke", "event")}
    for seq in range(2, 7):
        hub.dispatch([message("c:1", seq, change={f"k{seq}": seq}, data={"i": seq})])
    run_until(hub, clock, 1001)
    got = {mode: messages(received(c)) for mode, c in conns.items()}
    assert [(f["seq"], f.get("seq_from")) for f in got["state"]] == [(2, None), (6, 3)]
    assert got["state"][-1]["state"] == {"k2": 2, "k3": 3, "k4": 4, "k5": 5, "k6": 6}
    assert [(f["seq"], f.get("seq_from")) for f in got["poke"]] == [(2, None), (6, 3)]
    assert [f["seq"] for f in got["event"]] == [2, 3, 4, 5, 6]
    assert [f["data"]["i"] for f in got["event"]] == [2, 3, 4, 5, 6]


def test_a_coalesced_frame_is_encoded_once_per_window_mode_and_transport() -> None:
    hub, clock = throttled(c=ChannelPolicy(window=0.1))
    conns = [subscribed(hub, "c:1", "diff", transport, state={}, seq=1) for transport in (SSE, WS) for _ in range(50)]
    hub.dispatch([message("c:1", 2, change={"n": 2})])
    for seq in range(3, 10):
        hub.dispatch([message("c:1", seq, change={"n": seq})])
    before = hub.frames_encoded
    run_until(hub, clock, 1001)
    assert hub.frames_encoded - before == 2
    assert all(len(c.drain()) == 2 for c in conns)


def test_a_subscriber_that_joins_mid_window_gets_only_what_its_snapshot_missed() -> None:
    hub, clock = throttled(c=ChannelPolicy(window=0.1))
    early = subscribed(hub, "c:1", state={}, seq=1)
    hub.dispatch([message("c:1", 2, change={"n": 2})])
    hub.dispatch([message("c:1", 3, change={"n": 3})])  # held
    late = subscribed(hub, "c:1", state={"n": 3}, seq=3)
    hub.dispatch([message("c:1", 4, change={"n": 4})])  # held
    run_until(hub, clock, 1001)
    assert [(f["seq"], f.get("seq_from")) for f in messages(received(early))] == [(2, None), (4, 3)]
    assert [(f["seq"], f.get("seq_from")) for f in messages(received(late))] == [(4, None)]


JSON_LEAF = st.one_of(st.none(), st.integers(-5, 5), st.sampled_from(["x", "y"]))
PATCH = st.recursive(
    st.dictionaries(st.sampled_from("abc"), JSON_LEAF, max_size=3),
    lambda inner: st.dictionaries(st.sampled_from("abc"), st.one_of(JSON_LEAF, inner), max_size=3),
    max_leaves=8,
)
PUBLISH = st.one_of(
    PATCH.map(lambda p: ("diff", p)),
    st.just(("diff", None)),  # a root null patch: not from our publisher, but any backend can write one
    PATCH.map(lambda p: ("state", p or {"s": 1})),
    st.just(("event", None)),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    bursts=st.lists(st.tuples(PUBLISH, st.sampled_from([0.0, 0.0, 0.001, 0.02, 0.05, 0.3])), min_size=1, max_size=40),
    window=st.sampled_from([0.05, 0.1]),
)
def test_after_coalesced_frames_every_mode_ends_where_the_publisher_ended(bursts: list, window: float) -> None:
    hub, clock = throttled(c=ChannelPolicy(window=window))
    conns = {mode: subscribed(hub, "c:1", mode, state={}, seq=1) for mode in ("diff", "state", "event", "poke")}
    truth: Any = {}
    for seq, ((kind, change), gap) in enumerate(bursts, start=2):
        run_until(hub, clock, clock.now + gap)
        hub.dispatch([message("c:1", seq, kind, change)])
        if kind == "diff":
            truth = merge.apply(truth, change)
        elif kind == "state":
            truth = change
    run_until(hub, clock, clock.now + 1)
    last = len(bursts) + 1
    got = {mode: messages(received(c)) for mode, c in conns.items()}
    for mode, frames in got.items():
        covered = [(f.get("seq_from", f["seq"]), f["seq"]) for f in frames]
        expected = 2
        for start, end in covered:  # contiguous ranges: no hole, nothing twice
            assert start == expected, (mode, covered)
            expected = end + 1
        assert expected == last + 1, mode
    state: Any = {}
    for f in got["diff"]:
        state = f["state"] if "state" in f else merge.apply(state, f["diff"]) if "diff" in f else state
    assert state == truth
    assert got["state"][-1]["state"] == truth
    assert [f["seq"] for f in got["event"]] == list(range(2, last + 1))
    assert len(got["diff"]) <= len(bursts)


# -- poke spreading -----------------------------------------------------------------------------------------
def test_spread_pokes_reach_every_poke_subscriber_once_while_others_get_theirs_at_once() -> None:
    hub, clock = throttled(h=ChannelPolicy(poke_rate=100))
    pokes = [subscribed(hub, "h:1", "poke", state={}, seq=1) for _ in range(300)]
    differ = subscribed(hub, "h:1", "diff", state={}, seq=1)
    hub.dispatch([message("h:1", 2, change={"n": 2})])
    assert [f["seq"] for f in messages(received(differ))] == [2]
    times = {}
    while (due := hub.due()) is not None:
        clock.now = due
        hub.flush()
        for i, conn in enumerate(pokes):
            if conn.queue:
                times[i] = clock.now
                assert [(f["seq"], f.get("seq_from")) for f in messages(received(conn))] == [(2, None)]
    assert len(times) == 300
    assert 2.9 <= max(times.values()) - 1000 < 3.0  # 300 pokes at 100/s


def test_a_spread_poke_covers_every_change_since_the_last_one_it_got() -> None:
    hub, clock = throttled(h=ChannelPolicy(poke_rate=1))
    first, second = (subscribed(hub, "h:1", "poke", state={}, seq=1) for _ in range(2))
    hub.dispatch([message("h:1", 2, change={"n": 2})])  # poked at 1000 and at 1001
    run_until(hub, clock, 1000.5)
    hub.dispatch([message("h:1", 3, change={"n": 3})])
    hub.dispatch([message("h:1", 4, change={"n": 4})])
    run_until(hub, clock, 1010)
    frames = sorted([(f["seq"], f.get("seq_from")) for f in messages(received(c))] for c in (first, second))
    assert frames == [[(2, None), (4, 3)], [(4, 2)]]


# -- budgets and stuck sockets ------------------------------------------------------------------------------
def test_a_connection_in_one_write_past_the_timeout_is_stuck() -> None:
    hub = Hub()
    conn = hub.connect(Connection(SSE, lambda: None))
    other = hub.connect(Connection(SSE, lambda: None))
    with other.writing(1000.0):
        pass
    with conn.writing(1000.0):
        assert hub.stuck(1010.0, 30.0) == []
        assert hub.stuck(1031.0, 30.0) == [conn]
    assert hub.stuck(1031.0, 30.0) == []


def test_new_queue_bounds_apply_to_open_connections() -> None:
    hub = Hub()
    conn = subscribed(hub, "c:1", state={}, seq=1)
    hub.set_budget(2, 1 << 20)
    hub.dispatch([message("c:1", seq, change={"n": seq}) for seq in range(2, 5)])
    assert conn.resync == {"c:1"}
