"""The raw ceiling: a minimal server, no framework, that writes one pre-encoded frame to N open loopback sockets.

    python -m bench.ceiling --port 9000 --transport sse|ws --write single|batched

Clients open `GET /` (SSE) or a WebSocket upgrade and then only read. The driver opens `GET /control` and sends
lines `run <rate> <count> <pad>`; the server makes `count` messages at `rate` per second itself, each encoded
once, stamped with the time it was due (so falling behind shows as latency), and answers `done` when the last
one was written. `single` writes every frame to every socket with its own send(); `batched` joins whatever is
due into one send() per socket and wakeup. Same message body and size as the sidecar's `event`-mode frames.
"""

from __future__ import annotations

import argparse
import json
import selectors
import socket
import time

from bench.wire import ws_accept, ws_server_frame


class Ceiling:
    def __init__(self, port: int, transport: str, batched: bool) -> None:
        self.transport = transport
        self.batched = batched
        self.sel = selectors.DefaultSelector()
        self.listener = socket.create_server(("127.0.0.1", port), backlog=1024)
        self.listener.setblocking(False)
        self.sel.register(self.listener, selectors.EVENT_READ, "accept")
        self.clients: list[socket.socket] = []
        self.pending: dict[socket.socket, bytearray] = {}
        self.heads: dict[socket.socket, bytes] = {}
        self.control: socket.socket | None = None
        self.control_buf = b""
        self.seq = 0
        self.run: tuple[float, float, int, int, str] | None = None  # start (epoch s), rate, count, sent, pad

    def frame(self, seq: int, ts: float, pad: str) -> bytes:
        ms = int(ts)
        body = json.dumps(
            {"type": "message", "channel": "bench", "id": f"{ms}-0", "seq": seq, "epoch": "0badcafe",
             "event": "tick", "ts": round(ts, 3), "data": {"pad": pad}},
            separators=(",", ":"),
        ).encode()  # fmt: skip
        if self.transport == "ws":
            return ws_server_frame(body)
        return b"id: %d-0~0badcafe\nevent: message\ndata: %s\n\n" % (ms, body)

    def serve(self) -> None:
        while True:
            timeout = 0.5
            if self.run is not None:
                start, rate, count, sent, _ = self.run
                timeout = max(0.0, start + sent / rate - time.time())
            for key, mask in self.sel.select(timeout):
                if key.data == "accept":
                    self.accept()
                elif key.data == "head":
                    self.read_head(key.fileobj)  # type: ignore[arg-type]
                elif key.data == "control":
                    self.read_control()
                elif mask & selectors.EVENT_WRITE:
                    self.flush(key.fileobj)  # type: ignore[arg-type]
                else:
                    self.drop(key.fileobj)  # type: ignore[arg-type]
            if self.run is not None:
                self.publish_due()

    def accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except BlockingIOError:
                return
            sock.setblocking(False)
            self.heads[sock] = b""
            self.sel.register(sock, selectors.EVENT_READ, "head")

    def read_head(self, sock: socket.socket) -> None:
        try:
            data = sock.recv(65536)
        except OSError:
            data = b""
        if not data:
            self.sel.unregister(sock)
            self.heads.pop(sock, None)
            sock.close()
            return
        head = self.heads[sock] + data
        if b"\r\n\r\n" not in head:
            self.heads[sock] = head
            return
        del self.heads[sock]
        self.sel.unregister(sock)
        if head.startswith(b"GET /control"):
            sock.setblocking(True)
            sock.sendall(b"ok\n")
            self.control = sock
            self.sel.register(sock, selectors.EVENT_READ, "control")
            return
        if self.transport == "ws":
            key = next(
                line.split(b":", 1)[1] for line in head.split(b"\r\n") if line.lower().startswith(b"sec-websocket-key")
            )
            reply = (
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Sec-WebSocket-Accept: " + ws_accept(key) + b"\r\n\r\n" + ws_server_frame(b"ready")
            )
        else:
            reply = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n\r\n: ready\n\n"
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.send(reply)
        self.clients.append(sock)
        self.sel.register(sock, selectors.EVENT_READ, "client")  # only to learn that it left

    def read_control(self) -> None:
        assert self.control is not None
        data = self.control.recv(4096)
        if not data:
            raise SystemExit(0)  # the driver is gone: so are we
        self.control_buf += data
        while b"\n" in self.control_buf:
            line, self.control_buf = self.control_buf.split(b"\n", 1)
            _, rate, count, pad = line.decode().split()
            self.run = (time.time(), float(rate), int(count), 0, "x" * int(pad))

    def publish_due(self) -> None:
        assert self.run is not None
        start, rate, count, sent, pad = self.run
        due = min(count, int((time.time() - start) * rate) + 1)
        if due <= sent:
            return
        frames = []
        for i in range(sent, due):
            self.seq += 1
            frames.append(self.frame(self.seq, (start + i / rate) * 1000, pad))
        self.run = (start, rate, count, due, pad)
        if self.batched:
            self.write_all(b"".join(frames))
        else:
            for frame in frames:
                self.write_all(frame)
        if due == count:
            self.run = None
            assert self.control is not None
            self.control.sendall(b"done\n")

    def write_all(self, data: bytes) -> None:
        for sock in self.clients:
            pending = self.pending.get(sock)
            if pending is not None:
                pending += data
                continue
            try:
                n = sock.send(data)
            except BlockingIOError:
                n = 0
            except OSError:
                continue
            if n < len(data):
                self.pending[sock] = bytearray(data[n:])
                self.sel.modify(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, "client")

    def flush(self, sock: socket.socket) -> None:
        pending = self.pending[sock]
        try:
            n = sock.send(pending)
        except BlockingIOError:
            return
        except OSError:
            self.drop(sock)
            return
        del pending[:n]
        if not pending:
            del self.pending[sock]
            self.sel.modify(sock, selectors.EVENT_READ, "client")

    def drop(self, sock: socket.socket) -> None:
        self.sel.unregister(sock)
        self.pending.pop(sock, None)
        self.clients.remove(sock)
        sock.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--transport", choices=("sse", "ws"), default="sse")
    parser.add_argument("--write", choices=("single", "batched"), default="batched")
    args = parser.parse_args()
    Ceiling(args.port, args.transport, args.write == "batched").serve()


if __name__ == "__main__":
    main()
