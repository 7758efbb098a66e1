"""sidecar.core.stream, the client's sans-IO half: HTTP responses and SSE events fed in pieces, channel tracking."""

from __future__ import annotations

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


def test_events_follow_the_sse_format() -> None:
    events = Events()
    stream = b'retry: 1500\n\n: keep-alive\n\nid: 1-0~ab\nevent: message\ndata: {"a":\ndata:1}\r\n\r\ndata: x\n'
    assert feed_bytewise_events(events, stream) == [("message", '{"a":\n1}')]
    assert events.retry == 1500
    assert events.feed(b"\n") == [("message", "x")]


def feed_bytewise_events(events: Events, data: bytes) -> list[tuple[str, str]]:
    return [e for i in range(len(data)) for e in events.feed(data[i : i + 1])]


def frame(seq: int, epoch: str = "ab", **extra: Any) -> str:
    body = {"type": "message", "channel": "c", "id": f"{seq}-0", "seq": seq, "epoch": epoch, "event": "e"}
    return orjson.dumps({**body, **extra}).decode()


def deliver(tracker: Tracker, data: str) -> list[dict]:
    """Feed one `message` event and hand its frames over, as the clients do."""
    frames = tracker.feed("message", data)
    for f in frames:
        tracker.apply(f)
    return frames


def pull(tracker: Tracker, answer: dict | None, reason: str | None = None) -> dict | None:
    frame = tracker.pulled("c", answer, reason)
    if frame is not None:
        tracker.apply(frame)
    return frame


def test_tracker_drops_duplicates_and_applies_diffs() -> None:
    tracker = Tracker(["c"], "diff")
    pull(tracker, {"id": "1-0", "seq": 1, "epoch": "ab", "state": {"a": 1}})
    assert deliver(tracker, frame(2, diff={"b": 2})) != []
    assert deliver(tracker, frame(2, diff={"b": 2})) == []
    assert deliver(tracker, frame(1, diff={"x": 0})) == []
    assert tracker.stale() == []  # duplicates are not holes
    assert tracker.channels["c"].state == {"a": 1, "b": 2}
    assert deliver(tracker, frame(3, state={"z": 1})) != []
    assert tracker.channels["c"].state == {"z": 1}
    assert tracker.cursor() == "3-0~ab"


def test_tracker_state_follows_what_was_handed_over_not_what_was_read() -> None:
    tracker = Tracker(["c"], "diff")
    pull(tracker, {"id": "1-0", "seq": 1, "epoch": "ab", "state": {}})
    read = tracker.feed("message", frame(2, diff={"a": 1})) + tracker.feed("message", frame(3, diff={"a": 2}))
    assert tracker.cursor() == "3-0~ab"  # a reconnect now must not bring 2 and 3 again
    tracker.apply(read[0])
    assert tracker.channels["c"].state == {"a": 1}


@pytest.mark.parametrize(("bad", "reason"), [(frame(3), "hole"), (frame(2, epoch="cd"), "epoch")])
def test_tracker_pulls_again_after_a_hole_or_an_epoch_change(bad: str, reason: str) -> None:
    tracker = Tracker(["c"], "diff")
    pull(tracker, {"id": "1-0", "seq": 1, "epoch": "ab", "state": {"a": 1}})
    assert deliver(tracker, bad) == []
    assert tracker.stale() == ["c"]
    assert deliver(tracker, frame(4)) == []  # the pull will cover it
    snapshot = pull(tracker, {"id": "4-0", "seq": 4, "epoch": "ab", "state": {"a": 2}}, reason)
    assert snapshot == {
        "type": "snapshot",
        "channel": "c",
        "id": "4-0",
        "seq": 4,
        "epoch": "ab",
        "state": {"a": 2},
        "reason": reason,
    }
    assert tracker.stale() == [] and tracker.channels["c"].state == {"a": 2}
    assert [m["seq"] for m in deliver(tracker, frame(5))] == [5]


def test_tracker_accepts_a_folded_poke_by_its_seq_from() -> None:
    tracker = Tracker(["c"], "poke")
    pull(tracker, {"id": "1-0", "seq": 1, "epoch": "ab", "state": None})
    assert [m["seq"] for m in deliver(tracker, frame(4, seq_from=2))] == [4]
    assert deliver(tracker, frame(6, seq_from=6)) == []
    assert tracker.stale() == ["c"]
    assert tracker.channels["c"].state is None  # no local state in poke mode
