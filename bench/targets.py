"""What a scenario drives: a server process, how clients connect to it, and how a message is published to it.

Three kinds, all with the same message body (~200 bytes) so that only the server differs:
- :class:`SidecarTarget`: the sidecar; the driver publishes with :class:`sidecar.publish.Publisher` (Redis);
- :class:`PeerTarget`: Flask-SocketIO; the driver is the external emitter (`SocketIO(message_queue=...)`);
- :class:`CeilingTarget`: the raw server, which makes the messages itself (see bench/ceiling.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from bench.load import LoadClients
from bench.servers import CeilingProcess, PeerProcess, start_sidecar
from bench.wire import now_ms
from sidecar.publish import Publisher

PAD = 60  # bytes of padding that bring a message body to ~200 bytes


def pace(count: int, rate: float, send: Callable[[int], None]) -> float:
    """Call `send(k)` so that `count` messages go out at `rate`/s (k > 1 when behind); the seconds it took."""
    t0 = time.monotonic()
    sent = 0
    while sent < count:
        due = min(count, int((time.monotonic() - t0) * rate) + 1)
        if due > sent:
            send(due - sent)
            sent = due
        else:
            time.sleep(max(0.0, t0 + sent / rate - time.monotonic()))
    return time.monotonic() - t0


class Target:
    name = ""
    transport = ""
    pid = 0
    next_seq = 1  # seq of the next message published

    def open(self, load: LoadClients, count: int) -> dict:
        raise NotImplementedError

    def publish(self, count: int, rate: float) -> float:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError


class SidecarTarget(Target):
    name = "sidecar"

    def __init__(
        self, redis_url: str, log_dir: Path, transport: str, channel: str, tree: Path | None = None,
        front: str = "gevent", **env: object,
    ) -> None:  # fmt: skip
        self.transport = transport
        self.channel = channel
        if front != "gevent":
            self.name = f"sidecar-{front}"
        if tree is not None:
            self.name += f"@{tree.name}"
        self.proc = start_sidecar(redis_url, log_dir, tree, front=front, **env)
        self.pid = self.proc.pid
        self.publisher = Publisher.from_url(redis_url)
        self.data = {"pad": "x" * PAD}

    def open(self, load: LoadClients, count: int) -> dict:
        if self.transport == "sse":
            return load.open("127.0.0.1", self.proc.port, "sse", count, path=f"/sse?channel={self.channel}&mode=event")
        return load.open("127.0.0.1", self.proc.port, "ws", count, path="/ws", channels=[[self.channel]], mode="event")

    def send(self, k: int) -> None:
        if k == 1:
            self.publisher.event(self.channel, "tick", self.data)
        else:
            with self.publisher.batch() as batch:
                for _ in range(k):
                    batch.event(self.channel, "tick", self.data)
        self.next_seq += k

    def publish(self, count: int, rate: float) -> float:
        return pace(count, rate, self.send)

    def stop(self) -> None:
        self.publisher.close()
        self.proc.stop()


class PeerTarget(Target):
    name = "peer"
    transport = "ws"

    def __init__(self, redis_url: str, log_dir: Path) -> None:
        from flask_socketio import SocketIO

        self.proc = PeerProcess(redis_url, log_dir)
        self.pid = self.proc.pid
        self.emitter = SocketIO(message_queue=redis_url)
        self.pad = "x" * PAD

    def open(self, load: LoadClients, count: int) -> dict:
        return load.open("127.0.0.1", self.proc.port, "sio", count, path="/socket.io/?EIO=4&transport=websocket")

    def send(self, k: int) -> None:
        for _ in range(k):
            ts = round(now_ms(), 3)
            body = {"type": "message", "channel": "bench", "id": f"{int(ts)}-0", "seq": self.next_seq,
                    "epoch": "0badcafe", "event": "tick", "ts": ts, "data": {"pad": self.pad}}  # fmt: skip
            self.emitter.emit("msg", body, to="bench")
            self.next_seq += 1

    def publish(self, count: int, rate: float) -> float:
        return pace(count, rate, self.send)

    def stop(self) -> None:
        self.proc.stop()


class CeilingTarget(Target):
    name = "raw"

    def __init__(self, log_dir: Path, transport: str, write: str) -> None:
        self.transport = transport
        self.write = write
        self.name = f"raw-{write}"
        self.proc = CeilingProcess(log_dir, transport, write)
        self.pid = self.proc.pid

    def open(self, load: LoadClients, count: int) -> dict:
        return load.open("127.0.0.1", self.proc.port, f"raw-{self.transport}", count, path="/")

    def publish(self, count: int, rate: float) -> float:
        t0 = time.monotonic()
        self.proc.run(rate, count, PAD)
        self.next_seq += count
        return time.monotonic() - t0

    def stop(self) -> None:
        self.proc.stop()
