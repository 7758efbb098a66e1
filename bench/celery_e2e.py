"""celery: a task finishes in a real worker -> a client sees `task-succeeded`, at low load.

One WebSocket subscribes to `task:<id>` before the task is sent (the id is chosen here), then the task runs in
a real Celery worker (threads pool). Two latencies per task: from the worker's publish (`ts` of the event) to
the frame read, and from `send_task` to the frame read (broker and worker included).
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

from celery import Celery

from bench.context import Context
from bench.servers import start_sidecar
from bench.wire import BlockingWS, bucket, now_ms, percentiles
from tests.processes import WorkerProcess


def wait_for(ws: BlockingWS, needle: bytes, timeout: float = 10.0) -> tuple[float, dict]:
    while True:
        frames = ws.recv(timeout)
        if not frames:
            raise TimeoutError(f"no {needle!r} within {timeout} s")
        for at, payload in frames:
            if needle in payload:
                return at, json.loads(payload)
            if b'"type":"error"' in payload:
                raise RuntimeError(payload.decode(errors="replace"))


def run(ctx: Context) -> list[dict]:
    records = [measure(ctx, "sidecar", None)]
    if ctx.compare is not None:
        records.append(measure(ctx, f"sidecar@{ctx.compare.name}", ctx.compare))
    return records


def measure(ctx: Context, name: str, tree: Path | None) -> dict:
    tasks, warm = (100, 10) if ctx.quick else (300, 20)
    with ctx.redis("celery") as server:
        # One socket subscribes to every task in turn: lift the per-socket subscribe budget (ws.py).
        sidecar = start_sidecar(server.url, ctx.log_dir, tree, SIDECAR_SUBSCRIBE_BURST=100_000)
        worker = WorkerProcess(server.url, ctx.log_dir)
        app = Celery("bench", broker=server.url)
        ws = BlockingWS("127.0.0.1", sidecar.port)
        relay_hist, total_hist = [0] * 701, [0] * 701
        try:
            for i in range(warm + tasks):
                task_id = str(uuid.uuid4())
                channel = f"task:{task_id}"
                ws.send(json.dumps({"op": "subscribe", "channel": channel, "mode": "event"}).encode())
                wait_for(ws, b'"type":"subscribed"')
                sent = now_ms()
                app.send_task("tasks.jobs.echo", (i,), task_id=task_id)
                at, frame = wait_for(ws, b'"event":"task-succeeded"')
                if i >= warm:
                    relay_hist[bucket(at - frame["ts"])] += 1
                    total_hist[bucket(at - sent)] += 1
                ws.send(json.dumps({"op": "unsubscribe", "channel": channel}).encode())
        finally:
            ws.close()
            worker.stop()
            sidecar.stop()
            app.close()
    p50, p95, p99 = percentiles(relay_hist)
    t50, t95, t99 = percentiles(total_hist)
    record = {
        "scenario": "celery", "server": name, "tasks": tasks, "p50": p50, "p95": p95, "p99": p99,
        "send_to_seen_p50": t50, "send_to_seen_p95": t95, "send_to_seen_p99": t99,
    }  # fmt: skip
    print(f"  celery {name}: task-succeeded publish->seen p50 {p50} p99 {p99} ms; "
          f"send_task->seen p50 {t50} p99 {t99} ms", flush=True)  # fmt: skip
    return record
