"""`python -m bench.fronts_rss`: RSS per idle connection of each front, 1,000 SSE then 1,000 WebSocket (a fresh
sidecar each), held 10 s, with bench/connections.py's hold(). A first look, not the issue's 10,000-connection run
(its WebSocket clients do not offer permessage-deflate).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from bench.connections import hold
from tests.processes import FRONTS, EmbeddedRedis, SidecarProcess

N = 1000
ENV = {"SIDECAR_ADMIT_RATE": "100000", "SIDECAR_ADMIT_BURST": "100000", "SIDECAR_MAX_CONNECTIONS": "100000"}
KINDS = (("sse", "/sse?channel=idle&mode=event", None), ("ws", "/ws", [["idle"]]))
FIELDS = ("server", "connections", "failed", "rss_before_mb", "rss_after_hold_mb", "rss_per_conn_kb", "idle_cpu")


def main() -> None:
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        server = EmbeddedRedis(Path(tmp) / "redis").start()
        try:
            for front in FRONTS:
                for kind, path, channels in KINDS:
                    proc = SidecarProcess(server.url, Path(tmp), ENV, front=front)
                    try:
                        records.append(hold(f"{front}-{kind}", proc.pid, [(kind, N, path, channels)], proc.port, 10))
                    finally:
                        proc.stop()
        finally:
            server.stop()
    for record in records:
        print(json.dumps({k: record[k] for k in FIELDS}))


if __name__ == "__main__":
    main()
