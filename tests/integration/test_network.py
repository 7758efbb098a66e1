"""What real networks and careless or hostile clients do to the server, under both entry points (gevent.pywsgi for
`sidecar serve`, gunicorn's gevent worker with sidecar/gunicorn.conf.py): malformed
WebSocket upgrades, resets and oversized heads, tokens in malformed request lines, slow heads and bodies, clients
that answer a close but keep TCP open, SSE clients that leave. Each gets a 4xx where one can be sent, at most one
log line at INFO, never a traceback nor a token in the log, and no descriptor or greenlet left behind.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import struct
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.processes import REPO_ROOT, EmbeddedRedis, ManagedProcess, child_env, free_port
from tests.tokens import forget_earlier_garbage, guarded_sidecar, mint

SECRET = "network-secret-" + "n" * 40
KEY = "publisher-key-network-000"
HEADER_TIMEOUT, BODY_TIMEOUT, IDLE_TIMEOUT, CLOSE_TIMEOUT = 1.0, 1.0, 2.0, 1.0
ENV = {
    "SIDECAR_JWT_SECRET": SECRET, "SIDECAR_PUBLISHER_KEY": KEY, "SIDECAR_HEADER_TIMEOUT": HEADER_TIMEOUT,
    "SIDECAR_BODY_TIMEOUT": BODY_TIMEOUT, "SIDECAR_IDLE_TIMEOUT": IDLE_TIMEOUT, "SIDECAR_CLOSE_TIMEOUT": CLOSE_TIMEOUT,
}  # fmt: skip
SLACK = 1.5  # seconds a cut may come after its deadline on a loaded machine


class GunicornProcess(ManagedProcess):
    """`gunicorn -c sidecar/gunicorn.conf.py` (one gevent worker), shaped like SidecarProcess for these tests."""

    def __init__(self, redis_url: str, log_dir: Path, env: dict[str, object]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        argv = [sys.executable, "-m", "gunicorn", "-c", str(REPO_ROOT / "sidecar" / "gunicorn.conf.py"),
                "--bind", f"127.0.0.1:{self.port}"]  # fmt: skip
        super().__init__("gunicorn", argv, child_env(redis_url, {"SIDECAR_DEV": "1", **env}), log_dir / "g.log")
        self.wait_until("GET /healthz 200", self._healthy, 30)

    def _healthy(self) -> bool:
        try:
            return requests.get(self.url + "/healthz", timeout=1).status_code == 200
        except requests.RequestException:
            return False

    @property
    def worker_pid(self) -> int:
        return int(Path(f"/proc/{self.pid}/task/{self.pid}/children").read_text().split()[0])


@pytest.fixture(scope="module", params=["pywsgi", "gunicorn"])
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """The sidecar under `sidecar serve` (gevent.pywsgi) and under gunicorn. Afterwards: it never died, never logged
    a traceback or an ERROR line, and no secret reached its log."""
    forget_earlier_garbage()
    tmp = tmp_path_factory.mktemp(f"network-{request.param}")
    if request.param == "pywsgi":
        with guarded_sidecar(tmp, ENV, (SECRET, KEY), errors_allowed=False) as (proc, _):
            proc.worker_pid = proc.pid
            yield proc
        return
    redis_server = EmbeddedRedis(tmp / "redis").start()
    try:
        proc = GunicornProcess(redis_server.url, tmp, ENV)
        try:
            yield proc
        finally:
            alive = proc.running
            proc.stop()
        log = proc.log_text()
        assert alive, proc.log_tail(60)
        assert "Traceback" not in log and "ERROR" not in log, proc.log_tail(60)
        assert SECRET not in log and KEY not in log
    finally:
        redis_server.stop()


@pytest.fixture
def sidecar(server) -> Any:
    return server


class LogWatch:
    """What the server logged since the watch began."""

    def __init__(self, proc) -> None:
        self.proc, self.start = proc, len(proc.log_text())

    def lines(self, settle: float = 0.3) -> list[str]:
        time.sleep(settle)
        return self.proc.log_text()[self.start :].splitlines()

    def assert_quiet(self, most: int = 1) -> None:
        """At most `most` lines (one per connection), at INFO or below, and no traceback."""
        lines = self.lines()
        assert len(lines) <= most, lines
        assert not any(level in line for line in lines for level in ("WARNING", "ERROR", "CRITICAL")), lines
        assert not any("Traceback" in line for line in lines), lines


def connect(port: int, timeout: float = 5.0) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    return sock


def exchange(port: int, request: bytes, half_close: bool = False) -> bytes:
    """Send `request`, read the answer until the server closes or has sent a whole head and body."""
    sock = connect(port)
    try:
        sock.sendall(request)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        return read_answer(sock)
    finally:
        sock.close()


def read_answer(sock: socket.socket) -> bytes:
    """One response (head and Content-Length body), or what came before the server closed."""
    data = b""
    while True:
        _, sep, rest = data.partition(b"\r\n\r\n")
        if sep and len(rest) >= int(headers(data).get("content-length", "0")):
            return data
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk


def status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else 0


def headers(answer: bytes) -> dict[str, str]:
    head = answer.partition(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")[1:]
    return {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in head)}


def body(answer: bytes) -> dict:
    return json.loads(answer.partition(b"\r\n\r\n")[2])


def reset(sock: socket.socket) -> None:
    """Close with an RST, as a peer that crashed or a middlebox that gave up."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def upgrade(extra: bytes, key: bytes | None = None) -> bytes:
    key = key if key is not None else b"Sec-WebSocket-Key: " + base64.b64encode(os.urandom(16)) + b"\r\n"
    return b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" + key + extra + b"\r\n"


# -- malformed WebSocket upgrades (RFC 6455 section 4.2.2) ------------------------------------------------------
MALFORMED_UPGRADES = {
    "no key": (upgrade(b"Sec-WebSocket-Version: 13\r\n", key=b""), 400, "bad-handshake"),
    "a key that is not 16 bytes": (
        upgrade(b"Sec-WebSocket-Version: 13\r\n", key=b"Sec-WebSocket-Key: c2hvcnQ=\r\n"), 400, "bad-handshake"),
    "version 8": (upgrade(b"Sec-WebSocket-Version: 8\r\n"), 426, "unsupported-version"),
    "no version": (upgrade(b""), 426, "unsupported-version"),
    "a deflate window that is not a number": (
        upgrade(b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Extensions: permessage-deflate; client_max_window_bits=abc"
                b"\r\n"), 400, "bad-handshake"),
    "a header value HTTP/1.1 does not allow": (
        upgrade(b"Sec-WebSocket-Version: 13\r\nX-Odd: a\x0bb\r\n"), 400, "bad-handshake"),
}  # fmt: skip


@pytest.mark.parametrize("name", MALFORMED_UPGRADES)
def test_a_malformed_websocket_upgrade_gets_a_4xx_without_a_token_and_logs_no_traceback(sidecar, name):
    request, expected, code = MALFORMED_UPGRADES[name]
    log = LogWatch(sidecar)
    answer = exchange(sidecar.port, request)
    assert status(answer) == expected, answer[:300]
    if headers(answer).get("content-type") == "application/json":  # not when gunicorn refuses the head itself
        assert body(answer)["error"] == code
    if expected == 426:
        assert headers(answer)["sec-websocket-version"] == "13"
    log.assert_quiet()


def test_a_plain_get_of_the_websocket_endpoint_gets_the_documented_not_websocket(sidecar):
    answer = requests.get(f"{sidecar.url}/ws", timeout=5)
    assert (answer.status_code, answer.json()["error"]) == (400, "not-websocket")


# -- ordinary network behaviour ---------------------------------------------------------------------------------
def test_a_reset_in_the_middle_of_the_headers_logs_nothing_alarming(sidecar):
    log = LogWatch(sidecar)
    for _ in range(5):
        sock = connect(sidecar.port)
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Half: b")
        time.sleep(0.05)
        reset(sock)
    log.assert_quiet(most=5)
    assert requests.get(f"{sidecar.url}/healthz", timeout=5).status_code == 200


def test_more_than_100_headers_get_431(sidecar):
    log = LogWatch(sidecar)
    many = b"".join(b"X-%d: y\r\n" % i for i in range(120))
    answer = exchange(sidecar.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + many + b"\r\n")
    assert status(answer) == 431
    log.assert_quiet()


def test_a_100_kb_last_event_id_gets_431(sidecar):
    log = LogWatch(sidecar)
    request = b"GET /sse?channel=a HTTP/1.1\r\nHost: x\r\nLast-Event-ID: " + b"1" * 100_000 + b"\r\n\r\n"
    answer = exchange(sidecar.port, request)
    assert status(answer) == 431
    log.assert_quiet()


def test_a_chunked_body_that_ends_early_logs_at_most_one_info_line(sidecar):
    log = LogWatch(sidecar)
    request = (b"POST /publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer wrong-key\r\n"
               b"Transfer-Encoding: chunked\r\n\r\n5\r\n{\"a\":\r\n")  # fmt: skip
    answer = exchange(sidecar.port, request, half_close=True)
    assert status(answer) == 401  # answered before the body was read; the rest never came
    log.assert_quiet()


# -- tokens in the log ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", ["HTTP/9.9", "an unencoded space"])
def test_a_malformed_request_line_never_puts_its_token_in_the_log(sidecar, shape):
    token = mint(SECRET, ["a"])
    target = f"/sse?channel=a&token={token}"
    line = f"GET {target} HTTP/9.9" if shape == "HTTP/9.9" else f"GET {target}&x=a b HTTP/1.1"
    log = LogWatch(sidecar)
    answer = exchange(sidecar.port, line.encode() + b"\r\nHost: x\r\n\r\n")
    assert status(answer) == 400
    lines = log.lines()
    assert not any(token in line or token[-20:] in line for line in lines), lines
    log.assert_quiet()


# -- read deadlines ---------------------------------------------------------------------------------------------
def cut_within(sockets: list[socket.socket], seconds: float) -> list[float]:
    """How long after the call each socket was closed by the server (each must be, within `seconds`)."""
    start, cut = time.monotonic(), []
    for sock in sockets:
        sock.settimeout(max(0.01, start + seconds - time.monotonic()))
        try:
            while sock.recv(65536):
                pass
        except TimeoutError:
            raise AssertionError(f"{len(cut)} of {len(sockets)} sockets were cut within {seconds} s") from None
        except ConnectionResetError:
            pass
        cut.append(time.monotonic() - start)
        sock.close()
    return cut


def test_slow_request_heads_are_cut_at_the_header_deadline_and_the_server_stays_responsive(sidecar):
    silent = [connect(sidecar.port) for _ in range(20)]
    trickling = [connect(sidecar.port) for _ in range(20)]
    for sock in trickling:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
    started = time.monotonic()
    for _ in range(3):  # one header line every 0.3 s: never a whole head
        time.sleep(0.3)
        for sock in trickling:
            sock.sendall(b"X-Slow: 1\r\n")
        took = time.monotonic()
        assert requests.get(f"{sidecar.url}/healthz", timeout=5).status_code == 200
        assert time.monotonic() - took < 1.0
    cut_within(silent + trickling, HEADER_TIMEOUT + SLACK - (time.monotonic() - started))


def test_a_kept_alive_connection_is_closed_after_the_idle_deadline(sidecar):
    sock = connect(sidecar.port)
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status(read_answer(sock)) == 200
    time.sleep(HEADER_TIMEOUT + 0.3)  # past the first request's deadline: a kept-alive one gets the idle time
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status(read_answer(sock)) == 200
    cut_within([sock], IDLE_TIMEOUT + SLACK)


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_slow_bodies_get_408_at_the_body_deadline(sidecar, framing):
    length = b"Content-Length: 100\r\n" if framing == "content-length" else b"Transfer-Encoding: chunked\r\n"
    start = b"{" if framing == "content-length" else b"5\r\n{\"a\":\r\n"
    log = LogWatch(sidecar)
    slow = []
    for _ in range(10):
        sock = connect(sidecar.port)
        sock.sendall(b"POST /publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode() + b"\r\n"
                     + length + b"\r\n" + start)  # fmt: skip
        slow.append(sock)
    started = time.monotonic()
    answers = []
    for sock in slow:
        sock.settimeout(max(0.01, started + BODY_TIMEOUT + SLACK - time.monotonic()))
        data = b""
        try:
            while chunk := sock.recv(65536):
                data += chunk
        except TimeoutError:
            raise AssertionError(f"no answer within {BODY_TIMEOUT + SLACK} s; got {data[:200]!r}") from None
        answers.append(data)
        sock.close()
    assert [status(a) for a in answers] == [408] * 10, answers[0][:300]
    assert body(answers[0])["error"] == "request-timeout"
    log.assert_quiet(most=10)


# -- WebSocket close handshake (RFC 6455 section 5.5.1) --------------------------------------------------------
def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def ws_frame(opcode: int, payload: bytes) -> bytes:
    mask = os.urandom(4)
    assert len(payload) < 126
    return bytes((0x80 | opcode, 0x80 | len(payload))) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def ws_open(port: int, token: str) -> tuple[socket.socket, bytes]:
    sock = connect(port)
    sock.sendall(upgrade(b"Sec-WebSocket-Version: 13\r\nAuthorization: Bearer " + token.encode() + b"\r\n"))
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(4096)
    assert data.startswith(b"HTTP/1.1 101"), data
    return sock, data.partition(b"\r\n\r\n")[2]


def read_close(sock: socket.socket, data: bytes) -> int:
    """Read server frames until its close frame; its code."""
    while True:
        while len(data) < 2 or len(data) < 2 + (data[1] & 0x7F):
            data += sock.recv(4096)
        opcode, size = data[0] & 0x0F, data[1] & 0x7F
        if opcode == 0x8:
            return int.from_bytes(data[2:4], "big")
        data = data[2 + size :]


FD_SLACK = 2  # descriptors the relay may open on its own during a test (a pooled Redis connection)
CLOSE_TRIGGERS = {"not JSON": (ws_frame(0x1, b"not json"), 1007), "binary": (ws_frame(0x2, b"\x00"), 1003)}


@pytest.mark.parametrize(("trigger", "code"), CLOSE_TRIGGERS.values(), ids=CLOSE_TRIGGERS)
@pytest.mark.parametrize("answer", ["answers the close", "stays silent"])
def test_the_server_ends_tcp_after_closing_a_websocket_itself(sidecar, trigger, code, answer):
    token = mint(SECRET, ["*"])
    requests.get(f"{sidecar.url}/healthz", timeout=5)
    baseline = open_fds(sidecar.worker_pid)
    clients = []
    for _ in range(10):
        sock, rest = ws_open(sidecar.port, token)
        sock.sendall(trigger)
        assert read_close(sock, rest) == code
        if answer == "answers the close":
            sock.sendall(ws_frame(0x8, code.to_bytes(2, "big")))  # and keeps its side of TCP open
        clients.append(sock)
    wait = (0.5 if answer == "answers the close" else CLOSE_TIMEOUT) + SLACK
    cut_within(clients, wait)
    # Ten sockets held would be ten descriptors; the relay may open a Redis connection of its own meanwhile.
    deadline = time.monotonic() + 2
    while open_fds(sidecar.worker_pid) > baseline + FD_SLACK and time.monotonic() < deadline:
        time.sleep(0.05)
    assert open_fds(sidecar.worker_pid) <= baseline + FD_SLACK


# -- SSE peers that leave ---------------------------------------------------------------------------------------
def connections(sidecar: Any) -> int:
    return requests.get(f"{sidecar.url}/healthz", timeout=5).json()["connections"]


def test_an_sse_client_that_leaves_stops_counting_at_once_not_at_the_next_keepalive(sidecar):
    token = mint(SECRET, ["gone:*"])
    before = connections(sidecar)
    clients = []
    for i in range(5):
        sock = connect(sidecar.port)
        sock.sendall(f"GET /sse?channel=gone:{i}&token={token} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        data = b""
        while b"event: ready" not in data:
            data += sock.recv(65536)
        clients.append(sock)
    assert connections(sidecar) == before + 5
    for sock in clients[:3]:
        sock.close()
    reset(clients[3])
    deadline = time.monotonic() + 2.0  # the keepalive is 15 s
    while connections(sidecar) > before + 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert connections(sidecar) == before + 1
    clients[4].close()
