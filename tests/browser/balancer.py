"""A TCP load balancer on loopback, standing in for the proxy in front of sidecar replicas in browser tests.

Each accepted connection is piped to the first backend that accepts it, so killing one replica sends new
connections to the next, and the page keeps one origin throughout. It can also misbehave as proxies do:
refuse WebSocket upgrades (403), or answer the first upgrades itself with a close frame (say 1013 "retry in 2 s").
It serves the test pages itself (``pages``): a document that Playwright fulfils has no address space, so Chromium's
Local Network Access checks would block its WebSockets to 127.0.0.1, unlike a page a real server sent.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import socket
import threading
import time

WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 section 1.3


class Balancer:
    def __init__(
        self, backends: list[int], refuse_websocket: bool = False, pages: dict[str, str] | None = None
    ) -> None:
        self.backends = backends
        self.refuse_websocket = refuse_websocket
        self.pages = pages or {}  # path -> HTML served here, not by a backend
        self.close_websockets: list[tuple[int, str]] = []  # answer the next upgrades with these close frames
        self.upgrades: list[float] = []  # time.monotonic() of every WebSocket upgrade request
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._sockets: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() blocked in the other thread
        self._listener.close()
        with self._lock:
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _track(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.add(sock)

    def _serve(self, client: socket.socket) -> None:
        self._track(client)
        head = b""
        while b"\r\n\r\n" not in head and len(head) < 65536:
            chunk = client.recv(65536)
            if not chunk:
                client.close()
                return
            head += chunk
        path = head.split(b" ", 2)[1].decode(errors="replace") if head.count(b" ") >= 2 else ""
        if path in self.pages:
            body = self.pages[path].encode()
            client.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\nConnection: close\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
            )
            client.close()
            return
        if b"\r\nupgrade: websocket" in head.lower():
            self.upgrades.append(time.monotonic())
            if self.refuse_websocket:
                client.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                client.close()
                return
            if self.close_websockets:
                self._close_websocket(client, head, *self.close_websockets.pop(0))
                return
        if self._closed:
            client.close()
            return
        for port in list(self.backends):
            try:
                backend = socket.create_connection(("127.0.0.1", port), timeout=2)
                break
            except OSError:
                continue
        else:
            client.close()  # no backend: the browser sees a network error
            return
        backend.settimeout(None)
        self._track(backend)
        backend.sendall(head)
        back = threading.Thread(target=_pipe, args=(backend, client), daemon=True)
        back.start()
        _pipe(client, backend)
        back.join(5)
        with self._lock:
            for sock in (client, backend):
                self._sockets.discard(sock)
                sock.close()

    def _close_websocket(self, client: socket.socket, head: bytes, code: int, reason: str) -> None:
        key = next(
            line.split(b":", 1)[1].strip()
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"sec-websocket-key:")
        )
        accept = base64.b64encode(hashlib.sha1(key + WS_GUID.encode()).digest())
        client.sendall(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n"
        )
        payload = code.to_bytes(2, "big") + reason.encode()
        client.sendall(bytes((0x88, len(payload))) + payload)  # a close frame, unmasked (server to client)
        time.sleep(0.5)  # let the browser answer the close before the TCP connection goes
        client.close()


def _pipe(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for sock in (src, dst):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
