"""A Celery task's outcome reaches browsers live: real worker process, real sidecar, real SSE and WebSocket."""

from __future__ import annotations

import uuid

import pytest
from celery import Celery, chain

from tests.clients import SSEClient, WSClient
from tests.processes import FRONTS, EmbeddedRedis, SidecarProcess, WorkerProcess

# One Celery worker for the module (`shared`). The live task over SSE and WS runs on both fronts (the front's part); the
# others exercise the Celery hooks, which no front changes, so they run on the default front only.
BOTH_FRONTS = pytest.mark.parametrize("sidecar_process", FRONTS, indirect=True)


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One Redis and one Celery worker for the module, and one sidecar per front, started when first asked for:
    each test follows tasks of its own (their ids, its own user channel), so none needs a fresh stack. The
    traceback check of `sidecar_process` runs on these sidecars at the module's end."""
    logs = tmp_path_factory.mktemp("task-events")
    server = EmbeddedRedis(logs / "redis").start()
    worker: list[WorkerProcess] = []
    sidecars: dict[str, SidecarProcess] = {}

    def get(front: str) -> SidecarProcess:
        if not worker:
            worker.append(WorkerProcess(server.url, logs))
        if front not in sidecars:
            sidecars[front] = SidecarProcess(server.url, logs, front=front)
        return sidecars[front]

    get.redis = server  # type: ignore[attr-defined]
    yield get
    for proc in [*sidecars.values(), *worker]:
        proc.stop()
    server.stop()
    broken = [p for p in sidecars.values() if "Traceback" in p.log_text()]
    if broken:
        pytest.fail("".join(f"traceback in {p.log_path}:\n{p.log_tail(60)}\n" for p in broken), pytrace=False)


@pytest.fixture
def stack(shared, sidecar_process, request):
    """The module's sidecar on this test's front (`sidecar_process` is taken for its parametrization only)."""
    callspec = getattr(request.node, "callspec", None)
    return shared(callspec.params["sidecar_process"] if callspec else "gevent")


@pytest.fixture
def celery_client(shared):
    """A Celery app that sends tasks to (and reads results from) the module's Redis."""
    client = Celery("tests-client", broker=shared.redis.url, backend=shared.redis.url, set_as_current=False)
    client.conf.update(task_serializer="json", result_serializer="json", accept_content=["json"])
    try:
        yield client
    finally:
        client.close()


def events(frames: list[dict]) -> list[str]:
    return [f["event"] for f in frames if f["type"] == "message"]


@BOTH_FRONTS
def test_a_task_is_seen_live_over_sse_and_websocket_from_start_to_result(stack, celery_client):
    task_id = str(uuid.uuid4())
    channel = f"task:{task_id}"
    sse = SSEClient(stack.url, [channel])
    ws = WSClient(stack.ws_url)
    ws.subscribe(channel)
    sse.wait(lambda f: sse.last_id is not None)
    ws.wait(lambda f: ws.of_type("subscribed"))

    celery_client.send_task("tasks.jobs.report", (7,), {"steps": 3, "delay": 0.05}, task_id=task_id).get(timeout=30)
    for client in (sse, ws):
        client.wait(lambda f: "task-succeeded" in events(f))
        assert events(client.frames) == ["task-started", "task-progress", "task-progress", "task-progress",
                                         "task-succeeded"]  # fmt: skip
        done = client.messages()[-1]
        assert done["diff"]["status"] == "SUCCESS"
        assert done["diff"]["result"] == {"rows": 300, "url": f"/reports/{task_id}.csv"}
        assert done["diff"]["runtime"] > 0
        assert [m["seq"] for m in client.messages()] == [1, 2, 3, 4, 5]
    progress = [m["diff"]["progress"] for m in ws.messages() if m["event"] == "task-progress"]
    assert [p["current"] for p in progress] == [1, 2, 3] and progress[0]["total"] == 3
    sse.close()
    ws.close()


def test_a_failing_task_is_seen_as_failed_with_its_exception_type_and_no_traceback(stack, celery_client):
    task_id = str(uuid.uuid4())
    ws = WSClient(stack.ws_url)
    ws.subscribe(f"task:{task_id}", mode="state")
    ws.wait(lambda f: ws.of_type("subscribed"))
    result = celery_client.send_task("tasks.jobs.fail", ("disk full",), task_id=task_id)
    with pytest.raises(Exception, match="disk full"):
        result.get(timeout=30)
    ws.wait(lambda f: "task-failed" in events(f))
    state = ws.messages()[-1]["state"]
    assert state["status"] == "FAILURE"
    assert state["error"] == {"type": "ValueError", "message": "disk full"}
    assert "Traceback" not in str(ws.frames)
    ws.close()


def test_subscribing_after_the_task_finished_yields_its_outcome_at_once(stack, celery_client):
    task_id = str(uuid.uuid4())
    celery_client.send_task("tasks.jobs.echo", ({"answer": 42},), task_id=task_id).get(timeout=30)
    sse = SSEClient(stack.url, [f"task:{task_id}"])
    snapshot = sse.wait(lambda f: sse.of_type("snapshot"))[0]
    assert snapshot["state"]["status"] == "SUCCESS"
    assert snapshot["state"]["result"] == {"answer": 42}
    sse.close()


def test_business_channel_from_task_options_hears_job_finished(stack, celery_client):
    ws = WSClient(stack.ws_url)
    ws.subscribe("user:99", mode="event")
    ws.wait(lambda f: ws.of_type("subscribed"))
    result = celery_client.send_task("tasks.jobs.report", (99,), {"steps": 1, "delay": 0})
    result.get(timeout=30)
    finished = ws.wait(lambda f: "job-finished" in events(f)) and ws.messages()[-1]
    assert finished["data"]["task_id"] == result.id and finished["data"]["status"] == "SUCCESS"
    ws.close()


def test_a_client_following_a_failed_chain_by_its_returned_id_sees_the_failure(stack, celery_client):
    sig = celery_client.signature
    result = chain(sig("tasks.jobs.fail", ("out of toner",)), sig("tasks.jobs.echo"), app=celery_client).apply_async()
    sse = SSEClient(stack.url, [f"task:{result.id}"], mode="state")  # the id apply_async returned: the last task's

    def failure_seen(frames: list[dict]) -> bool:
        return any(f["type"] in ("snapshot", "message") and (f.get("state") or {}).get("status") == "FAILURE"
                   for f in frames)  # fmt: skip

    frames = sse.wait(failure_seen)
    state = next(f["state"] for f in frames if (f.get("state") or {}).get("status") == "FAILURE")
    assert state["error"] == {"type": "ValueError", "message": "out of toner"}
    assert state["upstream"] == result.parent.id
    sse.close()
    with pytest.raises(ValueError, match="out of toner"):
        result.get(timeout=30)
    result.forget()  # and its parent: unsubscribed now, not when GC finds them after Redis stopped
