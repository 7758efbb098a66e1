"""The servers under test as child processes (stopped by pid), and a meter of their CPU and memory."""

from __future__ import annotations

import os
import socket
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import psutil
import requests

from tests.processes import REPO_ROOT, ManagedProcess, SidecarProcess, child_env, free_port

__all__ = ["FRONTS", "CeilingProcess", "Meter", "PeerProcess", "SidecarProcess", "start_sidecar"]


FRONTS = ("gevent", "asgi")  # `sidecar serve --front`: Flask on gevent.pywsgi, or the asyncio front on uvicorn


def start_sidecar(
    redis_url: str, log_dir: Path, tree: Path | None = None, front: str = "gevent", **env: object
) -> SidecarProcess:
    """The sidecar of this repository, or of another checkout `tree` (a before/after comparison), on `front`."""
    if tree is None and front == "gevent":
        return SidecarProcess(redis_url, log_dir, env, ready_timeout=30)
    return TreeSidecar(redis_url, log_dir, tree or REPO_ROOT, env, front)


class TreeSidecar(SidecarProcess):
    """`python -m sidecar serve` run from a checkout (its own `sidecar` package comes first on sys.path), on a
    front: the default one is started without `--front`, so an older checkout runs too."""

    def __init__(
        self, redis_url: str, log_dir: Path, tree: Path, env: Mapping[str, object], front: str = "gevent"
    ) -> None:
        if front not in FRONTS:
            raise ValueError(f"front {front!r}: one of {', '.join(FRONTS)}")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}"
        self.allow_tracebacks = False
        argv = [sys.executable, "-m", "sidecar", "serve", "--host", "127.0.0.1", "--port", str(self.port)]
        argv += [] if front == "gevent" else ["--front", front]
        if front != "gevent" and os.environ.get("BENCH_ASGI_UNPATCHED") == "1":
            # `python -m sidecar serve` monkey-patches for either front (sidecar/__main__.py); the `sidecar`
            # script and uvicorn do not. This starts the CLI as the script does, to measure the front unpatched.
            argv[1:3] = ["-c", "import sys; from sidecar.cli import main; sys.exit(main())"]
        name = f"sidecar-{tree.name}-{front}-{self.port}"
        environ = child_env(redis_url, {"SIDECAR_DEV": "1", **env})
        ManagedProcess.__init__(self, name, argv, environ, log_dir / f"{name}.log", cwd=tree)
        self.wait_until("GET /healthz 200", self._healthy, 30)


class PeerProcess(ManagedProcess):
    """Flask-SocketIO on gevent (bench/peer.py), ready when /healthz answers."""

    def __init__(self, redis_url: str, log_dir: Path, env: Mapping[str, object] = {}) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        argv = [sys.executable, "-m", "bench.peer", "--port", str(self.port)]
        super().__init__(f"peer-{self.port}", argv, child_env(redis_url, env), log_dir / f"peer-{self.port}.log")
        self.wait_until("GET /healthz 200", self._healthy, 30)

    def _healthy(self) -> bool:
        try:
            return requests.get(self.url + "/healthz", timeout=1).status_code == 200
        except requests.RequestException:
            return False


class CeilingProcess(ManagedProcess):
    """The raw ceiling server (bench/ceiling.py) and its control socket."""

    def __init__(self, log_dir: Path, transport: str, write: str) -> None:
        self.port = free_port()
        argv = [sys.executable, "-m", "bench.ceiling", "--port", str(self.port), "--transport", transport,
                "--write", write]  # fmt: skip
        name = f"ceiling-{transport}-{write}-{self.port}"
        super().__init__(name, argv, child_env("", {}), log_dir / f"{name}.log")
        self.control: socket.socket | None = None
        self.wait_until("control socket", self._connect, 15)

    def _connect(self) -> bool:
        try:
            sock = socket.create_connection(("127.0.0.1", self.port), timeout=1)
        except OSError:
            return False
        sock.sendall(b"GET /control HTTP/1.1\r\n\r\n")
        sock.settimeout(120)
        if sock.recv(3) != b"ok\n":
            sock.close()
            return False
        self.control = sock
        return True

    def run(self, rate: float, count: int, pad: int) -> None:
        """Make `count` messages at `rate`/s; return when the last one was written."""
        assert self.control is not None
        self.control.sendall(f"run {rate} {count} {pad}\n".encode())
        if self.control.recv(5) != b"done\n":
            raise RuntimeError("the ceiling server did not finish its run")

    def stop(self) -> None:
        if self.control is not None:
            self.control.close()
            self.control = None
        super().stop()


class Meter:
    """CPU% (of one core) and RSS of some processes between :meth:`start` and :meth:`stop`."""

    def __init__(self, *pids: int) -> None:
        self.procs = [psutil.Process(pid) for pid in pids]
        self.t0 = 0.0
        self.cpu0 = [0.0 for _ in self.procs]

    def _cpu(self) -> list[float]:
        out = []
        for proc in self.procs:
            t = proc.cpu_times()
            out.append(t.user + t.system)
        return out

    def rss_mb(self) -> list[float]:
        return [round(proc.memory_info().rss / 2**20, 1) for proc in self.procs]

    def start(self) -> Meter:
        self.t0, self.cpu0 = time.monotonic(), self._cpu()
        return self

    def stop(self) -> list[float]:
        """CPU% of each process since start (100 = one core busy)."""
        elapsed = max(time.monotonic() - self.t0, 1e-6)
        return [round((b - a) / elapsed * 100, 1) for a, b in zip(self.cpu0, self._cpu())]
