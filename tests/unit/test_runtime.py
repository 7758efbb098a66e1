"""Both runtimes of the relay's seam (sidecar/runtime.py): where calls run, timer order, background loops."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from sidecar.runtime import AsyncioRuntime, GeventRuntime


def test_gevent_runtime_calls_directly_and_runs_timers_in_order() -> None:
    runtime = GeventRuntime()
    runtime.start()
    try:
        seen: list[object] = []
        runtime.call_soon(seen.append, "now")
        assert seen == ["now"]  # direct: the caller is on the hub's thread
        assert runtime.call(lambda: 42) == 42
        done = threading.Event()
        t = time.monotonic()
        runtime.call_at(t + 0.06, lambda: (seen.append(3), done.set()))
        runtime.call_at(t + 0.02, lambda: seen.append(1))
        runtime.call_at(t + 0.04, lambda: seen.append(2))
        runtime.call_at(t + 0.03, lambda: seen.append("cancelled")).cancel()
        assert done.wait(5)
        assert seen == ["now", 1, 2, 3]
    finally:
        runtime.stop()


def test_gevent_runtime_spawns_a_named_background_loop() -> None:
    runtime = GeventRuntime()
    ran = threading.Event()
    names: list[str] = []
    thread = runtime.spawn(lambda: (names.append(threading.current_thread().name), ran.set()), "sidecar-x")
    assert ran.wait(5)
    thread.join(5)
    assert names == ["sidecar-x"] and not thread.is_alive()


def run(coro_fn):  # noqa: ANN001, ANN201
    return asyncio.run(asyncio.wait_for(coro_fn(), 10))


def test_asyncio_runtime_runs_call_soon_from_another_thread_on_the_loop_thread() -> None:
    async def main() -> None:
        runtime = AsyncioRuntime(asyncio.get_running_loop(), pool=2)
        loop_thread = threading.get_ident()
        got: list[tuple[int, int]] = []
        arrived = asyncio.Event()

        def on_loop(i: int) -> None:
            got.append((i, threading.get_ident()))
            if len(got) == 100:
                arrived.set()

        def background() -> None:
            assert threading.get_ident() != loop_thread
            for i in range(100):
                runtime.call_soon(on_loop, i)

        thread = runtime.spawn(background, "sidecar-reader-test")
        await arrived.wait()
        thread.join(5)
        assert [i for i, _ in got] == list(range(100))  # in the order they were handed over
        assert {ident for _, ident in got} == {loop_thread}
        runtime.stop()

    run(main)


def test_asyncio_runtime_call_waits_for_the_loop_and_read_runs_in_the_pool() -> None:
    async def main() -> None:
        runtime = AsyncioRuntime(asyncio.get_running_loop(), pool=2)
        loop_thread = threading.get_ident()
        results: list[int] = []

        def background() -> None:
            results.append(runtime.call(threading.get_ident))  # computed on the loop, returned here

        thread = runtime.spawn(background, "sidecar-stats-test")
        while thread.is_alive():
            await asyncio.sleep(0.01)
        assert results == [loop_thread]
        assert runtime.call(lambda: 7) == 7  # on the loop: direct, no deadlock
        assert await runtime.read(threading.get_ident) != loop_thread

        def fails() -> None:
            raise ValueError("boom")

        errors: list[BaseException] = []

        def background_fails() -> None:
            try:
                runtime.call(fails)
            except ValueError as exc:
                errors.append(exc)

        thread = runtime.spawn(background_fails, "sidecar-fails")
        while thread.is_alive():
            await asyncio.sleep(0.01)
        assert [str(e) for e in errors] == ["boom"]
        runtime.stop()

    run(main)


def test_asyncio_runtime_timers_fire_in_order_on_the_loop_and_repeat() -> None:
    async def main() -> None:
        runtime = AsyncioRuntime(asyncio.get_running_loop())
        loop_thread = threading.get_ident()
        seen: list[object] = []
        threads: set[int] = set()
        done = asyncio.Event()
        t = time.monotonic()
        runtime.call_at(t + 0.06, lambda: (seen.append(3), done.set()))
        runtime.call_at(t + 0.02, lambda: seen.append(1))
        runtime.call_at(t + 0.04, lambda: seen.append(2))
        runtime.call_at(t + 0.03, lambda: seen.append("cancelled")).cancel()

        def from_thread() -> None:  # armed off the loop: still fires on it
            runtime.call_at(time.monotonic() + 0.01, lambda: threads.add(threading.get_ident()))

        runtime.spawn(from_thread, "sidecar-arm").join(5)
        ticks: list[float] = []
        every = runtime.every(0.01, lambda: ticks.append(time.monotonic()))
        await asyncio.wait_for(done.wait(), 5)
        every.cancel()
        n = len(ticks)
        await asyncio.sleep(0.05)
        assert seen == [1, 2, 3]
        assert threads == {loop_thread}
        assert n >= 2 and len(ticks) == n  # it repeated, and stopped once cancelled
        runtime.stop()

    run(main)


def test_asyncio_timer_that_raises_does_not_stop_the_others(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        runtime = AsyncioRuntime(asyncio.get_running_loop())
        seen: list[int] = []
        done = asyncio.Event()

        def bad() -> None:
            raise RuntimeError("bad timer")

        t = time.monotonic()
        runtime.call_at(t + 0.01, bad)
        runtime.call_at(t + 0.02, lambda: (seen.append(1), done.set()))
        await asyncio.wait_for(done.wait(), 5)
        assert seen == [1]
        runtime.stop()

    run(main)
    assert "timer" in caplog.text and "bad timer" in caplog.text
