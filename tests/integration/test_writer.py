"""The writer's pass (sidecar/writer.py, and sidecar/asgi/writer.py on the asyncio front): frames reach each
socket whole and in order, even when a socket takes only part of a write (or its transport is paused) and the
connection's own greenlet or task has to finish it; and the stats count each socket write of a pass."""

from __future__ import annotations

import base64
import json
import os
import socket
import time

import pytest

from dashboard.feed import read_records
from sidecar.publish import Publisher
from tests.processes import FRONTS

pytestmark = pytest.mark.parametrize("sidecar_process", FRONTS, indirect=True)

FRAMES = 160
PAD = "x" * 50_000  # 8 MB in all: more than the kernel buffers for a reader that stopped (4 MB at most here)


@pytest.fixture
def sidecar(redis_server, sidecar_process):
    # A queue bound above the 8 MB: this is about writes that come back partial, not about dropping a backlog.
    return sidecar_process(redis_server.url, SIDECAR_QUEUE_BYTES=str(32 << 20))


def stalled_socket(port: int, request: bytes) -> socket.socket:
    """A client that reads nothing for now, with a tiny receive buffer: the server's writes come back partial."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    sock.sendall(request)
    return sock


def read_until(sock: socket.socket, done, data: bytes = b"", timeout: float = 20.0) -> bytes:
    buf = bytearray(data)
    deadline = time.monotonic() + timeout
    while not done(buf):
        assert time.monotonic() < deadline, f"timed out after {len(buf)} bytes"
        chunk = sock.recv(1 << 20)
        assert chunk, "the server closed the stream"
        buf += chunk
    return bytes(buf)


def has_last(data: bytes) -> bool:
    """The last message is all there (cheap: the whole check parses 8 MB)."""
    at = data.find(b'"i":%d,' % (FRAMES - 1))  # then `"pad":"<PAD>"}}` ends the message
    return at >= 0 and len(data) >= at + len(b'"i":%d,"pad":""}}' % (FRAMES - 1)) + len(PAD)


def unchunk(body: bytes) -> bytes:
    """The whole chunks at the start of an HTTP/1.1 chunked body (RFC 9112 section 7.1), joined; raises if the
    framing is broken."""
    out, i = b"", 0
    while (end := body.find(b"\r\n", i)) >= 0:
        size = int(body[i:end], 16)
        if len(body) < end + 4 + size:
            break  # not all there yet
        out += body[end + 2 : end + 2 + size]
        assert body[end + 2 + size : end + 4 + size] == b"\r\n", "a chunk is not followed by CRLF"
        i = end + 4 + size
    return out


def sse_events(raw: bytes) -> list[dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"transfer-encoding: chunked" in head.lower()
    events = [e for e in unchunk(body).split(b"\n\n") if b"event: message" in e and e.endswith(b"}")]
    return [json.loads(e.split(b"data: ", 1)[1]) for e in events]


def ws_parse(data: bytes) -> list[tuple[int, bytes]]:
    """(opcode, payload) of each whole unmasked WebSocket frame in `data`, in order."""
    frames, i = [], 0
    while i + 2 <= len(data):
        n, head = data[i + 1] & 0x7F, 2
        if n == 126:
            n, head = int.from_bytes(data[i + 2 : i + 4], "big"), 4
        elif n == 127:
            n, head = int.from_bytes(data[i + 2 : i + 10], "big"), 10
        if i + head + n > len(data):
            break
        frames.append((data[i] & 0x0F, data[i + head : i + head + n]))
        i += head + n
    return frames


def ws_frames(data: bytes) -> list[bytes]:
    """The payloads of the text frames in `data`."""
    return [payload for opcode, payload in ws_parse(data) if opcode == 0x1]


def test_a_stalled_sse_reader_gets_every_frame_whole_and_in_order_when_it_reads_again(sidecar, redis_server):
    sock = stalled_socket(sidecar.port, b"GET /sse?channel=w:1&mode=event HTTP/1.1\r\nHost: x\r\n\r\n")
    start = read_until(sock, lambda d: b"event: ready" in d)
    with Publisher.from_url(redis_server.url) as pub:
        for i in range(FRAMES):
            pub.event("w:1", "tick", {"i": i, "pad": PAD})
    time.sleep(0.5)  # the server has filled the socket and holds the rest
    raw = read_until(sock, has_last, start)
    sock.close()
    assert [m["data"]["i"] for m in sse_events(raw)] == list(range(FRAMES))


def test_a_stalled_websocket_reader_gets_every_frame_whole_and_in_order_when_it_reads_again(sidecar, redis_server):
    key = base64.b64encode(os.urandom(16))
    upgrade = (
        b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: " + key + b"\r\n\r\n"
    )
    sock = stalled_socket(sidecar.port, upgrade)
    head = read_until(sock, lambda d: b"\r\n\r\n" in d)
    payload = json.dumps({"op": "subscribe", "channel": "w:2", "mode": "event"}).encode()
    mask = os.urandom(4)
    sock.sendall(bytes((0x81, 0x80 | len(payload))) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))
    start = read_until(sock, lambda d: b'"type":"subscribed"' in d, head.partition(b"\r\n\r\n")[2])
    with Publisher.from_url(redis_server.url) as pub:
        for i in range(FRAMES):
            pub.event("w:2", "tick", {"i": i, "pad": PAD})
    time.sleep(0.5)
    raw = read_until(sock, has_last, start)
    sock.close()
    messages = [json.loads(f) for f in ws_frames(raw) if b'"type":"message"' in f]
    assert [m["data"]["i"] for m in messages] == list(range(FRAMES))


def opcodes(data: bytes) -> list[int]:
    """The opcode of each whole WebSocket frame in `data`, in order."""
    return [opcode for opcode, _ in ws_parse(data)]


def masked(opcode: int, payload: bytes) -> bytes:
    mask = os.urandom(4)
    return bytes((0x80 | opcode, 0x80 | len(payload))) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def test_a_websocket_whose_client_closes_gets_nothing_after_the_close_frame_while_messages_keep_coming(
    sidecar, redis_server
):
    key = base64.b64encode(os.urandom(16))
    sock = socket.create_connection(("127.0.0.1", sidecar.port), timeout=10)
    sock.sendall(
        b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: " + key + b"\r\n\r\n"
    )
    head = read_until(sock, lambda d: b"\r\n\r\n" in d)
    sock.sendall(masked(0x1, json.dumps({"op": "subscribe", "channel": "w:3", "mode": "event"}).encode()))
    data = read_until(sock, lambda d: b'"type":"subscribed"' in d, head.partition(b"\r\n\r\n")[2])
    with Publisher.from_url(redis_server.url) as pub:
        for i in range(20):
            pub.event("w:3", "tick", {"i": i})
        data = read_until(sock, lambda d: b'"i":19' in d, data)
        sock.sendall(masked(0x8, (1000).to_bytes(2, "big")))  # the client's close, while the channel goes on
        for i in range(20, 200):
            pub.event("w:3", "tick", {"i": i})
    buf = bytearray(data)
    while chunk := sock.recv(1 << 16):  # until the server closes TCP
        buf += chunk
    sock.close()
    ops = opcodes(bytes(buf))
    assert 0x8 in ops and ops[-1] == 0x8, ops[-5:]  # its close frame is the last thing sent


def test_each_socket_write_of_a_pass_is_one_latency_observation(redis_server, redis_client, sidecar_process):
    """The pass hands the stats every connection it wrote at once: the record's `lat` still counts one
    observation per socket write, not one per pass (docs/dashboard.md, the stats record)."""
    proc = sidecar_process(redis_server.url, SIDECAR_STATS_INTERVAL="0.2")
    clients = [socket.create_connection(("127.0.0.1", proc.port), timeout=10) for _ in range(20)]
    for sock in clients:
        sock.sendall(b"GET /sse?channel=w:3&mode=event HTTP/1.1\r\nHost: x\r\n\r\n")
    got = [read_until(sock, lambda d: b"event: ready" in d) for sock in clients]
    with Publisher.from_url(redis_server.url) as pub:
        for i in range(3):
            pub.event("w:3", "tick", {"i": i})
            time.sleep(0.3)  # one message per pass
    for n, sock in enumerate(clients):
        got[n] = read_until(sock, lambda d: d.count(b"event: message") == 3, got[n])
        sock.close()

    def observed() -> int:
        return sum(sum(r.lat) for r in read_records(redis_client, "rt:stats"))

    deadline = time.monotonic() + 10
    while observed() < len(clients):
        assert time.monotonic() < deadline, f"{observed()} writes observed"
        time.sleep(0.1)
    time.sleep(0.5)  # the records past the last write
    assert len(clients) <= observed() <= 3 * len(clients)
