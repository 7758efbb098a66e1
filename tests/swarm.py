"""Many SSE clients in one thread: raw non-blocking sockets on one selector, for herd and storm scenarios.

Each client connects (at most `concurrency` connects in flight), obeys a 503's retry hint, records every event
with its arrival time, and in `pull` mode GETs the channel's state after each poke (a new socket per pull, the
way a browser's fetch would), recording when it asked. Used by tests/integration/test_herd.py and bench/herd.py.

Example::

    with Swarm("127.0.0.1", port, 1000, lambda i: ["herd:1"], mode="poke", pull=True) as swarm:
        swarm.wait(lambda s: s.connected() == 1000, 30)
        ...
        print(swarm.pulls)
"""

from __future__ import annotations

import contextlib
import errno
import heapq
import json
import re
import selectors
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import quote, urlencode

CONNECTING, HEAD, STREAM, CLOSED = "connecting", "head", "stream", "closed"


class SSEParser:
    """Bytes of an SSE stream in, events out: dicts of the JSON data plus `_event`, `_id` and `_t` (arrival)."""

    def __init__(self) -> None:
        self.buf = b""
        self.last_id: str | None = None

    def feed(self, data: bytes, now: float) -> list[dict]:
        self.buf += data
        events = []
        while True:
            end = self.buf.find(b"\n\n")
            if end < 0:
                return events
            block, self.buf = self.buf[:end], self.buf[end + 2 :]
            name, payload, event_id = "message", [], None
            for line in block.split(b"\n"):
                key, _, value = line.partition(b":")
                value = value[1:] if value.startswith(b" ") else value
                if key == b"data":
                    payload.append(value)
                elif key == b"event":
                    name = value.decode()
                elif key == b"id":
                    event_id = value.decode()
            if not payload:
                continue  # a comment (keep-alive) or a bare `retry:`
            event = json.loads(b"\n".join(payload))
            event.update(_event=name, _id=event_id, _t=now)
            if event_id is not None:
                self.last_id = event_id
            events.append(event)


@dataclass
class Client:
    index: int
    channels: list[str]
    state: str = CLOSED
    sock: socket.socket | None = None
    head: bytes = b""
    parser: SSEParser = field(default_factory=SSEParser)
    events: list[dict] = field(default_factory=list)
    rejected: int = 0  # 503s obeyed
    retry_hints: list[float] = field(default_factory=list)
    failures: int = 0  # connects refused or reset (a storm overflowing the listen queue)
    status: int = 0
    queued: bool = False  # waiting for its time to connect


@dataclass
class Pull:
    client: int
    sent: float
    sock: socket.socket
    request: bytes
    connected: bool = False
    data: bytes = b""
    status: int = 0
    done: float = 0.0


class Swarm:
    def __init__(self, host: str, port: int, n: int, channels_of: Callable[[int], list[str]], mode: str = "diff",
                 pull: bool = False, concurrency: int = 100, start: bool = True) -> None:  # fmt: skip
        self.host, self.port = host, port
        self.mode = mode
        self.pull = pull
        self.concurrency = concurrency
        self.clients = [Client(i, channels_of(i)) for i in range(n)]
        self.pulls: list[Pull] = []
        self.errors: list[str] = []
        self.selector = selectors.DefaultSelector()
        self._due: list[tuple[float, int]] = []  # (when, client): connects waiting for their time
        self._lock = threading.Lock()
        self._running = True
        self._connecting = 0
        self._thread = threading.Thread(target=self._run, name="swarm", daemon=True)
        self._thread.start()
        if start:
            self.connect_all()

    # -- driving it (any thread) ----------------------------------------------------------------------------
    def connect_all(self, port: int | None = None, resume: bool = True) -> None:
        """(Re)connect every client, to `port` if given; with `resume`, each sends its Last-Event-ID."""
        with self._lock:
            if port is not None:
                self.port = port
            now = time.monotonic()
            for client in self.clients:
                if not resume:
                    client.parser.last_id = None
                self._queue(client, now)

    def connected(self) -> int:
        return sum(1 for c in self.clients if c.state == STREAM)

    def wait(self, predicate: Callable[[Swarm], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate(self):
                return
            time.sleep(0.02)
        raise AssertionError(
            f"swarm: timed out after {timeout:g} s; {self.connected()} connected, {len(self.pulls)} pulls, "
            f"errors: {self.errors[:3]}"
        )

    def messages(self, client: Client) -> list[dict]:
        return [e for e in list(client.events) if e.get("type") == "message"]

    def close(self) -> None:
        self._running = False
        self._thread.join(5)
        for client in self.clients:
            self._drop(client)
        for p in self.pulls:
            if not p.done:
                p.sock.close()
        self.selector.close()

    def __enter__(self) -> Swarm:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # -- the loop (its own thread) --------------------------------------------------------------------------
    def _run(self) -> None:
        while self._running:
            now = time.monotonic()
            with self._lock:
                while self._due and self._due[0][0] <= now and self._connecting < self.concurrency:
                    client = self.clients[heapq.heappop(self._due)[1]]
                    client.queued = False
                    self._open(client)
                wait = min(0.05, max(0.0, self._due[0][0] - now)) if self._due else 0.05
            for key, events in self.selector.select(timeout=wait):
                target = key.data
                try:
                    if isinstance(target, Pull):
                        self._on_pull(target)
                    elif target.state == CONNECTING and events & selectors.EVENT_WRITE:
                        self._on_connected(target)
                    else:
                        self._on_readable(target)
                except (OSError, ValueError) as exc:  # ValueError: a response we cannot read
                    if isinstance(target, Pull):
                        self._end_pull(target)
                    elif target.state == STREAM:
                        self._drop(target)  # the server went away: reconnecting is the caller's call
                    else:
                        self._fail(target, f"client {target.index}: {exc}")

    def _open(self, client: Client) -> None:
        self._drop(client)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        err = sock.connect_ex((self.host, self.port))
        if err not in (0, errno.EINPROGRESS):
            sock.close()
            self._fail(client, f"connect: {errno.errorcode.get(err, err)}")
            return
        client.sock, client.state, client.head = sock, CONNECTING, b""
        client.parser.buf = b""
        self._connecting += 1
        self.selector.register(sock, selectors.EVENT_WRITE, client)

    def _on_connected(self, client: Client) -> None:
        sock = client.sock
        assert sock is not None
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            raise OSError(err, errno.errorcode.get(err, str(err)))
        query = urlencode([("channel", c) for c in client.channels] + [("mode", self.mode)])
        last_id = f"Last-Event-ID: {client.parser.last_id}\r\n" if client.parser.last_id else ""
        sock.send(f"GET /sse?{query} HTTP/1.0\r\nHost: {self.host}\r\n{last_id}\r\n".encode())
        client.state = HEAD
        self.selector.modify(sock, selectors.EVENT_READ, client)

    def _on_readable(self, client: Client) -> None:
        assert client.sock is not None
        data = client.sock.recv(65536)
        now = time.monotonic()
        if not data:
            if client.state == HEAD and client.status == 503:
                self._retry_after(client, client.head)
            else:
                self._drop(client)
            return
        if client.state == HEAD:
            client.head += data
            end = client.head.find(b"\r\n\r\n")
            if end < 0:
                return
            client.status = int(client.head.split(b" ", 2)[1])
            if client.status != 200:
                return  # read the body to its end (HTTP/1.0: the server closes)
            self._connecting -= 1
            client.state = STREAM
            data, client.head = client.head[end + 4 :], b""
        for event in client.parser.feed(data, now):
            client.events.append(event)
            if self.pull and event.get("type") == "message":
                self._start_pull(client, event["channel"])

    def _retry_after(self, client: Client, response: bytes) -> None:
        head, _, body = response.partition(b"\r\n\r\n")
        try:
            hint = json.loads(body)["retry_ms"] / 1000
        except (ValueError, KeyError):
            self.errors.append(f"503 without retry_ms: {body[:200]!r}")
            match = re.search(rb"(?i)\r\nretry-after: *(\d+)", head)
            hint = float(match[1]) if match else 1.0
        client.rejected += 1
        client.retry_hints.append(hint)
        self._drop(client)
        self._queue(client, time.monotonic() + hint)

    def _fail(self, client: Client, why: str) -> None:
        # A storm may overflow the listen queue: retry shortly, as a browser would.
        self.errors.append(why)
        client.failures += 1
        self._drop(client)
        self._queue(client, time.monotonic() + 0.5)

    def _queue(self, client: Client, when: float) -> None:
        if not client.queued:
            client.queued = True
            heapq.heappush(self._due, (when, client.index))

    def _drop(self, client: Client) -> None:
        if client.sock is not None:
            if client.state in (CONNECTING, HEAD):
                self._connecting -= 1
            with contextlib.suppress(KeyError, ValueError):
                self.selector.unregister(client.sock)
            client.sock.close()
        client.sock, client.state = None, CLOSED

    def _start_pull(self, client: Client, channel: str) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        request = f"GET /channels/{quote(channel)}/state HTTP/1.0\r\nHost: {self.host}\r\n\r\n".encode()
        pull = Pull(client.index, time.monotonic(), sock, request)
        self.pulls.append(pull)
        if sock.connect_ex((self.host, self.port)) not in (0, errno.EINPROGRESS):
            self._end_pull(pull, register=False)
            return
        self.selector.register(sock, selectors.EVENT_WRITE, pull)

    def _on_pull(self, pull: Pull) -> None:
        if not pull.connected:
            err = pull.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                raise OSError(err, errno.errorcode.get(err, str(err)))
            pull.sock.send(pull.request)
            pull.connected = True
            self.selector.modify(pull.sock, selectors.EVENT_READ, pull)
            return
        data = pull.sock.recv(65536)
        if data:
            pull.data += data
            return
        self._end_pull(pull)

    def _end_pull(self, pull: Pull, register: bool = True) -> None:
        if register:
            self.selector.unregister(pull.sock)
        pull.sock.close()
        pull.done = time.monotonic()
        pull.status = int(pull.data.split(b" ", 2)[1]) if pull.data else 0
        if pull.status != 200:
            self.errors.append(f"pull: status {pull.status}")


def per_window(times: list[float], width: float = 1.0) -> list[int]:
    """How many of `times` fall in each `width`-second window from the first one."""
    if not times:
        return []
    start = min(times)
    counts = [0] * (int((max(times) - start) / width) + 1)
    for t in times:
        counts[int((t - start) / width)] += 1
    return counts


def busiest(times: list[float], width: float) -> int:
    """The most of `times` inside any `width`-second sliding window."""
    ordered, best, lo = sorted(times), 0, 0
    for hi, t in enumerate(ordered):
        while t - ordered[lo] > width:
            lo += 1
        best = max(best, hi - lo + 1)
    return best
