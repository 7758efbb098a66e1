"""Helpers shared by the tests that run a sidecar with auth on."""

from __future__ import annotations

import gc
import sys
import time

import jwt


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
