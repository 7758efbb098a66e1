"""The throttle what-if: the relay's throttle replayed over recorded seconds, against figures worked out by hand."""

from __future__ import annotations

import pytest

from dashboard.sources import Point
from dashboard.whatif import channel_policy, compare, replay
from sidecar.core.throttle import ChannelPolicy

T0 = 1_800_000_000


def seconds(n: int, published: float, subscribers: int, replicas: int = 1) -> list[Point]:
    return [Point(T0 + i, published=published, subscribers=subscribers, replicas=replicas) for i in range(n)]


def test_without_a_policy_every_message_goes_to_every_subscriber_at_once():
    out = replay(seconds(3, published=2, subscribers=3), ChannelPolicy())
    assert (out.frames, out.frames_per_s, out.frames_peak) == (18, 6, 6)
    assert out.pulls_peak == 6  # poke subscribers pull on every frame
    assert out.delay_mean_ms == out.delay_max_ms == 0


def test_a_window_sends_one_frame_per_window_and_holds_the_rest():
    # 2 messages/s at .25 and .75 of each second, window 0.7 s. Sends: .25 (at once, opens [.25, .95)),
    # .95 (.75), 1.65 (1.25), 2.35 (1.75 and 2.25), 3.05 (2.75): 5 frames per subscriber, 6 messages.
    out = replay(seconds(3, published=2, subscribers=3), ChannelPolicy(window=0.7))
    assert out.frames == pytest.approx(15)
    assert out.frames_per_s == pytest.approx(5)
    assert out.frames_peak == pytest.approx(6)  # the first second: .25 and .95
    # Held: 0, 200, 400, 600, 100 and 300 ms.
    assert out.delay_mean_ms == pytest.approx(1600 / 6)
    assert out.delay_max_ms == pytest.approx(600)


def test_a_busy_channel_under_a_window_gets_one_frame_per_window():
    # 500 messages/s for a minute, window 0.25 s: 4 frames/s to each of 50 subscribers (two replicas of 25).
    out = replay(seconds(60, published=500, subscribers=50, replicas=2), ChannelPolicy(window=0.25))
    assert out.frames_per_s == pytest.approx(200, rel=0.01)
    assert out.delay_max_ms == pytest.approx(250, abs=1)
    assert 100 < out.delay_mean_ms < 150  # held for a uniform share of the window: about half of it


def test_poke_spreading_caps_the_pulls_at_the_rate():
    # One change, 20 poke subscribers, poke_rate 10/s: pokes every 0.1 s from .5 to 2.4 (2 s spread).
    points = [Point(T0, published=1, subscribers=20, replicas=1), *seconds(3, 0, 20)[1:]]
    out = replay(points, ChannelPolicy(poke_rate=10))
    assert out.pulls_peak == pytest.approx(10)  # second 1 holds 10 of the 20 slots
    assert out.pulls_per_s * len(points) == pytest.approx(20)
    assert out.spread_max_s == pytest.approx(2)
    assert out.poke_delay_max_ms == pytest.approx(1900)
    assert out.poke_delay_mean_ms == pytest.approx(950)


def test_many_subscribers_are_simulated_by_fewer_with_the_same_spread():
    points = [Point(T0, published=1, subscribers=2000, replicas=1), *seconds(3, 0, 2000)[1:]]
    out = replay(points, ChannelPolicy(poke_rate=1000))
    assert out.pulls_peak == pytest.approx(1000)
    assert out.pulls_per_s * len(points) == pytest.approx(2000)
    assert out.spread_max_s == pytest.approx(2)


def test_the_poke_floor_spreads_few_subscribers_over_at_least_the_floor():
    points = [Point(T0, published=1, subscribers=4, replicas=1), *seconds(2, 0, 4)[1:]]
    out = replay(points, ChannelPolicy(poke_rate=1000, poke_floor=1))
    assert out.spread_max_s == pytest.approx(1)  # 4 / 1000 s is under the floor
    assert out.pulls_peak <= 4


def test_no_traffic_is_no_frames():
    out = replay([], ChannelPolicy(window=1))
    assert out.frames == out.pulls_peak == 0
    assert replay(seconds(5, 0, 10), ChannelPolicy(window=1)).frames == 0


def test_fractional_seconds_add_up_to_the_published_count():
    # Counts spread over seconds are fractional; the replay carries the fractions and offers whole messages.
    out = replay(seconds(4, published=0.5, subscribers=1), ChannelPolicy())
    assert out.frames == pytest.approx(2)


def test_compare_shows_both_policies_and_channel_policy_checks_like_put():
    rows = compare(seconds(3, 2, 3), ChannelPolicy(), ChannelPolicy(window=0.7))
    assert rows[0] == ("frames/s out (all subscribers)", "6.00", "5.00")
    assert channel_policy({"window": 0.25}) == ChannelPolicy(window=0.25)
    with pytest.raises(ValueError, match="window"):
        channel_policy({"window": 99})
    with pytest.raises(ValueError, match="unknown field"):
        channel_policy({"windw": 1})


def test_with_subscribers_by_mode_frames_go_to_pushed_ones_and_pulls_come_from_poke_ones():
    # v2 records say 1 of the 3 subscribers is in poke mode: 2 get frames, 1 pulls.
    points = [Point(T0 + i, published=2, subscribers=3, replicas=1, poke_subscribers=1) for i in range(3)]
    out = replay(points, ChannelPolicy())
    assert (out.frames, out.frames_peak, out.pulls_peak) == (12, 4, 2)
    # Pokes spread at 10/s: the poke subscriber's pulls only, at most one per change.
    spread = replay(points, ChannelPolicy(poke_rate=10))
    assert spread.frames == pytest.approx(12) and spread.pulls_peak <= 2
    assert sum(p.poke_subscribers or 0 for p in points) == 3
