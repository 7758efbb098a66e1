"""sidecar.core.stream, the client's sans-IO half: HTTP responses and SSE events fed in pieces, channel tracking."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from sidecar.core.stream import Events, Response, Tracker


def feed_bytewise(response: Response, data: bytes) -> bytes:
    return b"".join(response.feed(data[i : i + 1]) for i in range(len(data)))


def test_response_decodes_chunked_bodies_fed_one_byte_at_a_time() -> None:
    raw = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-A: b\r\n\r\n5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\n\r\n"
    )
    response = Response()
    assert feed_bytewise(response, raw) == b"hello, world"
    assert (response.status, response.headers["x-a"], response.done) == (200, "b", True)


def test_response_stops_at_content_length() -> None:
    response = Response()
    assert response.feed(b"HTTP/1.1 404 NOT FOUND\r\nContent-Length: 4\r\n\r\nabcdEXTRA") == b"abcd"
    assert (response.status, response.done) == (404, True)


def frame(seq: int, epoch: str = "ab", **extra: Any) -> str:
    body = {"type": "message", "channel": "c", "id": f"{seq}-0", "seq": seq, "epoch": epoch, "event": "e"}
    return orjson.dumps({**body, **extra}).decode()


def deliver(tracker: Tracker, data: str) -> list[dict]:
    """Feed one `message` event and hand its frames over, as the clients do."""
    frames = tracker.feed("message", data)
    for f in frames:
        tracker.apply(f)
    return frames


def pull(tracker: Tracker, answer: dict | None) -> list[dict]:
    frames = tracker.pulled("c", answer)
    for f in frames:
        tracker.apply(f)
    return frames


def test_tracker_state_follows_what_was_handed_over_not_what_was_read() -> None:
    tracker = Tracker(["c"], "diff")
    pull(tracker, {"id": "1-0", "seq": 1, "epoch": "ab", "state": {}})
    read = tracker.feed("message", frame(2, diff={"a": 1})) + tracker.feed("message", frame(3, diff={"a": 2}))
    assert tracker.cursor() == "3-0~ab"  # a reconnect now must not bring 2 and 3 again
    tracker.apply(read[0])
    assert tracker.channels["c"].state == {"a": 1}


def test_tracker_reconnecting_drops_the_pull_and_what_it_held() -> None:
    tracker = Tracker(["c"], "diff")
    pull(tracker, {"id": "1-0", "seq": 1, "epoch": "ab", "state": {}})
    assert deliver(tracker, frame(3)) == [] and tracker.stale() == ["c"]
    tracker.reconnecting()  # the cursor still says 1-0: the server's catch-up brings 2 and 3
    assert tracker.stale() == [] and tracker.cursor() == "1-0~ab"
    assert [m["seq"] for m in deliver(tracker, frame(2)) + deliver(tracker, frame(3))] == [2, 3]


# -- tests/vectors/protocol.json: the client rules, shared with realtime.js (tests/browser/test_vectors.py) -----
VECTORS = orjson.loads((Path(__file__).parents[1] / "vectors" / "protocol.json").read_bytes())


def name(case: dict) -> str:
    return case["name"]


@pytest.mark.parametrize("bytewise", [False, True], ids=["whole", "bytewise"])
@pytest.mark.parametrize("case", VECTORS["sse"], ids=name)
def test_sse_vectors(case: dict, bytewise: bool) -> None:
    events = Events()
    for step in case["steps"]:
        data = step["in"].encode()
        chunks = [data[i : i + 1] for i in range(len(data))] if bytewise else [data]
        assert [list(e) for chunk in chunks for e in events.feed(chunk)] == step["events"], step["in"]
    if "retry" in case:
        assert events.retry == case["retry"]
    if "last_event_id" in case:
        assert events.last_id == case["last_event_id"]


def handed_over(frame: dict) -> dict:
    """A frame as a vector's `out` holds it."""
    if frame["type"] == "message":
        return {k: frame[k] for k in ("type", "channel", "id")}
    return {k: frame[k] for k in ("type", "channel", "id", "seq", "epoch", "state", "reason") if k in frame}


@pytest.mark.parametrize("case", VECTORS["tracker"], ids=name)
def test_tracker_vectors(case: dict) -> None:
    tracker, events = Tracker(case["channels"], case["mode"]), Events()
    for i, step in enumerate(orjson.loads(orjson.dumps(case["steps"]))):  # a copy: the tracker keeps frames
        if "pulled" in step:
            frames = tracker.pulled(step["pulled"], step["answer"])
        elif "frame" in step:
            frames = tracker.frame(step["frame"])
        else:
            frames = [f for e in events.feed(step["sse"].encode()) for f in tracker.feed(*e)]
        for f in frames:
            tracker.apply(f)
        assert [handed_over(f) for f in frames] == step["out"], f"step {i}"
        for channel, want in step.get("expect", {}).items():
            ch = tracker.channels[channel]
            assert {"id": ch.id, "seq": ch.seq, "epoch": ch.epoch, "state": ch.state, "stale": ch.stale} == want, (
                f"step {i}"
            )
