"""`python -m bench.fronts_profile [sse|ws]`: tracemalloc of 300 idle connections on the ASGI front (uvicorn in
this process): Python allocations per connection, and the top allocation sites.
"""

from __future__ import annotations

import base64
import os
import socket
import sys
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path

import uvicorn

from sidecar.asgi import WSProtocol, create_app
from sidecar.config import Settings
from sidecar.embedded import EmbeddedRedis, free_port

N = 300


def request(kind: str) -> bytes:
    if kind == "sse":
        return b"GET /sse?channel=idle&mode=event HTTP/1.1\r\nHost: x\r\n\r\n"
    key = base64.b64encode(os.urandom(16)).decode()
    return (f"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode()  # fmt: skip


def main(kind: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        redis_server = EmbeddedRedis(Path(tmp) / "redis").start()
        port = free_port()
        settings = Settings(redis_url=redis_server.url, dev=True, admit_rate=1e5, admit_burst=100_000)
        config = uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, ws=WSProtocol,
                                log_level="warning", lifespan="on")  # fmt: skip
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.05)

        def open_one() -> socket.socket:
            sock = socket.create_connection(("127.0.0.1", port))
            sock.sendall(request(kind))
            sock.recv(4096)
            return sock

        warm = [open_one() for _ in range(20)]
        time.sleep(1)
        tracemalloc.start(10)
        before = tracemalloc.take_snapshot()
        socks = [open_one() for _ in range(N)]
        time.sleep(2)
        after = tracemalloc.take_snapshot()
        total = sum(s.size_diff for s in after.compare_to(before, "traceback"))
        print(f"{kind}: {total / N / 1024:.1f} KB of Python allocations per connection (tracemalloc)")
        for stat in after.compare_to(before, "lineno")[:14]:
            frame = stat.traceback[0]
            print(f"  {stat.size_diff / N:8.0f} B/conn  {frame.filename.split('site-packages/')[-1]}:{frame.lineno}")
        for sock in warm + socks:
            sock.close()
        server.should_exit = True
        thread.join(5)
        redis_server.stop()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "sse")
