"""The throttle's policies as pure logic: a fake clock, lists compared, no sockets and no sleeps."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from sidecar.core import throttle as throttle_module
from sidecar.core.protocol import Message, stream_key
from sidecar.core.throttle import MAX_RETRY, ChannelPolicy, Outgoing, Policy, PolicyError, Throttle


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def message(channel: str, seq: int, epoch: str = "e1") -> Message:
    stream_id = f"{1000 + seq}-0"
    return Message(channel, stream_id, stream_key(stream_id), seq, epoch, "changed", 0.0, "poke")


def policy(**channels: ChannelPolicy) -> Policy:
    return Policy(channels={"*": ChannelPolicy(), **{k.replace("_", ":") + "*": v for k, v in channels.items()}})


def make(pol: Policy) -> tuple[Throttle, FakeClock]:
    clock = FakeClock()
    return Throttle(pol, clock, random.Random(7)), clock


def drain(throttle: Throttle, clock: FakeClock, until: float) -> list[tuple[float, Outgoing]]:
    """Run the throttle's timer as the scheduler would, up to `until`: (time sent, what) for each."""
    sent = []
    while (due := throttle.due()) is not None and due <= until:
        clock.now = max(clock.now, due)
        sent.extend((clock.now, out) for out in throttle.flush())
    clock.now = max(clock.now, until)
    return sent


# -- the policy ---------------------------------------------------------------------------------------------
def test_the_most_specific_pattern_wins() -> None:
    pol = Policy.from_json(
        {"channels": {"*": {"window": 1}, "task:*": {"window": 2}, "task:42": {"window": 3}, "*:42": {"window": 4}}}
    )
    assert pol.match("orders:1") == ("*", ChannelPolicy(window=1))
    assert pol.match("task:7") == ("task:*", ChannelPolicy(window=2))
    assert pol.match("task:42") == ("task:42", ChannelPolicy(window=3))
    assert pol.match("user:42") == ("*:42", ChannelPolicy(window=4))


def test_a_document_round_trips_and_what_it_leaves_out_comes_from_the_defaults() -> None:
    defaults = Policy(admit_rate=50.0, stuck_timeout=10.0)
    pol = Policy.from_json({"channels": {"sprint:*": {"poke_rate": 200, "poke_floor": 1}}, "admit_burst": 20}, defaults)
    assert pol.admit_rate == 50.0 and pol.admit_burst == 20 and pol.stuck_timeout == 10.0
    assert pol.channels["sprint:*"] == ChannelPolicy(poke_rate=200.0, poke_floor=1.0)
    assert pol.channels["*"] == ChannelPolicy()  # always there
    assert Policy.from_json(pol.to_json()) == pol


@pytest.mark.parametrize(
    ("doc", "reason"),
    [
        ([], "is a JSON object"),
        ({"window": 1}, "unknown field 'window'"),
        ({"channels": {"a b": {"window": 1}}}, "bad channel pattern"),
        ({"channels": {"*": {"window": -1}}}, "window must be between 0 and 10"),
        ({"channels": {"*": {"window": 11}}}, "window must be between 0 and 10"),
        ({"channels": {"*": {"window": "fast"}}}, "must be a number"),
        ({"channels": {"*": {"window": True}}}, "must be a number"),
        ({"channels": {"*": {"speed": 1}}}, "unknown field 'speed'"),
        ({"channels": {"*": 0.1}}, "is an object"),
        ({"channels": ["*"]}, "maps channel patterns"),
        ({"admit_burst": 1.5}, "admit_burst must be an integer"),
        ({"queue_bytes": 10}, "queue_bytes must be between"),
        ({"stuck_timeout": 0}, "stuck_timeout must be between 1"),
    ],
)
def test_a_bad_value_is_refused_with_the_reason(doc: object, reason: str) -> None:
    with pytest.raises(PolicyError, match=reason):
        Policy.from_json(doc)


# -- coalescing ---------------------------------------------------------------------------------------------
def test_without_a_policy_every_message_goes_out_at_once() -> None:
    throttle, _ = make(Policy())
    for seq in range(1, 4):
        m = message("c:1", seq)
        assert throttle.offer(m) == [Outgoing("c:1", (m,))]
    assert throttle.due() is None
    assert throttle.flush() == []


def test_a_window_sends_the_first_message_at_once_and_the_rest_when_it_ends() -> None:
    throttle, clock = make(policy(c=ChannelPolicy(window=0.1)))
    m1, m2, m3 = (message("c:1", seq) for seq in (1, 2, 3))
    assert throttle.offer(m1) == [Outgoing("c:1", (m1,))]
    clock.now += 0.03
    assert throttle.offer(m2) == []
    clock.now += 0.03
    assert throttle.offer(m3) == []
    assert throttle.due() == pytest.approx(1000.1)
    clock.now = 1000.099
    assert throttle.flush() == []
    clock.now = 1000.1
    assert throttle.flush() == [Outgoing("c:1", (m2, m3))]
    assert throttle.take_counts() == {("coalesced", "c:1"): 2}


def test_a_channel_idle_for_a_window_sends_at_once_again() -> None:
    throttle, clock = make(policy(c=ChannelPolicy(window=0.1)))
    throttle.offer(message("c:1", 1))
    clock.now += 0.5
    m2 = message("c:1", 2)
    assert throttle.offer(m2) == [Outgoing("c:1", (m2,))]


def test_a_1000_per_second_channel_with_a_100_ms_window_gives_about_10_sends_a_second() -> None:
    throttle, clock = make(policy(c=ChannelPolicy(window=0.1)))
    sends = []
    for seq in range(1, 1001):
        sends.extend(drain(throttle, clock, 1000.0 + seq / 1000))
        sends.extend((clock.now, out) for out in throttle.offer(message("c:1", seq)))
    sends.extend(drain(throttle, clock, 1002.0))
    assert len(sends) <= 11
    assert [m.seq for _, out in sends for m in out.messages] == list(range(1, 1001))  # none lost, in order
    gaps = [b - a for (a, _), (b, _) in zip(sends, sends[1:])]
    assert min(gaps) >= 0.1 - 1e-9


def test_a_late_timer_never_reorders_held_messages() -> None:
    throttle, clock = make(policy(c=ChannelPolicy(window=0.1)))
    ms = [message("c:1", seq) for seq in (1, 2, 3)]
    throttle.offer(ms[0])
    clock.now += 0.05
    throttle.offer(ms[1])
    clock.now += 0.2  # the scheduler did not run at the window's end
    assert throttle.offer(ms[2]) == [Outgoing("c:1", (ms[1], ms[2]))]
    assert throttle.flush() == []  # the stale timer finds nothing


def test_a_full_window_is_sent_early(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(throttle_module, "MAX_PENDING", 3)
    throttle, _ = make(policy(c=ChannelPolicy(window=5)))
    ms = [message("c:1", seq) for seq in range(1, 5)]
    throttle.offer(ms[0])
    assert throttle.offer(ms[1]) == throttle.offer(ms[2]) == []
    assert throttle.offer(ms[3]) == [Outgoing("c:1", tuple(ms[1:]))]


def test_a_policy_change_applies_to_the_next_window() -> None:
    throttle, clock = make(Policy())
    throttle.offer(message("c:1", 1))
    throttle.set_policy(policy(c=ChannelPolicy(window=1)))
    clock.now += 0.001
    throttle.offer(message("c:1", 2))  # opens a window
    assert throttle.offer(message("c:1", 3)) == []
    throttle.set_policy(Policy())
    assert [m.seq for _, out in drain(throttle, clock, 1002) for m in out.messages] == [3]
    m4 = message("c:1", 4)
    assert throttle.offer(m4) == [Outgoing("c:1", (m4,))]


def test_forgetting_a_channel_drops_what_it_held() -> None:
    throttle, clock = make(policy(c=ChannelPolicy(window=0.1)))
    throttle.offer(message("c:1", 1))
    throttle.offer(message("c:1", 2))
    throttle.forget("c:1")
    assert drain(throttle, clock, 1001) == []


# -- poke spreading -----------------------------------------------------------------------------------------
def test_1000_pokes_at_200_per_second_are_spread_over_5_seconds_in_random_order() -> None:
    throttle, clock = make(policy(h=ChannelPolicy(poke_rate=200)))
    conns = list(range(1, 1001))
    m = message("h:1", 1)
    assert throttle.offer(m, conns) == [Outgoing("h:1", (m,), pokes=False)]  # the others get theirs now
    sent = drain(throttle, clock, 1010)
    assert sorted(out.conn for _, out in sent) == conns  # every subscriber once
    assert all(out.messages == (m,) for _, out in sent)
    per_second = Counter(int(t - 1000) for t, _ in sent)
    assert max(per_second.values()) <= 200 and sorted(per_second) == [0, 1, 2, 3, 4]
    order = [out.conn for _, out in sent]
    assert order != sorted(order)
    assert throttle.take_counts()[("poke_delayed", "h:1")] == 1000


def test_a_few_pokes_are_spread_over_the_floor() -> None:
    throttle, clock = make(policy(h=ChannelPolicy(poke_rate=200, poke_floor=2)))
    throttle.offer(message("h:1", 1), [1, 2, 3, 4])
    times = [t - 1000 for t, _ in drain(throttle, clock, 1010)]
    assert times == pytest.approx([0, 0.5, 1.0, 1.5])


def test_a_change_during_a_spread_keeps_waiting_pokes_and_queues_the_rest_after_it() -> None:
    throttle, clock = make(policy(h=ChannelPolicy(poke_rate=2)))
    throttle.offer(message("h:1", 1), [1, 2, 3, 4])  # over 2 s
    first = drain(throttle, clock, 1000.6)  # two sent, two waiting
    assert len(first) == 2
    m2 = message("h:1", 2)
    throttle.offer(m2, [1, 2, 3, 4])
    rest = drain(throttle, clock, 1010)
    assert all(out.messages == (m2,) for _, out in rest)  # waiting pokes carry the newest position
    assert sorted(out.conn for _, out in rest) == [1, 2, 3, 4]
    assert all(t >= 1002 for t, out in rest if out.conn in {o.conn for _, o in first})
    per_second = Counter(int(t - 1000) for t, _ in first + rest)
    assert max(per_second.values()) <= 2


def test_steady_changes_with_a_floor_keep_pokes_a_floor_behind_not_ever_further() -> None:
    # 25 poke subscribers, 5 changes a second, 100 pulls/s with a 1 s floor: each change finds a few of them
    # poked already. Spreading each such group over the whole floor again, after the last spread, put the
    # pokes 19 s behind after 5 s (found by the dashboard's what-if replay).
    throttle, clock = make(policy(h=ChannelPolicy(poke_rate=100, poke_floor=1)))
    conns = list(range(1, 26))
    sent: list[tuple[float, Outgoing]] = []
    changed_at: dict[int, float] = {}
    for seq in range(1, 26):  # 5 s of changes
        changed_at[seq] = clock.now
        throttle.offer(message("h:1", seq), conns)
        sent += drain(throttle, clock, clock.now + 0.2)
    sent += drain(throttle, clock, clock.now + 30)
    delays = [t - changed_at[out.messages[0].seq] for t, out in sent]
    assert max(delays) <= 1.5  # the floor, and the cap's share of the queue: not growing with time
    per_second = Counter(int(t - 1000) for t, _ in sent)
    assert max(per_second.values()) <= 101  # the cap holds (a slot on the edge of a second may count in either)
    last_seq = {out.conn: out.messages[0].seq for _, out in sorted(sent, key=lambda s: s[0])}
    assert set(last_seq.values()) == {25}  # every subscriber heard of the last change


# -- admission ----------------------------------------------------------------------------------------------
def test_a_storm_is_admitted_at_the_rate_and_the_refused_are_told_to_come_back_spread_out() -> None:
    throttle, clock = make(Policy(admit_rate=200, admit_burst=200))
    waiting = [(1000.0, i) for i in range(1000)]  # (when it tries, client)
    admitted: list[float] = []
    attempts = 0
    while waiting and clock.now < 1060:
        waiting.sort()
        when, client = waiting.pop(0)
        clock.now = max(clock.now, when)
        attempts += 1
        hint = throttle.admit(len(admitted))
        if hint is None:
            admitted.append(clock.now)
        else:
            assert 0 < hint <= MAX_RETRY
            waiting.append((clock.now + hint, client))
    assert len(admitted) == 1000
    assert max(Counter(int(t - 1000) for t in admitted).values()) <= 200 + 200  # rate + burst
    # The hints spread the retries at about the rate: they do not come back as a second herd, again and again.
    assert max(admitted) - 1000 < 1000 / 200 * 2
    assert attempts < 1000 * 2.5
    counts = throttle.take_counts()
    assert counts[("admitted", "*")] == 1000 and counts[("rejected", "*")] > 0


def test_the_connection_cap_refuses_with_a_hint() -> None:
    throttle, _ = make(Policy(max_connections=10))
    assert throttle.admit(9, ["a:1"]) is None
    hint = throttle.admit(10, ["a:1"])
    assert hint is not None and hint > 1
    assert throttle.take_counts() == {("admitted", "a:1"): 1, ("rejected", "a:1"): 1}


def test_admission_is_open_by_default() -> None:
    throttle, _ = make(Policy())
    assert all(throttle.admit(n) is None for n in range(10_000))


def test_sockets_without_a_token_have_a_budget_of_their_own_and_take_no_admission_token() -> None:
    throttle, clock = make(Policy(admit_rate=1, admit_burst=1, max_connections=1))
    assert all(throttle.admit_unauthenticated(n, limit=4) is None for n in range(4))
    hints = [throttle.admit_unauthenticated(4, limit=4) for _ in range(20)]
    assert all(h is not None and 0.8 <= h <= 1.25 for h in hints) and len(set(hints)) > 1  # soon, jittered
    assert throttle.admit_unauthenticated(0, limit=0) is not None  # 0: the token comes with the handshake
    assert throttle.take_counts() == {("rejected", "*"): 21}
    assert throttle.admit(0) is None  # the waiting took neither the rate's one token nor the cap's one place
