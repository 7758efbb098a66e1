"""`python -m bench.fronts_profile [sse|ws] [top]`: tracemalloc of 300 idle connections on the ASGI front (uvicorn in
this process, with `sidecar serve --front asgi`'s uvicorn config: `sidecar.asgi.uvicorn_config`, its protocols
included): Python allocations per connection, and the top allocation sites, each by its innermost line and by the
innermost line outside the standard library (who asked for it). Until 2026-12-01 evening it ran uvicorn's own
HTTP protocol (no `sidecar.direct` for SSE) and uvicorn's WebSocket ping timer.
"""

from __future__ import annotations

import base64
import dataclasses
import os
import socket
import sys
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path

import uvicorn

from sidecar.asgi import uvicorn_config
from sidecar.config import Settings
from sidecar.embedded import EmbeddedRedis, free_port

N = 300
STDLIB = os.path.dirname(os.__file__)


def caller(trace: tracemalloc.Traceback) -> str:
    """The innermost frame outside the standard library: the code that asked for the allocation."""
    for frame in reversed(trace):
        if not frame.filename.startswith(STDLIB) or "site-packages" in frame.filename:
            return f"{short(frame.filename)}:{frame.lineno}"
    return f"{short(trace[-1].filename)}:{trace[-1].lineno}"


def short(filename: str) -> str:
    return filename.split("site-packages/")[-1].replace(STDLIB + "/", "").replace(os.getcwd() + "/", "")


def request(kind: str) -> bytes:
    if kind == "sse":
        return b"GET /sse?channel=idle&mode=event HTTP/1.1\r\nHost: x\r\n\r\n"
    key = base64.b64encode(os.urandom(16)).decode()
    return (f"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode()  # fmt: skip


def main(kind: str, top: int = 24) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        redis_server = EmbeddedRedis(Path(tmp) / "redis").start()
        port = free_port()
        settings = Settings(redis_url=redis_server.url, dev=True, admit_rate=1e5, admit_burst=100_000)
        settings = dataclasses.replace(settings, host="127.0.0.1", port=port)
        config = uvicorn_config(settings, log_level="warning")  # `sidecar serve --front asgi`'s
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
        diffs = after.compare_to(before, "traceback")
        total = sum(s.size_diff for s in diffs)
        print(f"{kind}: {total / N / 1024:.1f} KB of Python allocations per connection (tracemalloc)")
        print(" by innermost line:")
        for stat in after.compare_to(before, "lineno")[:14]:
            frame = stat.traceback[0]
            print(f"  {stat.size_diff / N:8.0f} B/conn  {short(frame.filename)}:{frame.lineno}")
        callers: dict[str, int] = {}
        for stat in diffs:
            site = caller(stat.traceback)
            callers[site] = callers.get(site, 0) + stat.size_diff
        packages: dict[str, int] = {}
        for site, size in callers.items():
            parts = site.split(":")[0].split("/")
            package = "/".join(parts[:2]) if parts[0] == "sidecar" else parts[0].removesuffix(".py")
            packages[package] = packages.get(package, 0) + size
        ranked = sorted(packages.items(), key=lambda kv: -kv[1])
        print(" by package (of that line):", ", ".join(f"{name} {size / N:.0f} B" for name, size in ranked if size > N))
        print(" by innermost line outside the standard library:")
        for site, size in sorted(callers.items(), key=lambda kv: -kv[1])[:top]:
            print(f"  {size / N:8.0f} B/conn  {site}")
        for sock in warm + socks:
            sock.close()
        server.should_exit = True
        thread.join(5)
        redis_server.stop()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "sse", int(sys.argv[2]) if len(sys.argv) > 2 else 24)
