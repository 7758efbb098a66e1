"""The asyncio front's shared timers (sidecar/asgi/front.py `Ticks`): one connection's failing timer is its own."""

from __future__ import annotations

import asyncio
import logging

import pytest

from sidecar.asgi.front import Ticks


class Sleeper:
    def __init__(self, fails: bool = False) -> None:
        self.fails, self.expired_at = fails, None

    def expired(self) -> None:
        if self.fails:
            raise RuntimeError("this connection's own failure")
        self.expired_at = asyncio.get_running_loop().time()


def test_a_sleeper_that_raises_leaves_the_others_of_its_tick_to_expire(caplog: pytest.LogCaptureFixture) -> None:
    async def run() -> list[Sleeper]:
        ticks = Ticks(asyncio.get_running_loop())
        sleepers = [Sleeper(), Sleeper(fails=True), Sleeper(), Sleeper(fails=True), Sleeper()]
        start = asyncio.get_running_loop().time()
        while len(added := {ticks.add(0.01, s) for s in sleepers}) > 1:  # all in one tick (the clock moves on)
            for tick in added:
                for s in sleepers:
                    ticks.remove(tick, s)
        await asyncio.sleep(0.2)
        assert all(s.expired_at is not None and s.expired_at >= start + 0.01 for s in sleepers if not s.fails)
        return sleepers

    with caplog.at_level(logging.ERROR, "sidecar.asgi.front"):
        asyncio.run(run())
    assert [r.getMessage() for r in caplog.records] == ["a connection's timer failed"] * 2
