"""Helpers shared by the tests that run a sidecar with auth on (tokens, and the guarded sidecar itself)."""

from __future__ import annotations

import contextlib
import gc
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import jwt

from tests.processes import EmbeddedRedis, SidecarProcess


def mint(key: str, channels: list[str] | str, ttl: float = 3600, **claims: object) -> str:
    """An HS256 token granting `channels`, expiring in `ttl` seconds."""
    return jwt.encode({"exp": int(time.time() + ttl), "channels": channels, **claims}, key, algorithm="HS256")


def forget_earlier_garbage() -> None:
    """Collect what earlier test modules left unclosed now, so that its ResourceWarnings are not reported in the
    middle of this module's tests (Hypothesis and long runs make the collector run at any moment)."""
    hook, sys.unraisablehook = sys.unraisablehook, lambda _: None
    try:
        gc.collect()
    finally:
        sys.unraisablehook = hook


@contextlib.contextmanager
def guarded_sidecar(
    tmp: Path, env: dict[str, object], secrets: tuple[str, ...], errors_allowed: bool = True, front: str = "gevent"
) -> Iterator[tuple[SidecarProcess, EmbeddedRedis]]:
    """A redis-server and a sidecar with auth configured by `env`. Afterwards: it never died, never logged a
    traceback (nor an ERROR line, unless `errors_allowed`), and no secret reached its log."""
    server = EmbeddedRedis(tmp / "redis").start()
    try:
        proc = SidecarProcess(server.url, tmp, env, front=front)
        try:
            yield proc, server
        finally:
            alive = proc.running
            proc.stop()
        log = proc.log_text()
        assert alive, f"the sidecar died:\n{proc.log_tail(60)}"
        assert "Traceback" not in log, proc.log_tail(80)
        assert errors_allowed or " ERROR " not in log, proc.log_tail(20)  # client input is no server error
        for secret in secrets:
            assert secret not in log
    finally:
        server.stop()
