"""What every scenario gets: the run's options, a log directory, a fresh redis-server, and a cleanup stack."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tests.processes import EmbeddedRedis


@dataclass
class Context:
    quick: bool
    log_dir: Path
    compare: Path | None = None  # another checkout whose sidecar runs beside this one (before/after)
    records: list[dict] = field(default_factory=list)

    def seconds(self, full: float, quick: float) -> float:
        return quick if self.quick else full

    @contextlib.contextmanager
    def redis(self, name: str) -> Iterator[EmbeddedRedis]:
        """A redis-server of its own for one scenario (no AOF: the relay is measured, not the disk)."""
        server = EmbeddedRedis(self.log_dir / f"redis-{name}-{time.monotonic_ns()}", appendonly=False).start()
        try:
            yield server
        finally:
            server.stop()


def cores() -> int:
    return os.cpu_count() or 1
