"""Minimal SSE and WebSocket test clients that record every frame, so tests assert on exactly what arrived."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlencode

import requests
import websocket

Frame = dict[str, Any]


def close_stream(response: requests.Response) -> None:
    """Close a streaming response that a thread is reading: shut its socket down first, so that the server sees
    the client leave (as a browser closing the tab would) and the reader's blocked read ends. A bare close() would
    wait for that read to end by itself (the read timeout, with no event coming)."""
    try:
        sock = response.raw._fp.fp.raw._sock  # type: ignore[union-attr]
        sock.shutdown(socket.SHUT_RDWR)
    except (AttributeError, OSError):
        pass
    response.close()


class Recorder:
    """Frames received by a background reader; `wait` polls a predicate with a bound."""

    def __init__(self) -> None:
        self.frames: list[Frame] = []
        self.error: BaseException | None = None
        self.closed = threading.Event()

    def wait(self, predicate: Callable[[list[Frame]], bool], timeout: float = 10.0) -> list[Frame]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate(self.frames):
                return self.frames
            time.sleep(0.01)
        raise AssertionError(f"timed out; got {len(self.frames)} frames: {self.frames[-5:]}")

    def messages(self, channel: str | None = None) -> list[Frame]:
        return [f for f in self.frames if f["type"] == "message" and channel in (None, f["channel"])]

    def of_type(self, kind: str) -> list[Frame]:
        return [f for f in self.frames if f["type"] == kind]


class SSEClient(Recorder):
    """An EventSource-like reader: records each event's data plus its `id:` (the cursor) and name."""

    def __init__(self, base: str, channels: list[str], mode: str = "diff", last_event_id: str | None = None,
                 headers: dict[str, str] | None = None, **params: str) -> None:  # fmt: skip
        super().__init__()
        query = urlencode([("channel", c) for c in channels] + [("mode", mode)] + list(params.items()))
        headers = {**(headers or {}), **({"Last-Event-ID": last_event_id} if last_event_id else {})}
        self.response = requests.get(f"{base}/sse?{query}", headers=headers, stream=True, timeout=(5, 30))
        self.status = self.response.status_code
        self.last_id: str | None = None
        self.retry: int | None = None
        if self.status == 200:
            threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        event, data, frame_id = "message", [], None
        try:
            for raw in self.response.iter_lines(chunk_size=None, decode_unicode=False):
                line = raw.decode()
                if not line:
                    if data:
                        frame = json.loads("\n".join(data))
                        frame["_event"], frame["_id"] = event, frame_id
                        if frame_id is not None:
                            self.last_id = frame_id
                        self.frames.append(frame)
                    event, data, frame_id = "message", [], None
                elif line.startswith(":"):
                    continue
                else:
                    name, _, value = line.partition(":")
                    value = value[1:] if value.startswith(" ") else value
                    if name == "data":
                        data.append(value)
                    elif name == "event":
                        event = value
                    elif name == "id":
                        frame_id = value
                    elif name == "retry":
                        self.retry = int(value)
        except (requests.RequestException, OSError, AttributeError) as exc:
            self.error = exc
        finally:
            self.closed.set()

    def close(self) -> None:
        close_stream(self.response)
        self.closed.wait(5)


class WSClient(Recorder):
    """`query` is appended to /ws; `token` goes in an Authorization header; `options` (origin, header, ...) go to
    websocket-client's create_connection."""

    def __init__(self, ws_url: str, query: str = "", token: str | None = None, **options: Any) -> None:
        super().__init__()
        if token:
            options["header"] = [*options.get("header", []), f"Authorization: Bearer {token}"]
        self.ws = websocket.create_connection(f"{ws_url}/ws{query}", timeout=30, **options)
        self.close_code: int | None = None
        self.close_reason = ""
        threading.Thread(target=self._read, daemon=True).start()

    def send(self, **frame: Any) -> None:
        self.ws.send(json.dumps(frame))

    def subscribe(self, channel: str, mode: str = "diff", **extra: Any) -> None:
        self.send(op="subscribe", channel=channel, mode=mode, **extra)

    def _read(self) -> None:
        try:
            while True:
                opcode, data = self.ws.recv_data(control_frame=False)
                if opcode == websocket.ABNF.OPCODE_CLOSE:
                    if len(data) >= 2:
                        self.close_code = int.from_bytes(data[:2], "big")
                        self.close_reason = data[2:].decode(errors="replace")
                    break
                if opcode == websocket.ABNF.OPCODE_TEXT:
                    self.frames.append(json.loads(data))
        except (websocket.WebSocketException, OSError) as exc:
            self.error = exc
        finally:
            self.closed.set()

    def close(self) -> None:
        with contextlib.suppress(websocket.WebSocketException, OSError):
            self.ws.close()
        self.closed.wait(5)
        self.ws.shutdown()  # the socket too, also when the server closed first
