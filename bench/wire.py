"""Bytes on the wire for the load clients: requests, WebSocket frames, and a cheap way to find `seq`/`ts`.

A load client reads hundreds of thousands of frames a second on a shared core, so it never decodes JSON: one
regex over each received chunk finds every message's `seq` and `ts` (the publish time, epoch ms). Every
server under test (the sidecar, the peer, the raw ceiling) sends `seq` before `ts` in each message body, and
no brace sits between them, so a match never spans two frames.
"""

from __future__ import annotations

import base64
import hashlib
import math
import os
import re
import socket
import time

# `"seq":12,"epoch":"ab","event":"tick","ts":1700000000000.123` (the peer's JSON has spaces after the colons).
SEQ_TS = re.compile(rb'"seq": ?(\d+),[^{}]*?"ts": ?([\d.]+)(?=[,}])')
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC11B85"  # RFC 6455 section 1.3

# Latency histogram: log-spaced buckets, 100 per decade from 0.01 ms to 100 s (2.3% wide each).
HIST_LO_MS = 0.01
HIST_PER_DECADE = 100
HIST_BUCKETS = 7 * HIST_PER_DECADE + 1


def http_get(host: str, port: int, path: str, extra: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n{extra}\r\n".encode()


def ws_upgrade(host: str, port: int, path: str, extra: str = "") -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    extra += f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
    return http_get(host, port, path, extra)


def ws_accept(key: bytes) -> bytes:
    return base64.b64encode(hashlib.sha1(key.strip() + WS_GUID).digest())


def ws_client_frame(payload: bytes, opcode: int = 0x1) -> bytes:
    """A masked client->server frame (RFC 6455 section 5.3: clients must mask)."""
    n = len(payload)
    if n < 126:
        header = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        header = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        header = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return header + mask + masked


def ws_server_frame(payload: bytes) -> bytes:
    """An unmasked server->client text frame (what the raw ceiling server writes)."""
    n = len(payload)
    if n < 126:
        return bytes((0x81, n)) + payload
    if n < 65536:
        return bytes((0x81, 126)) + n.to_bytes(2, "big") + payload
    return bytes((0x81, 127)) + n.to_bytes(8, "big") + payload


def parse_ws_frames(buf: bytes) -> tuple[list[tuple[int, bytes]], bytes]:
    """Whole unmasked frames at the start of `buf` as (opcode, payload), and the rest."""
    frames = []
    i = 0
    while len(buf) - i >= 2:
        opcode, n = buf[i] & 0x0F, buf[i + 1] & 0x7F
        head = 2
        if n == 126:
            if len(buf) - i < 4:
                break
            n, head = int.from_bytes(buf[i + 2 : i + 4], "big"), 4
        elif n == 127:
            if len(buf) - i < 10:
                break
            n, head = int.from_bytes(buf[i + 2 : i + 10], "big"), 10
        if len(buf) - i < head + n:
            break
        frames.append((opcode, buf[i + head : i + head + n]))
        i += head + n
    return frames, buf[i:]


def now_ms() -> float:
    return time.time() * 1000


def bucket(latency_ms: float) -> int:
    if latency_ms <= HIST_LO_MS:
        return 0
    return min(HIST_BUCKETS - 1, int(math.log10(latency_ms / HIST_LO_MS) * HIST_PER_DECADE) + 1)


def bucket_upper(index: int) -> float:
    return HIST_LO_MS * 10 ** (index / HIST_PER_DECADE)


def percentiles(hist: list[int], qs: tuple[float, ...] = (50, 95, 99)) -> list[float | None]:
    """Percentiles (ms) of a merged histogram: each bucket's upper bound, so never understated."""
    total = sum(hist)
    if not total:
        return [None for _ in qs]
    out = []
    for q in qs:
        rank = math.ceil(total * q / 100)
        seen = 0
        for i, count in enumerate(hist):
            seen += count
            if seen >= rank:
                out.append(round(bucket_upper(i), 2))
                break
    return out


def merge_hists(hists: list[list[int]]) -> list[int]:
    merged = [0] * HIST_BUCKETS
    for hist in hists:
        for i, count in enumerate(hist):
            merged[i] += count
    return merged


class BlockingWS:
    """A tiny blocking WebSocket client (for the Celery scenario, where one socket is enough)."""

    def __init__(self, host: str, port: int, path: str = "/ws", timeout: float = 10.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.sendall(ws_upgrade(host, port, path))
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed during the WebSocket handshake")
            buf += chunk
        head, _, self.buf = buf.partition(b"\r\n\r\n")
        if b" 101 " not in head.split(b"\r\n", 1)[0]:
            raise ConnectionError(head.decode(errors="replace"))

    def send(self, text: bytes) -> None:
        self.sock.sendall(ws_client_frame(text))

    def recv(self, timeout: float) -> list[tuple[float, bytes]]:
        """Text frames that arrive within `timeout` (at least one unless it times out), with arrival times."""
        deadline = time.monotonic() + timeout
        while True:
            frames, self.buf = parse_ws_frames(self.buf)
            texts = [(now_ms(), p) for op, p in frames if op == 0x1]
            if texts:
                return texts
            left = deadline - time.monotonic()
            if left <= 0:
                return []
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                return []
            if not chunk:
                raise ConnectionError("the server closed the WebSocket")
            self.buf += chunk

    def close(self) -> None:
        self.sock.close()
