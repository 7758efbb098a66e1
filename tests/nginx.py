"""Debian's nginx with the config the project ships (deploy/nginx/nginx.conf), in front of sidecar replicas.

Only the upstream servers and the listen port are replaced, and the paths nginx writes (pid, logs, temp
files) go to the test's directory. Started and stopped by its own pid.
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

from tests.processes import REPO_ROOT, ManagedProcess, free_port

SHIPPED_CONF = REPO_ROOT / "deploy" / "nginx" / "nginx.conf"
UPSTREAM_SERVERS = re.compile(r"# upstream-servers: begin\n.*?# upstream-servers: end\n", re.S)


def nginx_binary() -> str | None:
    return shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if Path(p).exists()), None)


def proxy_conf(backends: list[int], port: int, prefix: Path) -> str:
    """The shipped config for `backends` (ports on 127.0.0.1), listening on `port`, writing under `prefix`."""
    text = SHIPPED_CONF.read_text()
    servers = "".join(f"        server 127.0.0.1:{p} max_fails=1 fail_timeout=5s;\n" for p in backends)
    text, n = UPSTREAM_SERVERS.subn(lambda _: servers, text)
    assert n == 1, "deploy/nginx/nginx.conf lost its upstream-servers markers"
    text, n = re.subn(r"listen 8080;", f"listen 127.0.0.1:{port};", text)
    assert n == 1, "deploy/nginx/nginx.conf must listen on 8080 exactly once"
    paths = f"pid {prefix}/nginx.pid;\nerror_log {prefix}/error.log info;\ndaemon off;\nworker_processes 2;\n"
    text = text.replace("worker_processes auto;\n", paths)
    temp = "".join(
        f"    {kind}_temp_path {prefix}/{kind};\n" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return text.replace("http {\n", "http {\n" + temp, 1)


class NginxProcess(ManagedProcess):
    """nginx on a free port in front of `backends`; ready when it accepts connections."""

    stop_timeout = 5.0

    def __init__(self, backends: list[int], log_dir: Path) -> None:
        binary = nginx_binary()
        if binary is None:
            raise RuntimeError("nginx is not installed: `make test` installs Debian's nginx (apt-get install nginx)")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}"
        self.prefix = log_dir / f"nginx-{self.port}"
        self.prefix.mkdir(parents=True)
        conf = self.prefix / "nginx.conf"
        conf.write_text(proxy_conf(backends, self.port, self.prefix))
        check = subprocess.run([binary, "-t", "-p", str(self.prefix), "-c", str(conf)], capture_output=True, text=True)
        if check.returncode != 0:
            raise RuntimeError(f"nginx -t failed:\n{check.stderr}")
        super().__init__(
            f"nginx-{self.port}", [binary, "-p", str(self.prefix), "-c", str(conf)], {}, self.prefix / "stdout.log"
        )
        self.wait_until("a listening socket", self._listening, 10.0)

    def _listening(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                return True
        except OSError:
            return False

    def error_log(self) -> str:
        path = self.prefix / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def wait_stopped(self, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while self.running and time.monotonic() < deadline:
            time.sleep(0.05)
