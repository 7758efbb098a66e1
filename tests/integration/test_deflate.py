"""permessage-deflate (RFC 7692) offered exactly as Chromium offers it, over real sockets.

Chromium sends `Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits` and, once the server
accepts, compresses every message it sends (RSV1 set, the deflate stream's context kept across messages). By
default the relay answers without the extension (SIDECAR_WS_DEFLATE, docs/performance.md "permessage-deflate"):
the client then sends plain frames. With SIDECAR_WS_DEFLATE=1 it accepts, the client's compressed frames
decode, and the relay's own frames are still the pre-built uncompressed ones, the same bytes for every socket.
The default's answers are checked on both fronts (the asyncio one: uvicorn's `ws_per_message_deflate`); with the
extension on, uvicorn compresses its frames, which test_asgi.py checks.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import time
import zlib
from collections.abc import Callable, Iterator

import pytest

from sidecar.core.protocol import ws_text_frame
from sidecar.publish import Publisher
from tests.processes import FRONTS

CHROMIUM_OFFER = b"permessage-deflate; client_max_window_bits"
Frame = tuple[bool, int, bytes]  # (RSV1, opcode, payload)


class Client:
    """A WebSocket client on a raw socket that offers the extension as Chromium does and, if it is accepted,
    compresses its messages as Chromium does (one deflate context for the connection)."""

    def __init__(self, port: int, offer: bytes | None = CHROMIUM_OFFER) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        key = base64.b64encode(os.urandom(16))
        extensions = b"Sec-WebSocket-Extensions: " + offer + b"\r\n" if offer else b""
        self.sock.sendall(
            b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: " + key + b"\r\n" + extensions + b"\r\n"
        )
        self.buf = b""
        while b"\r\n\r\n" not in self.buf:
            self.buf += self._recv()
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        self.status = head.split(b"\r\n", 1)[0]
        self.headers = {
            name.strip().lower(): value.strip()
            for name, _, value in (line.partition(b":") for line in head.split(b"\r\n")[1:])
        }
        self.deflate = self.headers.get(b"sec-websocket-extensions", b"").startswith(b"permessage-deflate")
        self.compressor = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -15)
        self.inflater = zlib.decompressobj(-15)

    def _recv(self) -> bytes:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("the server closed the connection")
        return data

    def send(self, **body: object) -> None:
        payload, rsv1 = json.dumps(body).encode(), 0
        if self.deflate:  # RFC 7692 section 7.2.1: compress, sync-flush, drop the 00 00 ff ff tail
            payload = (self.compressor.compress(payload) + self.compressor.flush(zlib.Z_SYNC_FLUSH))[:-4]
            rsv1 = 0x40
        mask = os.urandom(4)
        n = len(payload)
        assert n < 126
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(bytes((0x80 | rsv1 | 0x1, 0x80 | n)) + mask + masked)

    def frames(self) -> Iterator[tuple[bytes, Frame]]:
        """Each whole frame as it arrives: its bytes on the wire, and (RSV1, opcode, payload decompressed)."""
        while True:
            while len(self.buf) < 2 or len(self.buf) < self._size():
                self.buf += self._recv()
            size = self._size()
            raw, self.buf = self.buf[:size], self.buf[size:]
            n = raw[1] & 0x7F
            payload = raw[2 if n < 126 else 4 if n == 126 else 10 :]
            rsv1 = bool(raw[0] & 0x40)
            if rsv1:
                payload = self.inflater.decompress(payload + b"\x00\x00\xff\xff")
            yield raw, (rsv1, raw[0] & 0x0F, payload)

    def _size(self) -> int:
        n = self.buf[1] & 0x7F
        if n == 126:
            return 4 + int.from_bytes(self.buf[2:4], "big") if len(self.buf) >= 4 else 1 << 30
        if n == 127:
            return 10 + int.from_bytes(self.buf[2:10], "big") if len(self.buf) >= 10 else 1 << 30
        return 2 + n

    def until(self, wanted: Callable[[dict], bool], timeout: float = 10.0) -> list[tuple[bytes, bool, dict]]:
        """Text frames as (wire bytes, RSV1, JSON) up to the first one `wanted` accepts."""
        got: list[tuple[bytes, bool, dict]] = []
        deadline = time.monotonic() + timeout
        for raw, (rsv1, opcode, payload) in self.frames():
            if opcode == 0x1:
                got.append((raw, rsv1, json.loads(payload)))
                if wanted(got[-1][2]):
                    return got
            assert time.monotonic() < deadline, f"nothing wanted in {got}"
        raise AssertionError("unreachable")

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def clients() -> Iterator[Callable[..., Client]]:
    made: list[Client] = []

    def make(port: int, offer: bytes | None = CHROMIUM_OFFER) -> Client:
        made.append(Client(port, offer))
        return made[-1]

    yield make
    for client in made:
        client.close()


def typed(kind: str) -> Callable[[dict], bool]:
    return lambda body: body.get("type") == kind


@pytest.mark.parametrize("sidecar_process", FRONTS, indirect=True)
def test_by_default_a_chromium_offer_is_answered_without_the_extension_and_plain_frames_flow(
    sidecar_process, redis_server, clients
):
    relay = sidecar_process(redis_server.url)
    client = clients(relay.port)
    assert client.status == b"HTTP/1.1 101 Switching Protocols"
    assert b"sec-websocket-extensions" not in client.headers and not client.deflate
    client.send(op="subscribe", channel="z:1", mode="event")
    client.until(typed("subscribed"))
    with Publisher.from_url(redis_server.url) as pub:
        pub.event("z:1", "tick", {"n": 1})
    [*_, (raw, rsv1, message)] = client.until(typed("message"))
    assert not rsv1 and (message["event"], message["data"]) == ("tick", {"n": 1})
    assert raw == ws_text_frame(json.dumps(message, separators=(",", ":")).encode())


@pytest.mark.parametrize("sidecar_process", FRONTS, indirect=True)
def test_a_client_that_compresses_without_the_extension_is_closed_with_1002(sidecar_process, redis_server, clients):
    relay = sidecar_process(redis_server.url)
    client = clients(relay.port)
    client.deflate = True  # compresses anyway: RSV1 without a negotiated extension (RFC 6455 section 5.2)
    client.send(op="ping")
    for _raw, (_rsv1, opcode, payload) in client.frames():
        if opcode == 0x8:
            assert int.from_bytes(payload[:2], "big") == 1002
            break


def test_with_ws_deflate_the_offer_is_accepted_compressed_frames_decode_and_frames_stay_shared(
    sidecar_process, redis_server, clients
):
    relay = sidecar_process(redis_server.url, SIDECAR_WS_DEFLATE="1")
    browser = clients(relay.port)
    plain = clients(relay.port, offer=None)
    assert browser.headers[b"sec-websocket-extensions"] == b"permessage-deflate; client_max_window_bits=15"
    assert b"sec-websocket-extensions" not in plain.headers
    # Two compressed messages on one deflate context (the second refers back into the first's window).
    browser.send(op="subscribe", channel="z:2", mode="event")
    browser.send(op="subscribe", channel="z:3", mode="event")
    browser.until(lambda body: body.get("type") == "subscribed" and body["channel"] == "z:3")
    browser.send(op="ping")
    [*_, (_, rsv1, pong)] = browser.until(typed("pong"))
    assert not rsv1 and isinstance(pong["ts"], float)
    plain.send(op="subscribe", channel="z:2", mode="event")
    plain.until(typed("subscribed"))
    with Publisher.from_url(redis_server.url) as pub:
        pub.event("z:2", "tick", {"n": 2, "pad": "x" * 300})
    [*_, (raw, rsv1, message)] = browser.until(typed("message"))
    assert not rsv1 and message["data"]["n"] == 2  # uncompressed: RFC 7692 section 6 lets either side not compress
    [*_, (plain_raw, _, _)] = plain.until(typed("message"))
    assert raw == plain_raw  # one pre-built frame for both sockets, extension or not
