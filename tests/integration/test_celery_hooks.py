"""sidecar.celery_hooks on a real redis-server: the reference app in a real worker, eager runs in-process.

Results are read the way clients see them: the channel's snapshot (its state) and its retained history.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery, chain, chord
from celery.exceptions import TaskRevokedError, TimeLimitExceeded, WorkerLostError

from sidecar.celery_hooks import INFRASTRUCTURE_MESSAGE, enable_realtime, progress, publisher, task_channel
from sidecar.config import Settings
from sidecar.publish import Publisher
from tests.processes import EmbeddedRedis, WorkerProcess

RESULT_TIMEOUT = 20.0
HANG_TIME_LIMIT = 1.0  # tasks.jobs.hang's (not imported: that would make the reference app current here)
STATE_TIMEOUT = 5.0


@dataclass
class Stack:
    client: Celery  # sends tasks to the worker and reads their results
    pub: Publisher  # reads channels
    worker: WorkerProcess

    def run(self, name: str, *args: Any, **kwargs: Any) -> str:
        """Send ``tasks.jobs.<name>``, wait for it to end (its exception re-raised); return its id."""
        result = self.client.send_task(f"tasks.jobs.{name}", args=args, kwargs=kwargs)
        try:
            result.get(timeout=RESULT_TIMEOUT)
        except Exception as exc:
            exc.add_note(f"task id {result.id}")
            exc.task_id = result.id  # type: ignore[attr-defined]
            raise
        finally:
            result.forget()
        return result.id

    def state_when(self, channel: str, done: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        """The channel's state once ``done(state)`` holds (the backend has the result before the channel)."""
        deadline = time.monotonic() + STATE_TIMEOUT
        state: Any = None
        while time.monotonic() < deadline:
            snap = self.pub.snapshot(channel)
            state = snap.state if snap is not None else None
            if isinstance(state, dict) and done(state):
                return state
            time.sleep(0.02)
        raise AssertionError(f"{channel}: state still {state!r} after {STATE_TIMEOUT} s")

    def final_state(self, task_id: str) -> dict[str, Any]:
        terminal = ("SUCCESS", "FAILURE", "REVOKED")
        return self.state_when(task_channel(task_id), lambda s: s.get("status") in terminal)


def make_stack(redis_server: EmbeddedRedis, celery_worker: Callable[..., WorkerProcess], pool: str) -> Iterator[Stack]:
    worker = celery_worker(redis_server.url, pool=pool, concurrency=2 if pool == "prefork" else 4)
    client = Celery("tests-client", broker=redis_server.url, backend=redis_server.url, set_as_current=False)
    client.conf.update(task_serializer="json", result_serializer="json", accept_content=["json"])
    pub = Publisher.from_url(redis_server.url)
    try:
        yield Stack(client, pub, worker)
    finally:
        pub.store.redis.close()
        client.close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One Redis and one worker (threads) for the module's tests that only run tasks and read their channels:
    each follows tasks of its own (their ids, channels no other test here uses), so none needs a fresh worker."""
    logs = tmp_path_factory.mktemp("celery-hooks")
    server = EmbeddedRedis(logs / "redis").start()
    worker: list[WorkerProcess] = []

    def start(url: str, pool: str, concurrency: int) -> WorkerProcess:
        worker.append(WorkerProcess(url, logs, pool=pool, concurrency=concurrency))
        return worker[-1]

    try:
        yield from make_stack(server, start, "threads")
    finally:
        for proc in worker:
            proc.stop()
        server.stop()


@pytest.fixture
def prefork(redis_server: EmbeddedRedis, celery_worker: Callable[..., WorkerProcess]) -> Iterator[Stack]:
    yield from make_stack(redis_server, celery_worker, "prefork")


@pytest.fixture
def pool_stack(
    request: pytest.FixtureRequest, redis_server: EmbeddedRedis, celery_worker: Callable[..., WorkerProcess]
) -> Iterator[Stack]:
    """A stack whose worker runs on the pool the test is parametrized with (``indirect=True``)."""
    yield from make_stack(redis_server, celery_worker, request.param)


def events(pub: Publisher, channel: str) -> list[str]:
    return [m["event"] for m in pub.history(channel)]


# -- the reference app in a real worker ---------------------------------------------------------------------


def test_succeeded_task_channel_keeps_status_result_and_runtime(stack: Stack) -> None:
    task_id = stack.run("echo", {"answer": 42, "tags": ("a", "b")})

    state = stack.final_state(task_id)
    assert state["status"] == "SUCCESS"
    assert state["result"] == {"answer": 42, "tags": ["a", "b"]}
    assert isinstance(state["runtime"], float) and 0 <= state["runtime"] < RESULT_TIMEOUT
    assert state["task_id"] == task_id and state["name"] == "tasks.jobs.echo"
    assert state["started_at"].endswith("+00:00")
    history = stack.pub.history(task_channel(task_id))
    assert [m["event"] for m in history] == ["task-started", "task-succeeded"]
    assert history[-1]["data"]["result"] == state["result"]  # event-mode clients get the result too


def test_progress_task_went_through_progress_steps_before_success(stack: Stack) -> None:
    task_id = stack.run("report", "u1", steps=3, delay=0.01)

    state = stack.final_state(task_id)
    history = stack.pub.history(task_channel(task_id))
    assert [m["event"] for m in history] == ["task-started"] + ["task-progress"] * 3 + ["task-succeeded"]
    assert [m["diff"]["status"] for m in history[1:4]] == ["PROGRESS"] * 3
    assert [m["diff"]["progress"]["current"] for m in history[1:4]] == [1, 2, 3]
    assert history[3]["data"]["progress"] == {"current": 3, "total": 3, "message": "step 3 of 3"}
    assert state["status"] == "SUCCESS"
    assert state["result"] == {"rows": 300, "url": f"/reports/{task_id}.csv"}


def test_failed_task_shows_error_type_and_message_and_no_traceback(stack: Stack) -> None:
    with pytest.raises(ValueError, match="the printer is on fire") as raised:
        stack.run("fail", "the printer is on fire")
    channel = task_channel(raised.value.task_id)  # type: ignore[attr-defined]

    state = stack.state_when(channel, lambda s: s.get("status") == "FAILURE")
    assert state["error"] == {"type": "ValueError", "message": "the printer is on fire"}
    history = stack.pub.history(channel)
    assert [m["event"] for m in history] == ["task-started", "task-failed"]
    assert history[-1]["data"]["error"] == state["error"]
    everything = json.dumps([state, history])
    for trace_mark in ("Traceback", 'File "', "jobs.py", "line "):
        assert trace_mark not in everything


def test_realtime_channels_get_job_finished_on_the_formatted_channel(stack: Stack) -> None:
    by_keyword = stack.run("report", user_id="ann", steps=1, delay=0)
    by_position = stack.run("report", 7, 1, 0)

    for channel, task_id in (("user:ann", by_keyword), ("user:7", by_position)):
        deadline = time.monotonic() + STATE_TIMEOUT
        while not stack.pub.history(channel) and time.monotonic() < deadline:
            time.sleep(0.02)
        [message] = stack.pub.history(channel)
        assert message["event"] == "job-finished"
        assert message["data"] == {
            "task_id": task_id,
            "task": "tasks.jobs.report",
            "status": "SUCCESS",
            "result": {"rows": 100, "url": f"/reports/{task_id}.csv"},
        }


def test_complete_sprint_single_diff_leaves_every_task_completed(stack: Stack) -> None:
    sprint_id = uuid.uuid4().hex[:8]
    stack.run("complete_sprint", sprint_id)

    channel = f"sprint:{sprint_id}"
    state = stack.state_when(channel, lambda s: "completed_date" in s)
    assert set(state["tasks"]) == {"t1", "t2", "t3", "t4"}
    assert {task["status"] for task in state["tasks"].values()} == {"completed"}
    assert all(task["title"] for task in state["tasks"].values())  # the diff touched status only
    history = stack.pub.history(channel)
    assert [m["event"] for m in history] == ["sprint-created", "sprint-completed"]
    assert history[1]["diff"]["tasks"] == {tid: {"status": "completed"} for tid in ("t2", "t3", "t4")}
    assert history[1]["data"]["completed_tasks"] == ["t2", "t3", "t4"]


def test_result_json_cannot_encode_is_published_as_a_summary(stack: Stack) -> None:
    task_id = stack.run("stamp")

    result = stack.final_state(task_id)["result"]
    assert result["type"] == "datetime.datetime"
    assert result["summary"].startswith("datetime.datetime(")


def test_expired_task_is_revoked_with_the_expired_flag(stack: Stack) -> None:
    expired = datetime.now(UTC) - timedelta(minutes=1)
    result = stack.client.send_task("tasks.jobs.echo", args=(1,), expires=expired)
    with pytest.raises(TaskRevokedError):
        result.get(timeout=RESULT_TIMEOUT)
    result.forget()

    state = stack.final_state(result.id)
    assert state["status"] == "REVOKED"
    assert state["expired"] is True and state["terminated"] is False
    assert events(stack.pub, task_channel(result.id)) == ["task-revoked"]


def test_bulk_import_burst_ends_with_every_item_in_the_state(stack: Stack) -> None:
    stack.run("bulk_import", "import:burst", rows=120)

    state = stack.state_when("import:burst", lambda s: s.get("imported") == 120)
    assert len(state["items"]) == 120
    assert len(stack.pub.history("import:burst")) == 120


# -- failures the worker's main process reports (prefork), and tasks that will never run ----------------------


def settled_history(pub: Publisher, channel: str, quiet: float = 1.5) -> list[dict[str, Any]]:
    """The channel's history once nothing was added for ``quiet`` seconds (a duplicate would come late)."""
    history = pub.history(channel)
    deadline = time.monotonic() + RESULT_TIMEOUT
    while time.monotonic() < deadline:
        time.sleep(quiet)
        again = pub.history(channel)
        if again == history:
            return history
        history = again
    raise AssertionError(f"{channel}: history still growing: {history!r}")


@pytest.mark.parametrize("pool_stack", ["prefork", "gevent"], indirect=True)
def test_hard_time_limit_fails_the_task_once_with_its_runtime(pool_stack: Stack) -> None:
    stack = pool_stack
    user = f"u{uuid.uuid4().hex[:6]}"
    with pytest.raises(TimeLimitExceeded) as raised:
        stack.run("hang", user)
    channel = task_channel(raised.value.task_id)  # type: ignore[attr-defined]

    history = settled_history(stack.pub, channel)
    assert [m["event"] for m in history] == ["task-started", "task-failed"]
    failed = history[-1]["diff"]
    assert failed["error"]["type"] == "TimeLimitExceeded"
    assert HANG_TIME_LIMIT - 0.1 <= failed["runtime"] < HANG_TIME_LIMIT + 5  # gevent starts its timer before accepting
    assert stack.pub.snapshot(channel).state["runtime"] == failed["runtime"]
    assert [m["event"] for m in settled_history(stack.pub, f"user:{user}", quiet=0.1)] == ["job-failed"]


def test_lost_prefork_child_fails_the_task_with_its_runtime(prefork: Stack) -> None:
    with pytest.raises(WorkerLostError) as raised:
        prefork.run("die")
    channel = task_channel(raised.value.task_id)  # type: ignore[attr-defined]

    history = settled_history(prefork.pub, channel)
    assert [m["event"] for m in history] == ["task-started", "task-failed"]
    failed = history[-1]["diff"]
    assert failed["error"]["type"] == "WorkerLostError"
    # A duration from the task's start, not a timestamp; the bound is loose: a loaded machine is slow.
    assert isinstance(failed["runtime"], float) and 0 <= failed["runtime"] < 60


def test_a_chain_whose_first_task_fails_fails_the_channels_of_the_rest(stack: Stack) -> None:
    sig = stack.client.signature
    result = chain(
        sig("tasks.jobs.fail", ("no paper",)), sig("tasks.jobs.echo"), sig("tasks.jobs.echo"), app=stack.client
    )
    result = result.apply_async()
    with pytest.raises(ValueError, match="no paper"):
        result.get(timeout=RESULT_TIMEOUT)
    first, second, last = result.parent.parent.id, result.parent.id, result.id

    for task_id in (second, last):  # the client follows the last one: the id apply_async returned
        state = stack.final_state(task_id)
        assert state == {
            "task_id": task_id,
            "name": "tasks.jobs.echo",
            "status": "FAILURE",
            "error": {"type": "ValueError", "message": "no paper"},
            "upstream": first,
        }
        assert events(stack.pub, task_channel(task_id)) == ["task-failed"]
    assert stack.final_state(first)["status"] == "FAILURE"
    result.forget()  # and its parents: unsubscribed now, not when GC finds them after Redis stopped


def test_a_chord_whose_header_task_fails_fails_the_channel_of_its_body(stack: Stack) -> None:
    sig = stack.client.signature
    header = [sig("tasks.jobs.echo", (1,)), sig("tasks.jobs.fail", ("jammed",))]
    result = chord(header, sig("tasks.jobs.echo"), app=stack.client).apply_async()
    with pytest.raises(Exception, match="jammed"):
        result.get(timeout=RESULT_TIMEOUT)

    state = stack.final_state(result.id)
    assert state["status"] == "FAILURE" and state["name"] == "tasks.jobs.echo"
    assert state["error"] == {"type": "ValueError", "message": "jammed"}
    assert stack.final_state(state["upstream"])["error"] == state["error"]  # the header task that failed
    result.forget()


# -- a hung Redis under a real worker ---------------------------------------------------------------------


def test_a_hung_redis_costs_a_task_one_short_deadline_and_publishing_resumes_after_the_cooldown(
    redis_server: EmbeddedRedis, celery_worker: Callable[..., WorkerProcess], tmp_path: Path
) -> None:
    # The broker and result backend live on another Redis: only the sidecar's Redis hangs.
    with EmbeddedRedis(tmp_path / "broker") as broker:
        worker = celery_worker(
            redis_server.url,
            CELERY_BROKER_URL=broker.url,
            CELERY_RESULT_BACKEND=broker.url,
            SIDECAR_TASK_PUBLISH_TIMEOUT="0.25",
            SIDECAR_TASK_PUBLISH_COOLDOWN="1",
        )
        client = Celery("tests-client", broker=broker.url, backend=broker.url, set_as_current=False)
        client.conf.update(task_serializer="json", result_serializer="json", accept_content=["json"])
        stack = Stack(client, Publisher.from_url(redis_server.url), worker)
        try:
            os.kill(redis_server.pid, signal.SIGSTOP)  # hung, not refused: connects, never answers
            try:
                started = time.monotonic()
                hung_id = stack.run("report", "hung", steps=6, delay=0.1)  # 0.6 s of work, 8 publishes
                elapsed = time.monotonic() - started
            finally:
                os.kill(redis_server.pid, signal.SIGCONT)
            time.sleep(1.2)  # the cool-down: the next publish is the trial
            after_id = stack.run("report", "after", steps=1, delay=0)

            assert elapsed < 0.6 + 0.25 + 1.5  # the work, one deadline, and scheduling slack on a busy machine
            assert stack.pub.snapshot(task_channel(hung_id)) is None  # everything of the hung run was dropped
            assert stack.final_state(after_id)["status"] == "SUCCESS"
            log = worker.log_text()
            address = f"redis 127.0.0.1:{redis_server.port}/0"
            assert f"could not publish task-started to {task_channel(hung_id)} via {address}: TimeoutError" in log
            assert log.count(f"dropped task-progress to {task_channel(hung_id)}") == 6
            assert f"dropped task-succeeded to {task_channel(hung_id)}, user:hung" in log
            assert f"{address} answers again; 7 publishes were dropped" in log
        finally:
            stack.pub.close()
            client.close()
            worker.stop()


# -- eager runs in this process (signals, options and failure handling without a worker) ---------------------


@pytest.fixture
def pub(redis_server: EmbeddedRedis) -> Iterator[Publisher]:
    publisher = Publisher.from_url(redis_server.url)
    try:
        yield publisher
    finally:
        publisher.store.redis.close()


@pytest.fixture
def eager_app() -> Iterator[Celery]:
    app = Celery(f"eager-{uuid.uuid4().hex[:6]}", set_as_current=False)
    try:
        yield app
    finally:
        app.close()


def test_realtime_events_false_opts_out_of_lifecycle_but_keeps_business_events(
    eager_app: Celery, pub: Publisher
) -> None:
    @eager_app.task(name="t.quiet", realtime_events=False, realtime_channels=["user:{user}"])
    def quiet(user: str) -> int:
        return 1

    enable_realtime(eager_app, publisher=pub)
    task_id = quiet.apply(("bo",)).id

    assert pub.snapshot(task_channel(task_id)) is None
    assert events(pub, "user:bo") == ["job-finished"]


def test_unformattable_channel_template_is_skipped_with_a_warning(
    eager_app: Celery, pub: Publisher, caplog: pytest.LogCaptureFixture
) -> None:
    @eager_app.task(name="t.routed", realtime_channels=["org:{org_id}", "user:{user_id}", "team:{nope}"])
    def routed(user_id: int, org_id: str = "acme") -> str:
        return "ok"

    enable_realtime(eager_app, publisher=pub)
    with caplog.at_level(logging.WARNING, logger="sidecar.celery_hooks"):
        result = routed.apply(kwargs={"user_id": 5})

    assert result.get() == "ok"
    assert events(pub, "org:acme") == ["job-finished"]  # the default was applied
    assert events(pub, "user:5") == ["job-finished"]
    assert any("team:{nope}" in record.getMessage() for record in caplog.records)


def test_redis_down_never_fails_the_task_and_logs_the_channel(
    eager_app: Celery, free_port: Callable[[], int], caplog: pytest.LogCaptureFixture
) -> None:
    dead = Publisher.from_url(f"redis://127.0.0.1:{free_port()}/0", redis_socket_timeout=0.5)

    @eager_app.task(name="t.steps", realtime_channels=["user:{user_id}"])
    def steps(user_id: int) -> str:
        progress(1, 1)
        return "done"

    enable_realtime(eager_app, publisher=dead)
    try:
        with caplog.at_level(logging.WARNING, logger="sidecar.celery_hooks"):
            result = steps.apply((9,))
    finally:
        dead.store.redis.close()

    assert result.get() == "done"
    messages = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    channel = task_channel(result.id)
    assert any("task-started" in m and channel in m for m in messages)
    assert any("task-progress" in m and channel in m for m in messages)
    assert any("task-succeeded" in m and channel in m and "user:9" in m for m in messages)


def test_infrastructure_error_reaches_clients_without_its_address_but_stays_in_the_log(
    eager_app: Celery, pub: Publisher, free_port: Callable[[], int], caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()

    @eager_app.task(name="t.store")
    def store() -> None:
        with redis.Redis("127.0.0.1", port, socket_connect_timeout=0.5) as dead:
            dead.set("report", "done")  # a real refusal: "Error 111 connecting to 127.0.0.1:<port>. ..."

    enable_realtime(eager_app, publisher=pub)
    with caplog.at_level(logging.INFO):
        task_id = store.apply().id

    state = pub.snapshot(task_channel(task_id)).state
    assert state["error"] == {"type": "ConnectionError", "message": INFRASTRUCTURE_MESSAGE}
    seen_by_clients = json.dumps([state, pub.history(task_channel(task_id))])
    assert str(port) not in seen_by_clients and "127.0.0.1" not in seen_by_clients
    withheld = [r.getMessage() for r in caplog.records if r.name == "sidecar.celery_hooks"]
    assert any(f"127.0.0.1:{port}" in m and task_id in m for m in withheld)  # ops still see it


def test_addresses_urls_and_paths_are_cut_from_error_messages_and_retry_reasons(
    eager_app: Celery, pub: Publisher
) -> None:
    @eager_app.task(name="t.leaky")
    def leaky() -> None:
        raise ValueError("cannot load /srv/app/conf/db.yml for redis://:hunter2@db.internal:6379/0 (10.0.0.7:6380)")

    @eager_app.task(bind=True, name="t.retry_infra", max_retries=1, default_retry_delay=0)
    def retry_infra(self: Any) -> str:
        if not self.request.retries:
            raise self.retry(exc=ConnectionError("no route to [fd00::7]:5432"))
        return "ok"

    @eager_app.task(name="t.plain")
    def plain() -> None:
        raise ValueError("step 3 of 5 at 12:30: 1/2 done, and/or ratio:10 (Retry in 5s)")

    enable_realtime(eager_app, publisher=pub)
    failed = pub.snapshot(task_channel(leaky.apply().id)).state["error"]
    retried = pub.history(task_channel(retry_infra.apply().id))
    untouched = pub.snapshot(task_channel(plain.apply().id)).state["error"]

    assert failed == {"type": "ValueError", "message": "cannot load <path> for <url> (<address>)"}
    assert untouched["message"] == "step 3 of 5 at 12:30: 1/2 done, and/or ratio:10 (Retry in 5s)"
    [reason] = [m["diff"]["reason"] for m in retried if m["event"] == "task-retried"]
    assert reason == f"Retry in 0s: ConnectionError: {INFRASTRUCTURE_MESSAGE}"


def test_a_failed_publish_is_logged_with_the_redis_and_the_channel_but_never_the_password(
    eager_app: Celery, redis_server: EmbeddedRedis, caplog: pytest.LogCaptureFixture
) -> None:
    @eager_app.task(name="t.hushed")
    def hushed() -> str:
        return "ok"

    url = f"redis://:hunter2@127.0.0.1:{redis_server.port}/0"
    enable_realtime(eager_app, settings=Settings(redis_url=url, task_publish_timeout=0.3))
    os.kill(redis_server.pid, signal.SIGSTOP)  # hung, not refused: a timeout's message names no address
    try:
        with caplog.at_level(logging.WARNING, logger="sidecar.celery_hooks"):
            result = hushed.apply()
    finally:
        os.kill(redis_server.pid, signal.SIGCONT)
        publisher(eager_app).close()

    assert result.get() == "ok"
    # Only the hooks' own lines: an earlier test's publisher may still be writing its stats to a Redis now gone.
    hooks = [r for r in caplog.records if r.name == "sidecar.celery_hooks" and r.levelno == logging.WARNING]
    warnings = [record.getMessage() for record in hooks]
    assert warnings and all(f"127.0.0.1:{redis_server.port}/0" in m for m in warnings)
    assert "task-started" in warnings[0] and task_channel(result.id) in warnings[0]
    assert not any("hunter2" in record.getMessage() for record in caplog.records)


def test_enable_realtime_twice_publishes_each_step_once(eager_app: Celery, pub: Publisher) -> None:
    @eager_app.task(name="t.once")
    def once() -> None:
        return None

    enable_realtime(eager_app, publisher=pub)
    enable_realtime(eager_app)
    task_id = once.apply().id

    assert events(pub, task_channel(task_id)) == ["task-started", "task-succeeded"]
    state = pub.snapshot(task_channel(task_id)).state
    assert state["status"] == "SUCCESS"
    assert "result" not in state  # a None result: null in a merge patch deletes the key (RFC 7386)


def test_retried_task_shows_retry_then_starts_afresh(eager_app: Celery, pub: Publisher) -> None:
    @eager_app.task(bind=True, name="t.flaky", max_retries=1, default_retry_delay=0)
    def flaky(self: Any) -> str:
        if not self.request.retries:
            progress(1, 2, "half way")
            raise self.retry(exc=LookupError("row 7 is locked"))
        return "ok"

    enable_realtime(eager_app, publisher=pub)
    task_id = flaky.apply().id

    history = pub.history(task_channel(task_id))
    retried = next(m for m in history if m["event"] == "task-retried")
    assert retried["diff"]["status"] == "RETRY"
    assert retried["diff"]["reason"] == "Retry in 0s: LookupError('row 7 is locked')"
    state = pub.snapshot(task_channel(task_id)).state
    assert state["status"] == "SUCCESS" and state["retries"] == 1
    assert "progress" not in state and "reason" not in state  # the new attempt cleared the old one's


def test_tasks_of_apps_without_enable_realtime_are_left_alone(eager_app: Celery, pub: Publisher) -> None:
    other = Celery("other", set_as_current=False)

    @other.task(name="t.other")
    def untouched() -> int:
        return 1

    enable_realtime(eager_app, publisher=pub)
    try:
        task_id = untouched.apply().id
    finally:
        other.close()

    assert pub.snapshot(task_channel(task_id)) is None


def test_progress_outside_a_task_does_nothing() -> None:
    assert progress(1, 2, "not in a task") is None
