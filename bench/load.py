"""The driver's side of the load clients: a few processes (bench/loadclient.py), each with many sockets."""

from __future__ import annotations

import contextlib
import json
import os
import select
import subprocess
import sys
import time
from typing import Any

from bench.wire import merge_hists, percentiles
from tests.processes import REPO_ROOT


class LoadClients:
    """`procs` client processes sharing `count` connections of one kind to one server.

    Example::

        with LoadClients(2) as load:
            load.open(host, port, "sse", 1000, path="/sse?channel=bench&mode=event")
            load.mark(from_seq=1)
            ...publish...
            summary = load.report()
    """

    def __init__(self, procs: int) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.procs = [
            subprocess.Popen(
                [sys.executable, "-m", "bench.loadclient"],
                cwd=REPO_ROOT,
                env=env,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=None,
            )  # fmt: skip
            for _ in range(procs)
        ]
        self.buffers = [b"" for _ in self.procs]

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def _send(self, index: int, cmd: dict) -> None:
        proc = self.procs[index]
        assert proc.stdin is not None
        proc.stdin.write(json.dumps(cmd).encode() + b"\n")
        proc.stdin.flush()

    def _recv(self, index: int, timeout: float) -> dict:
        proc = self.procs[index]
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buffers[index]:
            left = deadline - time.monotonic()
            if left <= 0 or proc.poll() is not None:
                raise RuntimeError(f"load client {proc.pid} did not answer (exit code {proc.poll()})")
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 1 << 20)
                if not chunk:
                    raise RuntimeError(f"load client {proc.pid} exited")
                self.buffers[index] += chunk
        line, self.buffers[index] = self.buffers[index].split(b"\n", 1)
        return json.loads(line)

    def ask(self, cmd: dict, timeout: float = 30.0) -> list[dict]:
        for i in range(len(self.procs)):
            self._send(i, cmd)
        return [self._recv(i, timeout) for i in range(len(self.procs))]

    def open(
        self, host: str, port: int, kind: str, count: int, path: str = "/", channels: list[list[str]] | None = None,
        timeout: float = 120.0, **extra: Any,
    ) -> dict:  # fmt: skip
        """Open `count` connections spread over the processes; returns how many are ready and failed."""
        n = len(self.procs)
        start = 0
        for i in range(n):
            share = count // n + (1 if i < count % n else 0)
            # One list for everyone, or one list per connection (each process gets its connections' lists).
            mine = channels if channels is None or len(channels) == 1 else channels[start : start + share]
            start += share
            self._send(i, {"op": "open", "host": host, "port": port, "kind": kind, "path": path,
                           "count": share, "channels": mine, **extra})  # fmt: skip
        replies = [self._recv(i, timeout) for i in range(n)]
        errors: dict[str, int] = {}
        for r in replies:
            for k, v in r["errors"].items():
                errors[k] = errors.get(k, 0) + v
        return {
            "ready": sum(r["ready"] for r in replies),
            "failed": sum(r["failed"] for r in replies),
            "errors": errors,
        }

    def mark(self, from_seq: int = 0) -> None:
        self.ask({"op": "mark", "from_seq": from_seq})

    def received(self) -> int:
        return sum(r["received"] for r in self.ask({"op": "status"}))

    def wait_received(self, expected: int, timeout: float) -> int:
        """Poll until `expected` messages arrived in total or `timeout` passed; what arrived."""
        deadline = time.monotonic() + timeout
        got = self.received()
        while got < expected and time.monotonic() < deadline:
            time.sleep(0.05)
            got = self.received()
        return got

    def report(self) -> dict:
        replies = self.ask({"op": "report"}, timeout=60)
        hists = []
        for r in replies:
            hist = [0] * 701
            for k, v in r["hist"].items():
                hist[int(k)] = v
            hists.append(hist)
        merged = merge_hists(hists)
        p50, p95, p99 = percentiles(merged)
        maxes = [r["max"] for r in replies if r["max"] is not None]
        return {
            "received": sum(r["received"] for r in replies),
            "gaps": sum(r["gaps"] for r in replies),
            "closed": sum(r["closed"] for r in replies),
            "stale": sum(r["stale"] for r in replies),
            "responses": sum(r["responses"] for r in replies),
            "conns": sum(r["conns"] for r in replies),
            "min_count": min((r["min_count"] for r in replies if r["conns"]), default=0),
            "p50": p50, "p95": p95, "p99": p99, "max": round(max(maxes), 2) if maxes else None,
        }  # fmt: skip

    def close(self) -> None:
        """Ask each client to close its sockets; stop it by pid if it does not exit."""
        for i in range(len(self.procs)):
            with contextlib.suppress(OSError, ValueError):
                self._send(i, {"op": "close"})
        for proc in self.procs:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            for stream in (proc.stdin, proc.stdout):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()

    def __enter__(self) -> LoadClients:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
