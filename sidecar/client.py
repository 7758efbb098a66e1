"""Python client of the sidecar's SSE stream, sync and asyncio: resume, dedupe, and a local state per channel.

Example::

    from sidecar.client import AsyncClient, Client

    with Client("http://127.0.0.1:8000", channels=["sprint:7"], mode="diff") as client:
        for msg in client.messages(timeout=30):   # ends after 30 s without a message
            print(msg["type"], msg["channel"], msg.get("event"))
            print(client.state("sprint:7"))        # the channel's state once msg is applied

    async with AsyncClient("http://127.0.0.1:8000", channels=["sprint:7"]) as client:
        async for msg in client:
            ...

Both yield the frames of docs/protocol.md as dicts: `message`, `snapshot` and `reset` (never `ready`). They keep
each channel's position themselves and send it as `Last-Event-ID`, so a reconnect resumes exactly, on the same
URL or the next one of several (fail-over), with full-jitter exponential backoff based on the server's `retry:`
and any 503's `Retry-After`. Each channel's position is first read from `GET /channels/<c>/state`, so even a
channel that has not sent anything yet resumes from where the client joined it. Messages at or before a
channel's position are duplicates and dropped. A `seq` hole or an epoch change, in any mode, makes the client
pull the state again and hand over a `snapshot` (diff and state modes, a channel with state) or a `reset` with
`"reason": "hole"` or `"epoch"`, then the messages it held after it (docs/protocol.md, "What a client must
do"; tests/vectors/protocol.json). Only the standard library does the I/O: HTTP/1.1 over a socket, so that
`messages(timeout=...)` can return without losing the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from typing import Any
from urllib.parse import SplitResult, quote, urlsplit

import orjson

from sidecar.core.stream import Events, Response, Tracker

__all__ = ["AsyncClient", "Client", "ClientError"]


class ClientError(Exception):
    """The server refused the request for good (a 4xx: bad channel, mode or cursor)."""

    def __init__(self, status: int, body: bytes) -> None:
        try:
            detail = orjson.loads(body)
        except orjson.JSONDecodeError:
            detail = None
        if not isinstance(detail, dict):
            detail = {"error": "http", "message": body[:200].decode(errors="replace")}
        super().__init__(f"HTTP {status}: {detail.get('message', detail)}")
        self.status = status
        self.code = detail.get("error")


class _Unavailable(OSError):
    """A 5xx or 429: try again (after `Retry-After` seconds, if given)."""

    def __init__(self, status: int, retry_after: str | None) -> None:
        super().__init__(f"HTTP {status}")
        self.retry_after = retry_after


class _Base:
    """What the two clients share: positions (via the Tracker), requests, backoff and fail-over."""

    def __init__(
        self,
        url: str | Sequence[str],
        channels: Iterable[str],
        mode: str = "diff",
        *,
        connect_timeout: float = 5.0,
        read_timeout: float = 45.0,
        max_delay: float = 30.0,
        token: str | Callable[[], str] | None = None,
    ) -> None:
        self.urls = [urlsplit(u) for u in ([url] if isinstance(url, str) else url)]
        if not self.urls:
            raise ValueError("give at least one url")
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout  # longer than the server's keep-alive interval (15 s by default)
        self.max_delay = max_delay
        self.token = token  # a callable is asked again at every connect: a stream never outlives its token
        self._tracker = Tracker(channels, mode)
        self._pending: deque[dict] = deque()
        self._url = 0
        self._attempt = 0  # failures since the last `ready`
        self._retry_ms = 1000  # the server's last `retry:`
        self._retry_after = 0.0  # a 503's Retry-After, seconds
        self._events = Events()
        self._response = Response()
        self._backoff = False  # the next connect waits first
        self._closed = False

    @property
    def cursor(self) -> str:
        """The `Last-Event-ID` this client would resume with."""
        return self._tracker.cursor()

    def state(self, channel: str) -> Any:
        """The channel's local state as of the last frame handed over (diff and state modes; else None)."""
        return self._tracker.channels[channel].state

    def _next(self) -> dict:
        frame = self._pending.popleft()
        self._tracker.apply(frame)
        return frame

    def _delay(self) -> float:
        """Full-jitter exponential backoff on the server's `retry:` (SSE spec), at least a 503's Retry-After."""
        if not self._backoff:
            return 0.0
        delay = random.uniform(0, min(self.max_delay, self._retry_ms / 1000 * 2**self._attempt))
        return max(delay, self._retry_after)

    def _failed(self, retry_after: str | None) -> None:
        self._attempt += 1
        self._url = (self._url + 1) % len(self.urls)  # fail over to the next URL
        self._retry_after = min(float(retry_after), self.max_delay) if retry_after and retry_after.isdigit() else 0
        self._backoff = True

    def _dropped(self) -> None:
        self._backoff = True
        self._tracker.reconnecting()

    def _request(self, url: SplitResult, path: str, headers: dict[str, str]) -> bytes:
        token = self.token() if callable(self.token) else self.token
        if token:
            headers["Authorization"] = f"Bearer {token}"
        lines = [f"GET {url.path.rstrip('/')}{path} HTTP/1.1", f"Host: {url.netloc}", *map(": ".join, headers.items())]
        return ("\r\n".join(lines) + "\r\n\r\n").encode()

    def _sse_request(self, url: SplitResult) -> bytes:
        self._events, self._response = Events(), Response()
        headers = {"Accept": "text/event-stream", "Cache-Control": "no-cache", "Last-Event-ID": self.cursor}
        return self._request(url, f"/sse?{self._tracker.query()}", headers)

    def _state_request(self, url: SplitResult, channel: str) -> bytes:
        return self._request(url, f"/channels/{quote(channel, safe=':@')}/state", {"Connection": "close"})

    def _reading_head(self) -> bool:
        """Whether the SSE response still needs bytes before :meth:`_opened` can judge it."""
        status = self._response.status
        return not status or (status != 200 and not self._response.done)

    def _opened(self, body: bytes) -> None:
        """The SSE response's head is in: return to stream, or raise (ClientError: give up; OSError: retry)."""
        status = self._response.status
        if status == 200:
            self._events_in(body)
        elif not status:
            raise OSError("connection closed before the response")
        elif 400 <= status < 500 and status != 429:
            raise ClientError(status, body)
        else:
            raise _Unavailable(status, self._response.headers.get("retry-after"))

    def _pulled(self, channel: str, response: Response, body: bytes) -> None:
        if response.status not in (200, 404):
            if 400 <= response.status < 500 and response.status != 429:
                raise ClientError(response.status, body)
            raise _Unavailable(response.status, response.headers.get("retry-after"))
        answer = orjson.loads(body) if response.status == 200 else None
        if response.status == 404 and b'"unknown-channel"' not in body:
            raise ClientError(404, body)  # not the sidecar's state endpoint: a wrong base URL
        self._pending.extend(self._tracker.pulled(channel, answer))

    def _receive(self, data: bytes) -> None:
        self._events_in(self._response.feed(data))

    def _events_in(self, body: bytes) -> None:
        for event, payload in self._events.feed(body):
            if event == "ready":
                self._attempt, self._retry_after = 0, 0.0
            self._pending.extend(self._tracker.feed(event, payload))
        self._retry_ms = self._events.retry or self._retry_ms


def _left(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


class Client(_Base):
    """A blocking SSE client.

    Example::

        with Client(["http://a:8000", "http://b:8000"], channels=["task:42", "sprint:7"]) as client:
            for msg in client.messages(timeout=10):
                if msg["channel"] == "task:42" and client.state("task:42").get("status") == "SUCCESS":
                    break

    `url` is one base URL or several, tried in turn when a connection fails. `mode` is one of poke, state,
    event, diff. `token` (a string, or a callable giving a fresh one at each connect) goes out as
    `Authorization: Bearer`. `read_timeout` must exceed the server's keep-alive interval: a silent socket is a
    dead one. A 4xx other than 429 (bad channel, refused token) raises :class:`ClientError`.
    """

    def __init__(self, url: str | Sequence[str], channels: Iterable[str], mode: str = "diff", **options: Any) -> None:
        super().__init__(url, channels, mode, **options)
        self._sock: socket.socket | None = None
        self._heard = 0.0  # when the socket last gave bytes

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection; safe from another thread (a blocked `messages()` then returns)."""
        self._closed = True
        self._drop()

    def messages(self, timeout: float | None = None) -> Iterator[dict]:
        """Frames as they come; ends after `timeout` seconds without one (None: never). Call again to go on."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._closed:
            if self._pending:
                yield self._next()
                deadline = None if timeout is None else time.monotonic() + timeout
                continue
            left = _left(deadline)
            if left == 0:
                return
            if self._sock is None:
                self._connect(deadline)
            elif self._tracker.stale():
                try:
                    self._pull(self._tracker.stale(), self.urls[self._url])
                except OSError:
                    self._drop()
            else:
                self._read(self.read_timeout if left is None else min(left, self.read_timeout))

    def _read(self, wait: float) -> None:
        assert self._sock is not None
        try:
            self._sock.settimeout(wait)
            data = self._sock.recv(65536)
        except TimeoutError:
            if time.monotonic() - self._heard >= self.read_timeout:
                self._drop()
            return
        except OSError:
            data = b""
        if not data:
            self._drop()
            return
        self._heard = time.monotonic()
        self._receive(data)
        if self._response.done:
            self._drop()

    def _connect(self, deadline: float | None) -> None:
        delay, left = self._delay(), _left(deadline)
        time.sleep(delay if left is None else min(delay, left))
        if _left(deadline) == 0 or self._closed:
            return
        url = self.urls[self._url]
        try:
            if not self._tracker.seeded:
                self._pull(list(self._tracker.channels), url)
                self._tracker.seeded = True
            sock = self._open(url)
            try:
                sock.sendall(self._sse_request(url))
                body = b""
                while self._reading_head() and (data := sock.recv(65536)):
                    body += self._response.feed(data)
                self._opened(body)
            except BaseException:
                sock.close()
                raise
        except OSError as exc:
            self._failed(getattr(exc, "retry_after", None))
            return
        self._sock, self._heard = sock, time.monotonic()

    def _pull(self, channels: list[str], url: SplitResult) -> None:
        """Read channels' state with `GET /channels/<c>/state` (at the start, and after a hole)."""
        for channel in channels:
            with self._open(url) as sock:
                sock.sendall(self._state_request(url, channel))
                response, body = Response(), b""
                while not response.done and (data := sock.recv(65536)):
                    body += response.feed(data)
            self._pulled(channel, response, body)

    def _open(self, url: SplitResult) -> socket.socket:
        https = url.scheme == "https"
        sock = socket.create_connection((url.hostname, url.port or (443 if https else 80)), self.connect_timeout)
        sock.settimeout(self.read_timeout)
        return ssl.create_default_context().wrap_socket(sock, server_hostname=url.hostname) if https else sock

    def _drop(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
            self._dropped()


class AsyncClient(_Base):
    """The asyncio twin of :class:`Client` (same arguments).

    Example::

        async with AsyncClient("http://127.0.0.1:8000", channels=["import:42"], mode="diff") as client:
            async for msg in client.messages(timeout=60):
                progress = client.state("import:42").get("done")
    """

    def __init__(self, url: str | Sequence[str], channels: Iterable[str], mode: str = "diff", **options: Any) -> None:
        super().__init__(url, channels, mode, **options)
        self._stream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self._heard = 0.0

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    def __aiter__(self) -> AsyncIterator[dict]:
        return self.messages()

    async def close(self) -> None:
        self._closed = True
        await self._drop()

    async def messages(self, timeout: float | None = None) -> AsyncIterator[dict]:
        """Frames as they come; ends after `timeout` seconds without one (None: never). Call again to go on."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._closed:
            if self._pending:
                yield self._next()
                deadline = None if timeout is None else time.monotonic() + timeout
                continue
            left = _left(deadline)
            if left == 0:
                return
            if self._stream is None:
                await self._connect(deadline)
            elif self._tracker.stale():
                try:
                    await self._pull(self._tracker.stale(), self.urls[self._url])
                except OSError:
                    await self._drop()
            else:
                await self._read(self.read_timeout if left is None else min(left, self.read_timeout))

    async def _read(self, wait: float) -> None:
        assert self._stream is not None
        try:
            # Cancelling a StreamReader.read() consumes nothing, so a timeout leaves the stream usable.
            data = await asyncio.wait_for(self._stream[0].read(65536), wait)
        except TimeoutError:
            if time.monotonic() - self._heard >= self.read_timeout:
                await self._drop()
            return
        except OSError:
            data = b""
        if not data:
            await self._drop()
            return
        self._heard = time.monotonic()
        self._receive(data)
        if self._response.done:
            await self._drop()

    async def _connect(self, deadline: float | None) -> None:
        delay, left = self._delay(), _left(deadline)
        await asyncio.sleep(delay if left is None else min(delay, left))
        if _left(deadline) == 0 or self._closed:
            return
        url = self.urls[self._url]
        try:
            if not self._tracker.seeded:
                await self._pull(list(self._tracker.channels), url)
                self._tracker.seeded = True
            reader, writer = await self._open(url)
            try:
                writer.write(self._sse_request(url))
                body = b""
                while self._reading_head() and (data := await self._recv(reader)):
                    body += self._response.feed(data)
                self._opened(body)
            except BaseException:
                await _close(writer)
                raise
        except OSError as exc:  # TimeoutError included
            self._failed(getattr(exc, "retry_after", None))
            return
        self._stream, self._heard = (reader, writer), time.monotonic()

    async def _pull(self, channels: list[str], url: SplitResult) -> None:
        for channel in channels:
            reader, writer = await self._open(url)
            try:
                writer.write(self._state_request(url, channel))
                response, body = Response(), b""
                while not response.done and (data := await self._recv(reader)):
                    body += response.feed(data)
            finally:
                await _close(writer)
            self._pulled(channel, response, body)

    async def _recv(self, reader: asyncio.StreamReader) -> bytes:
        return await asyncio.wait_for(reader.read(65536), self.read_timeout)

    async def _open(self, url: SplitResult) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        https = url.scheme == "https"
        context = ssl.create_default_context() if https else None
        connect = asyncio.open_connection(url.hostname, url.port or (443 if https else 80), ssl=context)
        return await asyncio.wait_for(connect, self.connect_timeout)

    async def _drop(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            await _close(stream[1])
            self._dropped()


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
