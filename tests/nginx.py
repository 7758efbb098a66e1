"""Debian's nginx with the config the project ships (deploy/nginx/nginx.conf), in front of sidecar replicas.

Only the upstream servers and the listen port are replaced, and the paths nginx writes (pid, logs, temp
files) go to the test's directory. Started and stopped by its own pid.
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from tests.processes import REPO_ROOT, ManagedProcess, free_port

SHIPPED_CONF = REPO_ROOT / "deploy" / "nginx" / "nginx.conf"
UPSTREAM_SERVERS = re.compile(r"# upstream-servers: begin\n.*?# upstream-servers: end\n", re.S)


def nginx_binary() -> str | None:
    return shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if Path(p).exists()), None)


def proxy_conf(backends: list[int], port: int, prefix: Path, pages: dict[str, Path] | None = None) -> str:
    """The shipped config for `backends` (ports on 127.0.0.1), listening on `port`, writing under `prefix`;
    `pages` (path -> file) are served by nginx itself, as a site would serve its own pages beside the relay."""
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
    text = text.replace("http {\n", "http {\n" + temp, 1)
    locations = "".join(
        f"        location = {path} {{\n            default_type text/html;\n            alias {file};\n        }}\n\n"
        for path, file in (pages or {}).items()
    )
    text, n = re.subn(r"(        location / \{)", lambda m: locations + m.group(1), text)
    assert n == 1, "deploy/nginx/nginx.conf must have one `location /`"
    return text


class NginxProcess(ManagedProcess):
    """nginx on a free port in front of `backends`; ready when it accepts connections. `pages` (path -> HTML)
    are served by nginx itself, so that a browser page and the relay share one origin."""

    stop_timeout = 5.0

    def __init__(self, backends: list[int], log_dir: Path, pages: dict[str, str] | None = None) -> None:
        binary = nginx_binary()
        if binary is None:
            raise RuntimeError("nginx is not installed: `make test` installs Debian's nginx (apt-get install nginx)")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}"
        self.prefix = log_dir / f"nginx-{self.port}"
        self.prefix.mkdir(parents=True)
        # nginx's workers run as nobody: the pages go to a directory of their own that they can read (the
        # test's tmp_path is private to its owner).
        self.pages_dir = Path(tempfile.mkdtemp(prefix="nginx-pages-"))
        self.pages_dir.chmod(0o755)
        files = {}
        for i, (path, html) in enumerate((pages or {}).items()):
            files[path] = self.pages_dir / f"page{i}.html"
            files[path].write_text(html)
            files[path].chmod(0o644)
        conf = self.prefix / "nginx.conf"
        conf.write_text(proxy_conf(backends, self.port, self.prefix, files))
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

    def stop(self) -> None:
        super().stop()
        shutil.rmtree(self.pages_dir, ignore_errors=True)

    def error_log(self) -> str:
        path = self.prefix / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def wait_stopped(self, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while self.running and time.monotonic() < deadline:
            time.sleep(0.05)
