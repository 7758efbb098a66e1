"""A connection's SSE framing: one-channel connections share their frames, through their hub (no process-global
cache: two hubs in one process, as the tests and an embedded relay run them, keep their own)."""

from __future__ import annotations

from sidecar.core.connection import SSE, Connection, SseFrames
from sidecar.core.hub import Hub, Sync
from tests.unit.test_hub import at, message, subscribed


def test_one_channel_streams_of_a_hub_share_the_frame_with_its_id_line() -> None:
    hub = Hub()
    first, second = (subscribed(hub, "c:1", transport=SSE, state={}, seq=1) for _ in range(2))
    hub.dispatch([message("c:1", 2, change={"n": 2})])
    [a], [b] = first.drain(), second.drain()
    assert a is b and a.startswith(b"id: 1002-0~e1\n")


def test_hubs_keep_their_own_shared_frames_and_each_frames_its_own_position() -> None:
    hubs = [Hub(), Hub()]
    assert hubs[0].sse_frames is not hubs[1].sse_frames
    conns = [subscribed(hub, "c:1", transport=SSE, state={}, seq=1) for hub in hubs]
    for seq in (2, 3):
        for hub in hubs:  # interleaved, like two relays' readers
            hub.dispatch([message("c:1", seq, change={"n": seq})])
    for conn in conns:
        assert [f.split(b"\n", 1)[0] for f in conn.drain()] == [b"id: 1002-0~e1", b"id: 1003-0~e1"]


def test_a_connection_outside_a_hub_still_frames_its_id_line() -> None:
    conn = Connection(SSE, lambda: None)
    conn.subs["c:1"] = None  # type: ignore[assignment]
    conn.push(b"event: x\n\n", "c:1", message("c:1", 2).position)
    assert conn.drain() == [b"id: 1002-0~e1\nevent: x\n\n"]


def two_channels(hub: Hub, seqs: tuple[int, int]) -> Connection:
    conn = hub.connect(Connection(SSE, lambda: None))
    for channel, seq in zip(("c:a", "c:b"), seqs, strict=True):
        sub = hub.subscribe(conn, channel, "diff")
        hub.start(sub, Sync(at(seq), seq, b"{}"))
    conn.drain()
    return conn


def test_streams_of_several_channels_at_the_same_positions_share_the_frame_with_their_cursor() -> None:
    hub = Hub()
    same = [two_channels(hub, (1, 5)) for _ in range(2)]
    behind = two_channels(hub, (1, 3))
    hub.dispatch([message("c:a", 2, change={"n": 2})])
    [a], [b], [c] = (conn.drain() for conn in (*same, behind))
    assert a is b and a.startswith(b"id: 1002-0~e1,1005-0~e1\n")
    # Its own cursor for the stream elsewhere in c:b, on the same message's bytes after it.
    assert c.startswith(b"id: 1002-0~e1,1003-0~e1\n") and c.split(b"\n", 1)[1] == a.split(b"\n", 1)[1]
    hub.dispatch([message("c:b", 6, change={"n": 6})])
    assert [f.split(b"\n", 1)[0] for f in same[0].drain()] == [b"id: 1002-0~e1,1006-0~e1"]
    assert behind.drain() == []  # a hole in c:b (it was at 3): a resync, not a frame
    assert behind.resync == {"c:b"}


def test_streams_whose_cursors_all_differ_each_get_their_own_and_the_hub_holds_a_bounded_few() -> None:
    hub = Hub()
    conns = [two_channels(hub, (1, seq)) for seq in range(3, 3 + SseFrames.MAX_CURSORS + 50)]
    hub.dispatch([message("c:a", 2, change={"n": 2})])
    for seq, conn in enumerate(conns, 3):
        [frame] = conn.drain()
        assert frame.startswith(f"id: 1002-0~e1,{1000 + seq}-0~e1\n".encode())
    assert len(hub.sse_frames.cursors) == SseFrames.MAX_CURSORS
