"""The per-connection session as pure logic: events in (frames queued, a wait that ran out, a client frame, the
clock), actions out. No sockets: a fake clock is a number moved by hand, frames are read back from the queue."""

from __future__ import annotations

from dataclasses import dataclass

import orjson
import pytest

from sidecar.auth import OPEN, Grant
from sidecar.core.connection import SSE, WS, Connection
from sidecar.core.hub import Hub, Sync
from sidecar.core.protocol import SSE_KEEPALIVE, WS_PING, Position, ProtocolError, sse_frame, sse_id_line
from sidecar.core.session import (
    CLOSE_INVALID,
    CLOSE_TRY_AGAIN,
    CLOSE_UNAUTHORIZED,
    CLOSE_UNSUPPORTED,
    RESYNC,
    STORE_DOWN,
    TOKEN_EXPIRED,
    Authenticate,
    Close,
    Session,
    Subscribe,
    Wait,
    Write,
    admission,
    busy,
    sse_request,
)

T0 = 1_800_000_000.0  # the fake clock's start (epoch seconds)


@dataclass(frozen=True)
class Limits:
    keepalive: float = 15.0
    auth_timeout: float = 10.0
    subscribe_rate: float = 2.0
    subscribe_burst: int = 3
    max_frame_bytes: int = 65_536
    max_channels: int = 2
    sse_retry_ms: int = 2_000


def session(transport: str = WS, grant: Grant | None = OPEN, **limits: float) -> Session:
    hub = Hub()
    conn = hub.connect(Connection(transport, lambda: None))
    return Session(conn, hub, Limits(**limits), grant, T0)  # type: ignore[arg-type]


def replies(s: Session) -> list[dict]:
    """The WebSocket frames queued on the session's connection, as JSON (unmasked text frames)."""
    out = []
    for frame in s.conn.drain():
        n = frame[1] & 0x7F
        out.append(orjson.loads(frame[2 if n < 126 else 4 if n == 126 else 10 :]))
    return out


def subscribed(s: Session, channel: str) -> None:
    sub = s.hub.subscribe(s.conn, channel, "diff")  # type: ignore[attr-defined]
    s.hub.start(sub, Sync(Position(), 0))  # type: ignore[attr-defined]
    s.conn.drain()


# -- the loop -----------------------------------------------------------------------------------------------
def test_an_idle_socket_sleeps_until_the_keepalive_and_then_pings() -> None:
    s = session(WS)
    assert s.next(T0) == Wait(T0 + 15.0)
    s.timer_fired()
    assert s.next(T0 + 15.0) == Write(WS_PING)
    assert s.next(T0 + 15.0) == Wait(T0 + 30.0)  # one ping per quiet keepalive


def test_an_idle_stream_gets_the_sse_comment_as_its_keepalive() -> None:
    s = session(SSE)
    s.timer_fired()
    assert s.next(T0 + 15.0) == Write(SSE_KEEPALIVE)


def test_queued_frames_go_out_as_one_write_and_replace_the_keepalive() -> None:
    s = session(WS)
    s.conn.push(b"a")
    s.conn.push(b"b")
    s.timer_fired()
    assert s.next(T0 + 15.0) == Write(b"ab", frames=True)
    assert s.next(T0 + 15.0) == Wait(T0 + 30.0)  # the frames were traffic enough: no ping


def test_a_write_the_sink_owes_is_finished_even_without_new_frames() -> None:
    assert session().next(T0, owed=True) == Write(b"", frames=False)


def test_a_dropped_backlog_is_resynchronised_before_anything_is_written() -> None:
    s = session(WS)
    subscribed(s, "a")
    s.conn.resync.add("a")
    assert s.next(T0) is RESYNC
    s.conn.resync.clear()  # what the relay's resync does once it has read
    assert isinstance(s.next(T0), Wait)


def test_a_socket_without_a_token_is_closed_at_its_auth_deadline() -> None:
    s = session(WS, grant=None)
    assert s.next(T0) == Wait(T0 + 10.0)  # the auth deadline comes before the keepalive
    assert s.next(T0 + 9.9) == Wait(T0 + 10.0)
    assert s.next(T0 + 10.0) == Close(CLOSE_UNAUTHORIZED, "no token within 10 s")


def test_a_websocket_closes_on_its_tokens_expiry_before_writing_what_is_queued() -> None:
    s = session(WS, grant=Grant(("*",), expires=T0 + 5))
    assert s.next(T0) == Wait(T0 + 5)  # woken for the expiry, not the keepalive
    s.conn.push(b"late")
    assert s.next(T0 + 5) == Close(CLOSE_UNAUTHORIZED, "the token has expired")


def test_a_stream_writes_what_it_has_then_ends_with_token_expired() -> None:
    s = session(SSE, grant=Grant(("*",), expires=T0 + 5))
    s.conn.push(b"last")
    assert s.next(T0 + 5) == Write(b"last", frames=True)
    close = s.next(T0 + 5)
    assert isinstance(close, Close) and close.data == sse_frame("error", TOKEN_EXPIRED)
    assert orjson.loads(TOKEN_EXPIRED)["code"] == "token-expired"


# -- an SSE stream's start ----------------------------------------------------------------------------------
@pytest.mark.parametrize(("jitter", "retry"), [(0.0, b"retry: 2000\n\n"), (0.5, b"retry: 3000\n\n"),
                                               (0.99995, b"retry: 3999\n\n")])  # fmt: skip
def test_a_stream_starts_with_its_jittered_retry_alone_then_ready_after_the_subscribes_frames(
    jitter: float, retry: bytes
) -> None:
    s = session(SSE)
    subscribed(s, "a")
    s.conn.push(b"catch-up")  # what the subscribe queued
    s.stream(["a"], "state", jitter)
    assert s.next(T0) == Write(retry)  # on its own: the front may send it with the headers
    ready = sse_id_line(s.conn.cursor()) + sse_frame("ready", b'{"type":"ready","channels":["a"],"mode":"state"}')
    assert s.next(T0) == Write(b"catch-up" + ready, frames=True)
    assert s.next(T0) == Wait(T0 + 15.0)


def test_a_stream_whose_token_expired_still_writes_its_head_and_ready_then_token_expired() -> None:
    s = session(SSE, grant=Grant(("*",), expires=T0 + 5))
    subscribed(s, "a")
    s.stream(["a"], "diff", 0.0)
    assert s.next(T0 + 5) == Write(b"retry: 2000\n\n")
    assert isinstance(s.next(T0 + 5), Write)
    assert s.next(T0 + 5) == Close(CLOSE_UNAUTHORIZED, "the token has expired", sse_frame("error", TOKEN_EXPIRED))


def test_a_websocket_has_no_head() -> None:
    assert session(WS).next(T0) == Wait(T0 + 15.0)


# -- refusals -----------------------------------------------------------------------------------------------
def test_busy_gives_the_503_body_the_close_reason_and_a_whole_retry_after() -> None:
    body, reason, after = busy(2.3456)
    assert orjson.loads(body) == {"error": "busy", "message": reason, "retry_ms": 2346}
    assert (reason, after) == ("too many connections; retry in 2346 ms", "3")
    assert busy(0.0)[1:] == ("too many connections; retry in 1 ms", "1")  # never "retry in 0"


def test_admission_closes_a_refused_websocket_with_1013_saying_when() -> None:
    assert admission(None) is None
    assert admission(0.25) == Close(CLOSE_TRY_AGAIN, "too many connections; retry in 250 ms")
    assert STORE_DOWN.code == CLOSE_TRY_AGAIN


def test_a_refused_token_closes_with_3000_and_its_reason_without_asking_admission() -> None:
    s = session(grant=None)
    asked: list[int] = []
    assert s.authenticate("the token has expired", lambda: asked.append(1) or None) == Close(
        CLOSE_UNAUTHORIZED, "the token has expired"
    )
    assert (asked, s.grant, replies(s)) == ([], None, [])


def test_a_valid_token_admitted_holds_and_is_answered_authorized() -> None:
    s = session(grant=None)
    grant = Grant(("*",), expires=T0 + 60)
    assert s.authenticate(grant, lambda: None) is None
    assert s.grant is grant
    assert replies(s) == [{"type": "authorized", "expires": T0 + 60}]
    assert s.next(T0 + 10) == Wait(T0 + 25)  # no auth deadline any more


def test_a_valid_token_on_a_full_replica_closes_with_1013_and_grants_nothing() -> None:
    s = session(grant=None)
    full = s.authenticate(Grant(("*",)), lambda: 1.5)
    assert full == Close(CLOSE_TRY_AGAIN, "too many connections; retry in 1500 ms")
    assert (s.grant, replies(s)) == (None, [])


# -- client frames ------------------------------------------------------------------------------------------
def test_ping_is_answered_with_the_clocks_time_in_milliseconds() -> None:
    s = session()
    assert s.receive('{"op": "ping"}', T0 + 1.5) is None
    assert replies(s) == [{"type": "pong", "ts": (T0 + 1.5) * 1000}]


def test_a_binary_frame_closes_with_1003_and_a_bad_text_frame_with_1007() -> None:
    binary = session().receive(b'{"op": "ping"}', T0)
    assert isinstance(binary, Close) and binary.code == CLOSE_UNSUPPORTED
    bad = session().receive("not json", T0)
    assert isinstance(bad, Close) and bad.code == CLOSE_INVALID


def test_subscribe_asks_the_front_to_subscribe_from_the_given_position() -> None:
    s = session()
    asked = s.receive('{"op": "subscribe", "channel": "a", "mode": "state", "since": "5-0", "epoch": "e1"}', T0)
    assert asked == Subscribe("a", "state", Position("5-0", "e1"))
    assert s.receive('{"op": "subscribe", "channel": "b"}', T0) == Subscribe("b", "diff", None)
    assert replies(s) == []


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ('{"op": "subscribe", "channel": "no spaces"}', "bad-channel"),
        ('{"op": "subscribe", "channel": "secret:1"}', "forbidden"),
        ('{"op": "subscribe", "channel": "a", "mode": "loud"}', "bad-mode"),
        ('{"op": "subscribe", "channel": "a", "since": 5}', "bad-since"),
        ('{"op": "dance"}', "unknown-op"),
    ],
)
def test_a_bad_request_is_answered_with_an_error_and_the_socket_stays(frame: str, code: str) -> None:
    s = session(grant=Grant(("a", "b")))
    assert s.receive(frame, T0) is None
    [reply] = replies(s)
    assert reply["type"] == "error" and reply["code"] == code


def test_subscribe_before_auth_is_refused_until_the_token_comes() -> None:
    s = session(grant=None)
    assert s.receive('{"op": "subscribe", "channel": "a"}', T0) is None
    assert [r["code"] for r in replies(s)] == ["unauthorized"]
    assert s.receive('{"op": "auth", "token": "t"}', T0) == Authenticate("t")
    assert s.receive('{"op": "auth", "token": 5}', T0) == Authenticate(None)


def test_subscribes_are_rate_limited_by_the_clock() -> None:
    s = session(subscribe_burst=2, subscribe_rate=2.0)
    for _ in range(2):
        assert isinstance(s.receive('{"op": "subscribe", "channel": "a"}', T0), Subscribe)
    assert s.receive('{"op": "subscribe", "channel": "a"}', T0) is None
    [reply] = replies(s)
    assert reply["code"] == "rate-limited" and "0.50 s" in reply["message"]
    assert isinstance(s.receive('{"op": "subscribe", "channel": "a"}', T0 + 0.5), Subscribe)


def test_a_connection_holds_at_most_max_channels() -> None:
    s = session(max_channels=1)
    subscribed(s, "a")
    assert isinstance(s.receive('{"op": "subscribe", "channel": "a"}', T0), Subscribe)  # again: a re-subscribe
    assert s.receive('{"op": "subscribe", "channel": "b"}', T0) is None
    assert [r["code"] for r in replies(s)] == ["too-many-channels"]


def test_a_fresh_token_that_grants_less_unsubscribes_what_it_no_longer_covers() -> None:
    s = session(grant=Grant(("*",), expires=T0 + 5))
    subscribed(s, "a")
    subscribed(s, "b")
    s.authorized(Grant(("a",), expires=T0 + 60))
    assert list(s.conn.subs) == ["a"]
    assert [(r["type"], r.get("channel")) for r in replies(s)] == [("error", "b"), ("authorized", None)]
    assert s.next(T0 + 5) == Wait(T0 + 20)  # the new expiry holds, not the old one


def test_unsubscribe_leaves_the_channel_and_says_so() -> None:
    s = session()
    subscribed(s, "a")
    assert s.receive('{"op": "unsubscribe", "channel": "a"}', T0) is None
    assert s.conn.subs == {}
    assert replies(s) == [{"type": "unsubscribed", "channel": "a"}]


# -- the SSE request ----------------------------------------------------------------------------------------
def test_sse_request_sorts_channels_checks_the_grant_then_reads_the_cursor() -> None:
    seen: list[list[str]] = []
    channels, mode, positions = sse_request(["b", "a", "b"], "state", "1-0~e,2-0~e", 5, seen.append)
    assert (channels, mode, seen) == (["a", "b"], "state", [["a", "b"]])
    assert positions == {"a": Position("1-0", "e"), "b": Position("2-0", "e")}


def test_sse_request_refuses_before_it_reads_a_cursor() -> None:
    def refuse(names: list[str]) -> None:
        raise PermissionError(names)

    with pytest.raises(PermissionError):
        sse_request(["a"], "diff", "not a cursor", 5, refuse)


@pytest.mark.parametrize(
    ("channels", "mode", "cursor", "code"),
    [([], "diff", None, "no-channel"), (["a", "b", "c"], "diff", None, "too-many-channels"),
     (["a"], "loud", None, "bad-mode"), (["a"], "diff", "1-0~e,2-0~e", "bad-cursor"), (["a b"], "diff", None,
     "bad-channel")],
)  # fmt: skip
def test_sse_request_errors(channels: list[str], mode: str, cursor: str | None, code: str) -> None:
    with pytest.raises(ProtocolError) as caught:
        sse_request(channels, mode, cursor, 2, lambda names: None)
    assert caught.value.code == code
