"""A load-client process: many raw sockets on one selector (no thread per socket), driven over stdin/stdout.

Run by bench.load.LoadClients, never by hand. Commands are JSON lines on stdin, each answered by one JSON line:
    {"op": "open", "host", "port", "kind", "path", "count", "channels": [[...], ...], "concurrency"}
    {"op": "mark", "from_seq": n}   forget what was measured; count only messages with seq >= n from now on
    {"op": "status"}                how many messages arrived since the mark
    {"op": "report"}                counts and the latency histogram since the mark
    {"op": "poll", "interval": s}   (kind "poll") start GETting `path` every `interval` seconds
    {"op": "close"}                 close every socket and exit

Kinds: `sse` and `ws` speak to the sidecar, `sio` to Flask-SocketIO (engine.io 4 over WebSocket), `raw-sse` and
`raw-ws` to the raw ceiling server, `poll` GETs the state endpoint with keep-alive and an ETag.
Latency is the arrival time (time.time(), ms) minus the message's `ts`: the publisher's clock is the same one.

`ws` clients offer permessage-deflate exactly as Chromium does (`"deflate": false` in the open command: they do
not). When the server accepts, they compress what they send, as Chromium does, and inflate what arrives
compressed (RFC 7692), so a server that compresses is measured as browsers see it.
"""

from __future__ import annotations

import contextlib
import errno
import heapq
import json
import os
import random
import re
import selectors
import socket
import sys
import time
import zlib
from array import array

from bench.wire import HIST_BUCKETS, HIST_LO_MS, HIST_PER_DECADE, SEQ_TS, http_get, now_ms, ws_client_frame, ws_upgrade

SIO_PING = b"\x81\x012"  # an engine.io ping packet ("2") in an unmasked text frame
SIO_PONG = ws_client_frame(b"3")
SEQ_RE = re.compile(rb'"seq": ?(\d+)')
TS_RE = re.compile(rb'"ts": ?([\d.]+)')
ETAG_RE = re.compile(rb"(?i)\r\netag: *([^\r\n]+)")
LENGTH_RE = re.compile(rb"(?i)\r\ncontent-length: *(\d+)")
CHROMIUM_OFFER = "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"
ACCEPTED_RE = re.compile(rb"(?i)\r\nsec-websocket-extensions: *permessage-deflate")


def deflated_frame(payload: bytes) -> bytes:
    """A compressed client text frame (RFC 7692 section 7.2.1: RSV1, the sync flush's 00 00 ff ff dropped). A
    fresh context per message: the server's side costs the same, and the client keeps no 256 KB per socket."""
    packer = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -15, 1)
    frame = bytearray(ws_client_frame((packer.compress(payload) + packer.flush(zlib.Z_SYNC_FLUSH))[:-4]))
    frame[0] |= 0x40
    return bytes(frame)


class Conn:
    __slots__ = (
        "sock", "state", "pre", "tail", "steps", "marker", "need", "count", "last_seq", "channels",
        "etag", "due", "waiting", "resp", "inflater", "deflate", "frames",
    )  # fmt: skip

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.state = "connecting"  # connecting -> headers -> handshake -> ready | closed
        self.pre = b""
        self.tail = b""
        self.steps: list[tuple[bytes, bytes]] = []
        self.marker = b""
        self.need = 0
        self.count = 0
        self.last_seq = 0
        self.channels: list[str] = []
        self.etag = b""
        self.due = 0.0
        self.waiting = False
        self.resp = b""
        self.deflate = False  # the server accepted permessage-deflate
        self.frames = b""  # then: the start of a frame not yet whole
        self.inflater: object = None  # its inflate context, made at the first compressed frame


class Client:
    def __init__(self) -> None:
        self.sel = selectors.DefaultSelector()
        self.conns: list[Conn] = []
        self.spec: dict = {}
        self.backlog: list[list[str]] = []  # connections still to open (their channels)
        self.opening = 0
        self.failed = 0
        self.closed = 0
        self.errors: dict[str, int] = {}
        self.deflated = 0  # connections whose server accepted permessage-deflate
        self.from_seq = 0
        self.lats = array("d")
        self.received = 0
        self.stale = 0
        self.gaps = 0
        self.polls: list[tuple[float, int]] = []
        self.poll_interval = 0.0
        self.responses = 0
        self.stdin = b""
        self.running = True

    # -- commands ---------------------------------------------------------------------------------------------
    def command(self, cmd: dict) -> dict | None:
        op = cmd["op"]
        if op == "open":
            self.spec = cmd
            chans = cmd.get("channels") or [[]]
            self.backlog = [chans[i % len(chans)] for i in range(cmd["count"])]
            return None  # answered when every connection is ready or failed
        if op == "mark":
            self.from_seq = cmd.get("from_seq", 0)
            self.lats = array("d")
            self.received = self.stale = self.gaps = self.responses = 0
            for conn in self.conns:
                conn.count = 0
            return {"ok": True}
        if op == "status":
            return {"received": self.received, "responses": self.responses, "closed": self.closed}
        if op == "report":
            return self.report()
        if op == "poll":
            self.poll_interval = cmd["interval"]
            start = time.monotonic()
            self.polls = [(start + random.random() * self.poll_interval, i) for i in range(len(self.conns))]
            heapq.heapify(self.polls)
            return {"ok": True}
        if op == "stop_poll":
            self.polls = []
            return {"ok": True}
        if op == "close":
            self.running = False
            return {"ok": True}
        return {"error": f"unknown op {op}"}

    def report(self) -> dict:
        hist: dict[int, int] = {}
        if self.lats:
            import numpy as np

            lat = np.frombuffer(self.lats, dtype=np.float64)
            idx = np.floor(np.log10(np.maximum(lat, HIST_LO_MS) / HIST_LO_MS) * HIST_PER_DECADE).astype(np.int64) + 1
            idx[lat <= HIST_LO_MS] = 0
            np.minimum(idx, HIST_BUCKETS - 1, out=idx)
            values, counts = np.unique(idx, return_counts=True)
            hist = {int(v): int(c) for v, c in zip(values, counts)}
            top = float(lat.max())
        else:
            top = None
        counts = [c.count for c in self.conns if c.state == "ready"]
        return {
            "received": self.received, "stale": self.stale, "gaps": self.gaps, "closed": self.closed,
            "responses": self.responses, "hist": hist, "max": top, "conns": len(counts),
            "min_count": min(counts) if counts else 0, "max_count": max(counts) if counts else 0,
            "deflated": self.deflated,
        }  # fmt: skip

    # -- connections --------------------------------------------------------------------------------------------
    def open_more(self) -> None:
        limit = self.spec.get("concurrency", 50)
        while self.backlog and self.opening < limit:
            channels = self.backlog.pop()
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = Conn(sock)
            conn.channels = channels
            err = sock.connect_ex((self.spec["host"], self.spec["port"]))
            self.conns.append(conn)
            self.opening += 1
            if err not in (0, errno.EINPROGRESS):
                self.fail(conn, f"connect {errno.errorcode.get(err, err)}")
                continue
            self.sel.register(sock, selectors.EVENT_WRITE, conn)

    def fail(self, conn: Conn, why: str) -> None:
        self.errors[why] = self.errors.get(why, 0) + 1
        if conn.state in ("ready",):
            self.closed += 1
        else:
            self.failed += 1
            self.opening -= 1
        conn.state = "closed"
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(conn.sock)
        conn.sock.close()

    def on_writable(self, conn: Conn) -> None:
        err = conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self.fail(conn, f"connect {errno.errorcode.get(err, err)}")
            return
        spec, kind = self.spec, self.spec["kind"]
        host, port, path = spec["host"], spec["port"], spec.get("path", "/")
        self.sel.modify(conn.sock, selectors.EVENT_READ, conn)
        if kind == "poll":
            self.ready(conn)
            return
        if kind == "ws" and spec.get("deflate", True):
            request = ws_upgrade(host, port, path, CHROMIUM_OFFER)
        elif kind in ("ws", "sio", "raw-ws"):
            request = ws_upgrade(host, port, path)
        else:
            request = http_get(host, port, path, "Accept: text/event-stream\r\n")
        conn.sock.sendall(request)
        conn.state = "headers"
        if kind == "sse":
            conn.marker, conn.need = b"event: ready", 1
        elif kind == "ws":
            conn.marker, conn.need = b'"type":"subscribed"', len(conn.channels)
        elif kind == "sio":
            conn.steps = [(b"0{", ws_client_frame(b"40")), (b"40{", ws_client_frame(b'421["join","bench"]'))]
            conn.marker, conn.need = b"431[", 1
        else:
            conn.marker, conn.need = b"ready", 1

    def on_handshake(self, conn: Conn, data: bytes) -> None:
        conn.pre += data
        if conn.state == "headers":
            head, sep, rest = conn.pre.partition(b"\r\n\r\n")
            if not sep:
                return
            status = head.split(b"\r\n", 1)[0]
            if b" 200 " not in status and b" 101 " not in status:
                self.fail(conn, status.decode(errors="replace")[:60])
                return
            conn.state, conn.pre = "handshake", rest
            if self.spec["kind"] == "ws":
                conn.deflate = bool(ACCEPTED_RE.search(head))
                self.deflated += conn.deflate
                for channel in conn.channels:
                    frame = json.dumps({"op": "subscribe", "channel": channel, "mode": self.spec.get("mode", "event")})
                    conn.sock.sendall((deflated_frame if conn.deflate else ws_client_frame)(frame.encode()))
            if conn.deflate and conn.pre:
                conn.pre = self.inflated(conn, conn.pre)
        while conn.steps and conn.steps[0][0] in conn.pre:
            wanted, reply = conn.steps.pop(0)
            conn.pre = conn.pre[conn.pre.index(wanted) + len(wanted) :]
            conn.sock.sendall(reply)
        if not conn.steps and conn.pre.count(conn.marker) >= conn.need:
            self.ready(conn)

    def ready(self, conn: Conn) -> None:
        conn.state, conn.pre = "ready", b""
        self.opening -= 1

    def on_readable(self, conn: Conn) -> None:
        try:
            data = conn.sock.recv(262144)
        except OSError as exc:
            self.fail(conn, type(exc).__name__)
            return
        if not data:
            self.fail(conn, "eof")
            return
        if conn.deflate:
            data = self.inflated(conn, data)
        if conn.state != "ready":
            self.on_handshake(conn, data)
            return
        if self.spec["kind"] == "poll":
            self.on_poll_data(conn, data)
            return
        if self.spec["kind"] == "sio" and SIO_PING in data:
            conn.sock.sendall(SIO_PONG)
        buf = conn.tail + data if conn.tail else data
        # Cut after the last brace: every match before it is whole (see bench.wire), the rest waits.
        cut = buf.rfind(b"}") + 1
        if not cut:
            conn.tail = buf[-65536:]
            return
        conn.tail = buf[cut:] if cut < len(buf) else b""
        pairs = SEQ_TS.findall(buf, 0, cut)
        if not pairs:
            return
        now = now_ms()
        first = int(pairs[0][0])
        if first < self.from_seq:
            kept = [p for p in pairs if int(p[0]) >= self.from_seq]
            self.stale += len(pairs) - len(kept)
            pairs = kept
            if not pairs:
                return
            first = int(pairs[0][0])
        n = len(pairs)
        if self.spec.get("check_seq", True):
            last = int(pairs[-1][0])
            if (conn.last_seq and first != conn.last_seq + 1) or last - first != n - 1:
                self.gaps += 1
            conn.last_seq = last
        conn.count += n
        self.received += n
        self.lats.extend([now - float(ts) for _, ts in pairs])

    def inflated(self, conn: Conn, data: bytes) -> bytes:
        """The payloads of the whole frames received so far (compressed ones inflated), the rest kept. A server
        that never compresses (RSV1 clear) costs only this parse."""
        buf = conn.frames + data if conn.frames else data
        out, i = [], 0
        while len(buf) - i >= 2:
            n, head = buf[i + 1] & 0x7F, 2
            if n >= 126:
                head = 4 if n == 126 else 10
                if len(buf) - i < head:
                    break
                n = int.from_bytes(buf[i + 2 : i + head], "big")
            if len(buf) - i < head + n:
                break
            payload = buf[i + head : i + head + n]
            if buf[i] & 0x40:
                if conn.inflater is None:
                    conn.inflater = zlib.decompressobj(-15)
                payload = conn.inflater.decompress(payload + b"\x00\x00\xff\xff")  # type: ignore[attr-defined]
            out.append(payload)
            i += head + n
        conn.frames = buf[i:]
        return b"".join(out)

    # -- polling ----------------------------------------------------------------------------------------------
    def send_polls(self) -> float:
        """GET the state on every connection that is due; the seconds until the next one is."""
        now = time.monotonic()
        while self.polls and self.polls[0][0] <= now:
            due, i = heapq.heappop(self.polls)
            conn = self.conns[i]
            if conn.state != "ready":
                continue
            if not conn.waiting:
                extra = f"If-None-Match: {conn.etag.decode()}\r\n" if conn.etag else ""
                conn.sock.sendall(http_get(self.spec["host"], self.spec["port"], self.spec["path"], extra))
                conn.waiting = True
            heapq.heappush(self.polls, (due + self.poll_interval, i))
        return self.polls[0][0] - now if self.polls else 0.5

    def on_poll_data(self, conn: Conn, data: bytes) -> None:
        conn.resp += data
        head, sep, body = conn.resp.partition(b"\r\n\r\n")
        if not sep:
            return
        length = LENGTH_RE.search(head)
        size = int(length[1]) if length else 0
        if len(body) < size:
            return
        conn.resp, conn.waiting = body[size:], False
        self.responses += 1
        etag = ETAG_RE.search(head)
        if etag:
            conn.etag = etag[1]
        seq, ts = SEQ_RE.search(body), TS_RE.search(body)
        if seq and ts and int(seq[1]) > conn.last_seq and int(seq[1]) >= self.from_seq:
            # The first time this client sees a newer state: how stale was the news when it got it?
            conn.last_seq = int(seq[1])
            conn.count += 1
            self.received += 1
            self.lats.append(now_ms() - float(ts[1]))

    # -- the loop ---------------------------------------------------------------------------------------------
    def run(self) -> None:
        os.set_blocking(0, False)
        self.sel.register(0, selectors.EVENT_READ, None)
        pending_open = False
        while self.running:
            self.open_more()
            timeout = self.send_polls() if self.polls else 0.5
            for key, _mask in self.sel.select(max(0.0, min(timeout, 0.5))):
                conn = key.data
                if conn is None:
                    pending_open |= self.read_commands()
                elif conn.state == "connecting":
                    self.on_writable(conn)
                elif conn.state != "closed":
                    self.on_readable(conn)
            if pending_open and not self.backlog and self.opening <= 0:
                pending_open = False
                ready = sum(1 for c in self.conns if c.state == "ready")
                self.reply({"ready": ready, "failed": self.failed, "errors": self.errors})
        for conn in self.conns:
            conn.sock.close()

    def read_commands(self) -> bool:
        try:
            chunk = os.read(0, 65536)
        except BlockingIOError:
            return False
        if not chunk:
            self.running = False
            return False
        self.stdin += chunk
        opened = False
        while b"\n" in self.stdin:
            line, self.stdin = self.stdin.split(b"\n", 1)
            cmd = json.loads(line)
            answer = self.command(cmd)
            if answer is None:
                opened = True
            else:
                self.reply(answer)
        return opened

    def reply(self, body: dict) -> None:
        sys.stdout.write(json.dumps(body) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    Client().run()
