"""The wire protocol's pure parts: names, cursors, message bodies, frame encoding (docs/protocol.md)."""

from __future__ import annotations

import orjson
import pytest

from sidecar.core.protocol import (
    MAX_CHANNEL_LEN,
    WS_PING,
    Message,
    Position,
    ProtocolError,
    control_body,
    dumps,
    encode_cursor,
    loads_exact,
    message_body,
    parse_client_frame,
    parse_cursor,
    sse_frame,
    sse_id_line,
    sse_retry,
    stream_key,
    validate_channel,
    validate_event,
    validate_mode,
    ws_text_frame,
)


# -- names ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name", ["a", "task:3f2a-b1", "sprint:7", "user@example.com", "A_b-c:d.e@f", "0", "x" * MAX_CHANNEL_LEN]
)
def test_channel_grammar_accepts_letters_digits_and_separators(name: str) -> None:
    assert validate_channel(name) == name


@pytest.mark.parametrize(
    "name",
    [
        "",
        "a{0}b",  # a Redis Cluster hash tag would pin the channel to one slot
        "{",
        "}",
        "a b",
        " a",
        "a,b",  # separates positions in a cursor
        "a~b",  # separates id and epoch in a position
        "a/b",
        "a\nb",
        "café",
        "x" * (MAX_CHANNEL_LEN + 1),
        None,
        7,
        ["a"],
    ],
)
def test_channel_grammar_refuses_braces_spaces_separators_and_long_names(name: object) -> None:
    with pytest.raises(ProtocolError) as info:
        validate_channel(name)
    assert info.value.code == "bad-channel"


def test_event_grammar_refuses_at_sign_and_long_names() -> None:
    assert validate_event("sprint-completed:v2.1") == "sprint-completed:v2.1"
    for name in ("a@b", "", "x" * 101, "a b", None):
        with pytest.raises(ProtocolError):
            validate_event(name)


def test_mode_is_one_of_four() -> None:
    assert [validate_mode(m) for m in ("poke", "state", "event", "diff")] == ["poke", "state", "event", "diff"]
    with pytest.raises(ProtocolError) as info:
        validate_mode("DIFF")
    assert info.value.code == "bad-mode"


# -- positions and cursors ----------------------------------------------------------------------------------------
def test_stream_key_orders_ids_numerically() -> None:
    assert stream_key("1700000000000-10") > stream_key("1700000000000-9")
    assert stream_key("0-0") == (0, 0)
    for bad in ("", "1", "1-", "-1", "1-0-0", "a-0", "1_0"):
        with pytest.raises(ProtocolError):
            stream_key(bad)


@pytest.mark.parametrize(
    "bad",
    [
        "1-18446744073709551616",  # 2**64: past Redis' unsigned 64-bit range
        "18446744073709551616-0",
        "99999999999999999999-0",
        "\uff11-0",  # FULLWIDTH DIGIT ONE: int() reads it, Redis does not
        "\u0661-0",  # ARABIC-INDIC DIGIT ONE
        "1-\u0660",
        "\U0001d7cf-0",  # MATHEMATICAL BOLD DIGIT ONE
    ],
)
def test_stream_ids_are_two_ascii_unsigned_64_bit_integers(bad: str) -> None:
    with pytest.raises(ProtocolError) as info:
        stream_key(bad)
    assert info.value.code == "bad-id"
    with pytest.raises(ProtocolError):
        Position.parse(bad + "~")


def test_the_largest_stream_id_redis_accepts_is_valid() -> None:
    assert stream_key("18446744073709551615-18446744073709551615") == (2**64 - 1, 2**64 - 1)
    assert parse_cursor("18446744073709551615-0~ab", ["a"]) == {"a": Position("18446744073709551615-0", "ab")}


def test_position_encodes_as_id_tilde_epoch_and_parses_back() -> None:
    position = Position("1700000000000-3", "16d3b31c")
    assert position.encode() == "1700000000000-3~16d3b31c"
    assert Position.parse(position.encode()) == position
    assert Position.parse("0-0~") == Position()


@pytest.mark.parametrize(
    "text",
    [
        "1700000000000-3",  # no `~`
        "~16d3b31c",  # no id
        "1700000000000~16d3b31c",  # not a stream id
        "1-0~16D3B31C",  # epochs are lower-case hex
        "1-0~xyz",
        "1-0~" + "a" * 33,
        "1-0~ab~cd",
    ],
)
def test_position_parse_refuses_malformed_text(text: str) -> None:
    with pytest.raises(ProtocolError) as info:
        Position.parse(text)
    assert info.value.code in ("bad-cursor", "bad-id")


def test_cursor_round_trips_one_position_per_sorted_channel() -> None:
    channels = ["a", "b:1", "c@x"]
    positions = [Position("1-0", "aa"), Position(), Position("1700000000000-12", "0123456789abcdef")]
    cursor = encode_cursor(positions)
    assert cursor == "1-0~aa,0-0~,1700000000000-12~0123456789abcdef"
    assert parse_cursor(cursor, channels) == dict(zip(channels, positions))


@pytest.mark.parametrize(("cursor", "count"), [("1-0~aa", 2), ("1-0~aa,2-0~aa", 1), ("", 1), ("1-0~aa,", 1)])
def test_cursor_with_another_count_of_positions_is_refused(cursor: str, count: int) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_cursor(cursor, [f"c{i}" for i in range(count)])
    assert info.value.code == "bad-cursor"


def test_empty_cursor_for_no_channels_is_empty() -> None:
    assert encode_cursor([]) == ""
    assert parse_cursor("", []) == {}


# -- client JSON ------------------------------------------------------------------------------------------------
def test_client_json_keeps_64_bit_integers_exact_and_refuses_larger_ones() -> None:
    edges = [2**64 - 1, -(2**63), 1e300, "123456789012345678901234567890", 12345678901234567890.5, '"1' + "0" * 30]
    assert loads_exact(orjson.dumps(edges)) == edges
    # Long digit runs that are no integer literal: a fraction, exponents, an escaped quote then digits, a key.
    literals = b'[1.0000000000000000000000001, 1e-0000000000000000000001, 2E+00000000000000000000001, '
    literals += b'"\\"' + b"1" * 30 + b'", {"' + b"0" * 20 + b'": 0}]'
    assert loads_exact(literals) == [1.0, 1e-1, 20.0, '"' + "1" * 30, {"0" * 20: 0}]
    assert loads_exact(b"[" * 1000 + b'"1234567890123456789012"' + b"]" * 1000)  # no recursion of our own
    bigs = [b"18446744073709551616", b'{"a": [-9223372036854775809]}', b'{"n": 1' + b"0" * 40 + b"}",
            b'["x\\"", 99999999999999999999]', b"[" * 900 + b"-1" + b"0" * 25 + b"]" * 900]  # fmt: skip
    for big in bigs:
        with pytest.raises(ProtocolError) as info:
            loads_exact(big)
        assert info.value.code == "bad-number"
    with pytest.raises(ProtocolError) as info:
        loads_exact(b'{"a": ')
    assert info.value.code == "bad-json"


# -- message bodies -------------------------------------------------------------------------------------------
BASE = {"type", "channel", "id", "seq", "epoch", "event", "ts"}


def message(kind: str, data: object = None, change: object = None) -> Message:
    return Message(
        channel="job:1",
        id="1700000000000-4",
        key=(1700000000000, 4),
        seq=4,
        epoch="ab12",
        event="progressed",
        ts=1700000000000.5,
        kind=kind,
        data=None if data is None else orjson.dumps(data),
        change=None if change is None else orjson.dumps(change),
    )


def body(msg: Message, mode: str, state: object = None, seq_from: int | None = None) -> dict:
    state_json = None if state is None else orjson.dumps(state)
    return orjson.loads(dumps(message_body(msg, mode, state_json, seq_from)))


def test_message_body_carries_the_common_fields() -> None:
    got = body(message("event", {"n": 1}), "poke")
    assert got == {
        "type": "message",
        "channel": "job:1",
        "id": "1700000000000-4",
        "seq": 4,
        "epoch": "ab12",
        "event": "progressed",
        "ts": 1700000000000.5,
    }


@pytest.mark.parametrize(
    ("kind", "mode", "extra"),
    [
        ("diff", "poke", set()),
        ("diff", "event", {"data"}),
        ("diff", "diff", {"data", "diff"}),
        ("diff", "state", {"state"}),
        ("state", "diff", {"data", "state"}),  # a full-state publish replaces the diff subscriber's state
        ("state", "event", {"data"}),
        ("event", "diff", {"data"}),
        ("event", "state", {"state"}),
        ("poke", "diff", set()),
        ("poke", "event", set()),
    ],
)
def test_message_body_fields_per_kind_and_mode(kind: str, mode: str, extra: set[str]) -> None:
    data = None if kind == "poke" else {"by": "worker-1"}
    change = {"done": 3} if kind in ("diff", "state") else None
    got = body(message(kind, data, change), mode, state={"done": 3, "total": 9})
    assert set(got) == BASE | extra
    if "diff" in extra or (mode == "diff" and "state" in extra):
        assert got.get("diff", got.get("state")) == {"done": 3}
    if mode == "state":
        assert got["state"] == {"done": 3, "total": 9}


def test_message_body_omits_data_that_was_not_published() -> None:
    assert set(body(message("diff", None, {"a": 1}), "diff")) == BASE | {"diff"}


def test_seq_from_only_when_messages_were_folded() -> None:
    assert body(message("poke"), "poke", seq_from=2)["seq_from"] == 2
    assert "seq_from" not in body(message("poke"), "poke", seq_from=4)


def test_control_body_embeds_state_json_verbatim() -> None:
    got = control_body("snapshot", "job:1", Position("1-0", "ab"), 1, state=b'{"a":[]}', reason="gap")
    assert orjson.loads(dumps(got)) == {
        "type": "snapshot",
        "channel": "job:1",
        "id": "1-0",
        "seq": 1,
        "epoch": "ab",
        "state": {"a": []},
        "reason": "gap",
    }


# -- SSE frames ---------------------------------------------------------------------------------------------------
def test_sse_frames_follow_the_event_stream_format() -> None:
    assert sse_frame("message", b'{"a":1}') == b'event: message\ndata: {"a":1}\n\n'
    assert sse_id_line("1-0~ab,0-0~") == b"id: 1-0~ab,0-0~\n"
    assert sse_retry(2500) == b"retry: 2500\n\n"


# -- WebSocket frames (RFC 6455 section 5.2) ------------------------------------------------------------------------
def parse_ws_frame(frame: bytes) -> tuple[int, int, bool, bytes]:
    """An independent reading of RFC 6455's base framing: (fin, opcode, masked, payload)."""
    fin, rsv, opcode = frame[0] >> 7, (frame[0] >> 4) & 0b111, frame[0] & 0x0F
    assert rsv == 0
    masked, length = bool(frame[1] & 0x80), frame[1] & 0x7F
    offset = 2
    if length == 126:
        length, offset = int.from_bytes(frame[2:4], "big"), 4
    elif length == 127:
        length, offset = int.from_bytes(frame[2:10], "big"), 10
        assert length >> 63 == 0  # the most significant bit MUST be 0
    payload = frame[offset:]
    assert len(payload) == length
    return fin, opcode, masked, payload


@pytest.mark.parametrize(
    ("size", "header"),
    [
        (0, b"\x81\x00"),
        (125, b"\x81\x7d"),
        (126, b"\x81\x7e\x00\x7e"),
        (65535, b"\x81\x7e\xff\xff"),
        (65536, b"\x81\x7f\x00\x00\x00\x00\x00\x01\x00\x00"),
    ],
)
def test_ws_text_frame_uses_the_shortest_length_encoding(size: int, header: bytes) -> None:
    payload = b"x" * size
    frame = ws_text_frame(payload)
    assert frame[: len(header)] == header
    assert parse_ws_frame(frame) == (1, 0x1, False, payload)  # FIN, text, unmasked (server to client)


def test_ws_ping_is_an_empty_unmasked_ping() -> None:
    assert parse_ws_frame(WS_PING) == (1, 0x9, False, b"")


# -- client frames ----------------------------------------------------------------------------------------------
def test_parse_client_frame_returns_the_object() -> None:
    frame = '{"op": "subscribe", "channel": "a", "since": "1-0", "epoch": "ab"}'
    assert parse_client_frame(frame, 100) == {"op": "subscribe", "channel": "a", "since": "1-0", "epoch": "ab"}


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b'{"op": "ping"}', "bad-frame"),  # binary frames are not part of the protocol
        ('{"op": "ping", "pad": "' + "x" * 100 + '"}', "frame-too-large"),
        ("{op: ping}", "bad-json"),
        ("", "bad-json"),
        ('["ping"]', "bad-frame"),
        ('"ping"', "bad-frame"),
        ("{}", "bad-frame"),
        ('{"op": 1}', "bad-frame"),
        ('{"op": null}', "bad-frame"),
    ],
)
def test_parse_client_frame_refuses_what_is_not_a_json_object_with_an_op(raw: str | bytes, code: str) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_client_frame(raw, 100)
    assert info.value.code == code
