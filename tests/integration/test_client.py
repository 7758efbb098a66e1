"""sidecar.client against real sidecars on a real Redis (its sans-IO half: tests/unit/test_stream.py)."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import requests

from sidecar.client import AsyncClient, Client
from sidecar.config import Settings
from sidecar.core import merge
from sidecar.publish import Publisher
from sidecar.store import Store
from tests.processes import EmbeddedRedis, SidecarProcess

FAST_RETRY = {"SIDECAR_SSE_RETRY_MS": "50"}  # reconnect within 50-100 ms (the server jitters it up to 2x)


@pytest.fixture
def publisher(request: pytest.FixtureRequest) -> Publisher:
    """To the module's default sidecar's Redis when the test takes `shared_sidecar` (it needs no sidecar of its
    own: channels no other test uses), else to the test's own `redis_server`."""
    if "shared_sidecar" in request.fixturenames:
        return Publisher.from_url(request.getfixturevalue("shared_sidecar").redis_url)
    return Publisher.from_url(request.getfixturevalue("redis_server").url)


def random_patch(rng: random.Random, depth: int = 0) -> dict[str, Any]:
    """A merge patch over a small key space, so patches overwrite, nest into and delete each other's keys."""
    patch: dict[str, Any] = {}
    for _ in range(rng.randint(1, 3)):
        key = rng.choice("abcdef")
        roll = rng.random()
        if roll < 0.2:
            patch[key] = None
        elif roll < 0.45 and depth < 3:
            patch[key] = random_patch(rng, depth + 1)
        else:
            patch[key] = rng.choice([rng.randint(-5, 5), "s" * rng.randint(0, 3), [1, None, {}], True, 1.5])
    return patch


def server_state(url: str, channel: str) -> Any:
    response = requests.get(f"{url}/channels/{channel}/state", timeout=5)
    response.raise_for_status()
    return response.json()["state"]


@pytest.mark.parametrize("window", ["0", "0.05"])
def test_sync_client_state_equals_the_server_snapshot_after_100_random_diffs(
    window: str, redis_server: EmbeddedRedis, sidecar_process: Callable[..., SidecarProcess], publisher: Publisher
) -> None:
    # window "0.05": the sidecar coalesces each channel's messages over 50 ms into frames with `seq_from`.
    sidecar = sidecar_process(redis_server.url, SIDECAR_COALESCE_WINDOW=window)
    publisher.state("board:1", "created", {"title": "board"})
    rng = random.Random(7)
    expected: Any = {"title": "board"}
    with Client(sidecar.url, channels=["board:1"], mode="diff") as client:
        frames = client.messages(timeout=10)
        first = next(frames)
        assert (first["type"], first["seq"], first["state"]) == ("snapshot", 1, {"title": "board"})
        for i in range(100):
            if rng.random() < 0.1:
                expected = {"replaced": i}
                publisher.state("board:1", "replaced", expected)
            else:
                patch = random_patch(rng)
                expected = merge.apply(expected, patch)
                publisher.diff("board:1", "edited", patch, data={"i": i})
        ranges = []
        for msg in frames:
            assert msg["type"] == "message"
            ranges.append((msg.get("seq_from", msg["seq"]), msg["seq"]))
            if msg["seq"] == 101:
                break
        covered = [seq for first_seq, last_seq in ranges for seq in range(first_seq, last_seq + 1)]
        assert covered == list(range(2, 102))
        assert (len(ranges) < 100) == (window != "0")
        assert client.state("board:1") == expected == server_state(sidecar.url, "board:1")


@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_client_fails_over_to_another_sidecar_without_duplicates_or_holes(
    flavour: str,
    redis_server: EmbeddedRedis,
    sidecar_process: Callable[..., SidecarProcess],
    publisher: Publisher,
) -> None:
    a, b = sidecar_process(redis_server.url, **FAST_RETRY), sidecar_process(redis_server.url, **FAST_RETRY)
    n = 60  # messages per channel, published while the client follows; sidecar A dies half way
    publisher.state("fo:state", "created", {"step": 0})
    publisher.event("fo:events", "created")

    def publish() -> None:
        for i in range(1, n + 1):
            publisher.diff("fo:state", "step", {"step": i, f"k{i % 7}": i})
            publisher.event("fo:events", "tick", {"i": i})
            time.sleep(0.005)

    writer = threading.Thread(target=publish)
    frames: list[dict] = []

    def on_frame(msg: dict) -> bool:
        """Record a frame, start publishing after the first, kill A half way; True when all are in."""
        frames.append(msg)
        if len(frames) == 1:
            writer.start()
        if len(frames) == n and a.running:
            a.kill()
        return len({(m["channel"], m["seq"]) for m in frames if m["type"] == "message"}) == 2 * n

    deadline = time.monotonic() + 30
    channels = ["fo:events", "fo:state"]
    if flavour == "sync":
        with Client([a.url, b.url], channels=channels, mode="diff") as client:
            for msg in client.messages(timeout=10):
                if on_frame(msg) or time.monotonic() > deadline:
                    break
            state = client.state("fo:state")
    else:

        async def follow() -> Any:
            async with AsyncClient([a.url, b.url], channels=channels, mode="diff") as client:
                async for msg in client.messages(timeout=10):
                    if on_frame(msg) or time.monotonic() > deadline:
                        break
                return client.state("fo:state")

        state = asyncio.run(follow())
    writer.join(10)

    assert not a.running, "sidecar A was never killed"
    assert (frames[0]["type"], frames[0]["channel"], frames[0]["seq"]) == ("snapshot", "fo:state", 1)
    for channel in channels:
        seqs = [m["seq"] for m in frames[1:] if m["channel"] == channel]
        assert seqs == list(range(2, n + 2)), channel  # every message exactly once, in order
    assert all(m["type"] == "message" for m in frames[1:])  # resumed exactly: no snapshot, no reset
    assert state == server_state(b.url, "fo:state")


def test_async_client_receives_what_the_sync_client_receives(
    shared_sidecar: SidecarProcess, publisher: Publisher
) -> None:
    sidecar = shared_sidecar
    publisher.diff("same:1", "created", {"n": 0})
    channels = ["same:1", "same:2"]
    writer = threading.Thread(target=publish_mixed, args=(publisher, 20))

    def done(msgs: list[dict]) -> bool:
        return sum(m["type"] == "message" for m in msgs) == 40

    async def follow_async() -> tuple[list[dict], list[Any]]:
        got: list[dict] = []
        async with AsyncClient(sidecar.url, channels=channels) as client:
            async for msg in client.messages(timeout=5):
                got.append(msg)
                if len(got) == 1:
                    writer.start()  # both clients are in: publish
                if done(got):
                    break
            return got, [client.state(c) for c in channels]

    with Client(sidecar.url, channels=channels) as client:
        frames = client.messages(timeout=5)
        sync_got = [next(frames)]  # the snapshot of same:1: the client is in
        async_got, async_states = asyncio.run(follow_async())
        for msg in frames:
            sync_got.append(msg)
            if done(sync_got):
                break
        sync_states = [client.state(c) for c in channels]
    writer.join(10)

    assert async_got[0]["type"] == "snapshot"

    def per_channel(got: list[dict]) -> dict[str, list[dict]]:
        # Order holds per channel only: two channels live in different shards, read in batches.
        return {c: [m for m in got if m["channel"] == c] for c in channels}

    assert per_channel(async_got) == per_channel(sync_got)
    assert [m["seq"] for m in per_channel(async_got)["same:2"]] == list(range(1, 21))
    assert async_states == sync_states == [{"n": 20}, {"i": 20}]


def publish_mixed(publisher: Publisher, n: int) -> None:
    """Diffs on same:1; pokes and every 5th a full state on same:2."""
    for i in range(1, n + 1):
        publisher.diff("same:1", "inc", {"n": i})
        if i % 5:
            publisher.poke("same:2")
        else:
            publisher.state("same:2", "replaced", {"i": i})


def test_client_replaces_its_state_when_the_channel_loses_its_history(
    shared_sidecar: SidecarProcess, publisher: Publisher
) -> None:
    sidecar = shared_sidecar
    redis_client = publisher.store.redis  # only lost:1's keys are deleted: the shared sidecar may stay
    publisher.diff("lost:1", "created", {"a": 1})
    keys = Store(redis_client, Settings()).keys("lost:1")
    with Client(sidecar.url, channels=["lost:1"]) as client:
        frames = client.messages(timeout=5)
        old = next(frames)
        publisher.diff("lost:1", "edited", {"b": 2})
        assert next(frames)["seq"] == 2
        redis_client.delete(keys.history, keys.meta, keys.patches)  # as Redis without persistence restarting
        publisher.diff("lost:1", "reborn", {"c": 3})
        frame = next(frames)
        assert frame["epoch"] != old["epoch"]
        assert frame["type"] == "snapshot" and frame["state"] == {"c": 3}
        assert client.state("lost:1") == {"c": 3}
        publisher.diff("lost:1", "edited", {"d": 4})
        assert next(frames)["seq"] == 2
        assert client.state("lost:1") == {"c": 3, "d": 4}


def test_client_waits_out_a_503_and_resumes_when_redis_is_back(
    redis_server: EmbeddedRedis, sidecar_process: Callable[..., SidecarProcess], publisher: Publisher
) -> None:
    sidecar = sidecar_process(redis_server.url, **FAST_RETRY)
    sidecar.allow_tracebacks = True
    publisher.diff("down:1", "created", {"n": 1})
    told: list[float] = []

    with Client(sidecar.url, channels=["down:1"]) as client:

        def come_back() -> None:
            # Only once the client was told 503: the sidecar's redis-py retries could outlast a short outage.
            deadline = time.monotonic() + 10
            while not client._retry_after and time.monotonic() < deadline:
                time.sleep(0.005)
            told.append(time.monotonic())
            redis_server.start()
            Publisher.from_url(redis_server.url).diff("down:1", "edited", {"n": 2})

        frames = client.messages(timeout=15)
        assert next(frames)["state"] == {"n": 1}
        redis_server.stop()  # SIGTERM: the AOF keeps what was published
        client._drop()  # the stream is cut while Redis is away: the reconnect meets a 503 with Retry-After: 1
        back = threading.Thread(target=come_back)
        back.start()
        msg = next(frames)
        back.join(10)
        assert (msg["seq"], client.state("down:1")) == (2, {"n": 2})
        assert time.monotonic() - told[0] >= 0.95  # Retry-After: 1, less the polling above
