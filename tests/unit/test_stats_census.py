"""The one pass of Stats.collect() over connections that come and go (the record itself: test_stats.py)."""

from __future__ import annotations

from sidecar.config import Settings
from sidecar.core.connection import SSE, WS
from sidecar.stats import Stats
from tests.unit.test_stats import PATTERNS, Clock, fake_relay, message, read, subscribe


def test_drops_and_ages_follow_connections_that_come_and_go() -> None:
    clock = Clock()
    relay = fake_relay(Settings(port=8123, stats_patterns=PATTERNS), clock)
    stats = Stats(relay, clock)
    old = subscribe(relay.hub, SSE, "a:b")
    old.max_frames = 2
    read(relay, *(message("a:b", i) for i in range(1, 4)))  # old drops 3
    stats.sample()[1]()
    relay.hub.disconnect(old)
    clock.now += 4
    new = subscribe(relay.hub, WS, "a:b")  # first seen at the next sample, 4 s after the first
    new.max_frames = 2
    new.drain()
    read(relay, *(message("a:b", i) for i in range(1, 4)))  # the channel starts again (no subscriber was left)
    new.push(b"x" * 10)
    clock.now += 1
    record, commit = stats.sample()
    commit()
    assert record["slow"] == new.dropped == 3 and record["conn"] == {"ws": 1}
    assert [row["age"] for row in record["slowest"]] == [0.0]
    clock.now += 2
    again = stats.sample()[0]
    assert [row["age"] for row in again["slowest"]] == [2.0] and again["slow"] == 0  # its drops counted once
    assert set(stats._opened) == {new.id}  # a closed connection is forgotten
