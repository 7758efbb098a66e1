"""Celery integration: every task's lifecycle goes to its channel ``task:<task_id>`` in one line.

Example::

    from celery import Celery
    from sidecar.celery_hooks import enable_realtime

    app = Celery("proj", broker="redis://...")
    enable_realtime(app)

    @app.task(realtime_channels=["user:{user_id}"])
    def report(user_id, steps=5):
        for i in range(steps):
            progress(i + 1, steps, "crunching")
        return {"rows": 42}

Each lifecycle step is a *diff* of the task channel's state (RFC 7386 merge patch), so the channel keeps the
task's state and a client that subscribes after the end still learns the outcome. The event ``data`` carries
the same fields, so event-mode clients get them too. Publishing never fails a task: a Redis error is logged
as a warning naming the channel and the Redis, and the task goes on; a hung Redis costs a task one short
deadline, then nothing while a circuit breaker is open. Clients never see infrastructure errors' messages.

This is the only module of the package that imports celery (docs/celery.md has the event shapes).
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import re
import reprlib
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from celery import Celery, current_task, signals

from sidecar.config import Settings
from sidecar.core.breaker import CLOSED, Breaker
from sidecar.core.protocol import validate_channel
from sidecar.publish import Published, Publisher, PublishError
from sidecar.store import PublishNotConfirmed, redis_address

__all__ = ["INFRASTRUCTURE_MESSAGE", "enable_realtime", "progress", "publisher", "task_channel"]

log = logging.getLogger(__name__)

RESULT_MAX_BYTES = 16 * 1024  # a larger result is published as a summary; the backend still has it whole
SUMMARY_MAX_CHARS = 200
MESSAGE_MAX_CHARS = 1_000
# What clients see instead of an infrastructure error's message (docs/celery.md, "What reaches clients").
INFRASTRUCTURE_MESSAGE = "withheld: an infrastructure error (the worker log has it)"
# Exceptions of these packages (and every OSError) are infrastructure errors: their messages name hosts,
# ports, connection strings and paths, so they never reach clients.
INFRASTRUCTURE_PACKAGES = frozenset({
    "redis", "kombu", "amqp", "socket", "ssl", "urllib3", "requests", "httpx", "psycopg", "psycopg2",
    "pymysql", "MySQLdb", "sqlalchemy", "pymongo", "botocore",
})  # fmt: skip
# Cut from every other error message and retry reason: connection strings and URLs, IP addresses with their
# ports, host.domain:port and localhost:port, absolute paths of two parts or more.
_REDACTED = re.compile(
    r"(?P<url>\b[A-Za-z][A-Za-z0-9+.-]*://\S+)"
    r"|(?P<address>\[[0-9A-Fa-f:.]+\](?::\d+)?|\b\d{1,3}(?:\.\d{1,3}){3}(?::\d+)?\b"
    r"|\b(?:localhost|[\w-]+(?:\.[\w-]+)+):\d+\b)"
    r"|(?P<path>(?<![\w.~])(?:/[\w.@-]+){2,}/?)"
)

# Task options (``@app.task(realtime_channels=[...], realtime_events=False)``); Celery turns unknown task
# options into attributes of the task class, which is where we read them.
OPT_CHANNELS = "realtime_channels"
OPT_EVENTS = "realtime_events"


def task_channel(task_id: str) -> str:
    """The channel that keeps a task's state: ``task:<task_id>``."""
    return f"task:{task_id}"


# -- per-app configuration and the per-process publisher ---------------------------------------------------


class _Binding:
    """How one app's tasks reach Redis. The Publisher is made on first use and again in a forked child.

    Publishing from tasks has a deadline (``task_publish_timeout``, the made Publisher's socket timeout) and a
    circuit breaker: after a failure, nothing is sent for ``task_publish_cooldown`` seconds, then one trial.
    A hung Redis thus costs a task one deadline, then nothing while the breaker is open."""

    def __init__(self, app: Celery, publisher: Publisher | None, settings: Settings | None) -> None:
        self._app = weakref.ref(app)
        self._given = publisher
        self._settings = settings
        self._pid = 0
        self._forked()

    def _forked(self) -> None:
        # Prefork imports the app in the parent and forks afterwards: a child must neither share the
        # parent's sockets nor wait on a lock some parent thread held at fork time. It starts closed.
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._publisher: Publisher | None = None
        self._breaker: Breaker | None = None

    def publisher(self) -> Publisher:
        lock = self._here()
        if self._given is not None:
            return self._given  # the caller's own: redis-py's pool already resets itself after a fork
        with lock:
            if self._publisher is None:
                settings = self._resolve_settings()
                # An outcome's WAIT blocks its reply up to its own timeout: the deadline is on top of it.
                waits = settings.publish_wait_timeout_ms / 1000 if settings.publish_wait_replicas > 0 else 0.0
                self._publisher = Publisher.from_settings(
                    settings.replace(redis_socket_timeout=settings.task_publish_timeout + waits)
                )
            return self._publisher

    def allow(self) -> bool:
        """May a publish go to Redis now (the breaker is closed, or this is its trial)?"""
        with self._here():
            return self._breaker_now().allow(time.monotonic())

    def failed(self) -> float:
        """A publish found Redis away: open the breaker; returns the cool-down."""
        with self._here():
            breaker = self._breaker_now()
            breaker.failed(time.monotonic())
            return breaker.cooldown

    def succeeded(self, pub: Publisher) -> None:
        with self._here():
            breaker = self._breaker_now()
            was_open = breaker.state != CLOSED
            dropped = breaker.succeeded()
        if was_open:
            log.warning(
                "sidecar: %s answers again; %d publishes were dropped while it did not",
                redis_address(pub.store.redis), dropped,
            )

    def retry_in(self) -> float:
        with self._here():
            return self._breaker_now().retry_in(time.monotonic())

    def _here(self) -> threading.Lock:
        """This process's lock (a forked child starts afresh)."""
        if self._pid != os.getpid():
            self._forked()
        return self._lock

    def _breaker_now(self) -> Breaker:  # under the lock
        if self._breaker is None:
            self._breaker = Breaker(self._resolve_settings().task_publish_cooldown)
        return self._breaker

    def _resolve_settings(self) -> Settings:
        settings = self._settings or Settings.from_env()
        if not settings.redis_url:
            # Workers often have only the broker's URL: publish there when it is a Redis.
            app = self._app()
            broker = str(app.conf.broker_url or "") if app is not None else ""
            if broker.startswith(("redis://", "rediss://", "unix://")):
                settings = settings.replace(redis_url=broker)
        return settings


_bindings: weakref.WeakKeyDictionary[Celery, _Binding] = weakref.WeakKeyDictionary()
_default_app: weakref.ref[Celery] | None = None


def enable_realtime(
    app: Celery,
    *,
    publisher: Publisher | None = None,
    settings: Settings | None = None,
) -> None:
    """Publish the lifecycle of ``app``'s tasks to their ``task:<id>`` channels, and route their results.

    ``publisher``: use this one (else one is made per process from ``settings``, else from
    ``Settings.from_env()``, else from the app's broker URL if it is a Redis). Calling it again is harmless;
    a second call with a ``publisher`` or ``settings`` replaces the first one's.
    """
    global _default_app
    app = _unproxy(app)
    if app not in _bindings or publisher is not None or settings is not None:
        _bindings[app] = _Binding(app, publisher, settings)
    _default_app = weakref.ref(app)
    _connect_signals()


def publisher(app: Celery | None = None) -> Publisher:
    """This process's Publisher, for business events and diffs from inside tasks.

    Example::

        @app.task
        def close_ticket(ticket_id):
            publisher().diff(f"ticket:{ticket_id}", "ticket-closed", {"status": "closed"})
    """
    binding = _binding_of(app) if app is not None else _current_binding()
    if binding is None:
        raise RuntimeError("sidecar: enable_realtime(app) has not been called in this process")
    return binding.publisher()


def progress(current: float, total: float | None = None, message: str | None = None) -> Published | None:
    """Publish the running task's progress to its channel: ``task-progress``, status ``PROGRESS``.

    Call it from inside a task; anywhere else it does nothing and returns None. A publishing error is
    logged, never raised. Example::

        for i, row in enumerate(rows, 1):
            handle(row)
            progress(i, len(rows), f"row {row.id}")
    """
    task: Any = current_task._get_current_object() if current_task else None
    task_id = getattr(getattr(task, "request", None), "id", None)
    if task is None or not task_id:
        log.debug("sidecar: progress() outside a task is ignored")
        return None
    binding = _binding_of(task.app) or _current_binding()
    if binding is None:
        log.warning("sidecar: progress() in %s, but enable_realtime(app) was not called", task.name)
        return None
    # Without a message we still send the key: null deletes the previous step's message (RFC 7386).
    step = {"current": current, "total": total, "message": message}
    changes = {"status": "PROGRESS", "progress": step}
    data = {"status": "PROGRESS", "progress": {k: v for k, v in step.items() if v is not None}}
    return _publish(binding, "task-progress", [(task_channel(task_id), "task-progress", changes, data)])


# -- signal handlers ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Run:
    started: float  # time.monotonic() at prerun
    args: tuple[Any, ...]
    kwargs: dict[str, Any]


_runs: dict[str, _Run] = {}  # task id -> its run, from prerun to postrun (threads pool: dict ops are atomic)
# Task id -> the worker's Request, from task_received while Celery holds it. A prefork worker's main process
# reports hard time limits and lost children itself: it never saw task_prerun, but its Request knows when the
# pool accepted the task, and carries the task's context (retries, chain, chord).
_received: weakref.WeakValueDictionary[str, Any] = weakref.WeakValueDictionary()
# (task id, attempt) of the outcomes published lately: Celery fires task_failure twice for a hard time limit on
# prefork (on_timeout, then again when the killed child is reaped), both in the worker's main process.
_outcomes: OrderedDict[tuple[str, int], None] = OrderedDict()
_outcomes_lock = threading.Lock()
OUTCOMES_KEPT = 10_000
_connected = False
_connect_lock = threading.Lock()


def _connect_signals() -> None:
    global _connected
    with _connect_lock:
        if _connected:
            return
        # Strong references: the handlers are module functions; dispatch_uid makes a reconnect a no-op.
        for signal, handler in (
            (signals.task_received, _on_received),
            (signals.task_prerun, _on_prerun),
            (signals.task_postrun, _on_postrun),
            (signals.task_success, _on_success),
            (signals.task_failure, _on_failure),
            (signals.task_retry, _on_retry),
            (signals.task_revoked, _on_revoked),
        ):
            signal.connect(handler, weak=False, dispatch_uid=f"sidecar.celery_hooks.{handler.__name__}")
        _connected = True


def _on_received(sender: Any = None, request: Any = None, **_: Any) -> None:
    task_id = getattr(request, "id", None)
    if task_id:
        _received[task_id] = request


def _on_prerun(
    sender: Any = None,
    task_id: str | None = None,
    args: Any = None,
    kwargs: Any = None,
    **_: Any,
) -> None:
    binding = _binding_of_task(sender)
    if binding is None or not task_id:
        return
    _runs[task_id] = _Run(time.monotonic(), tuple(args or ()), dict(kwargs or {}))
    if not _lifecycle(sender):
        return
    changes: dict[str, Any] = {
        "task_id": task_id,
        "name": sender.name,
        "status": "STARTED",
        "started_at": datetime.now(UTC).isoformat(timespec="milliseconds"),
    }
    data = dict(changes)
    retries = getattr(sender.request, "retries", 0) or 0
    if retries:
        data["retries"] = changes["retries"] = retries
        # A new attempt: drop what the previous one left in the state (null deletes, RFC 7386).
        changes.update(progress=None, reason=None)
    _publish(binding, "task-started", [(task_channel(task_id), "task-started", changes, data)])


def _on_postrun(sender: Any = None, task_id: str | None = None, **_: Any) -> None:
    if task_id:
        _runs.pop(task_id, None)


def _on_success(sender: Any = None, result: Any = None, **_: Any) -> None:
    binding = _binding_of_task(sender)
    task_id = getattr(sender.request, "id", None) if binding is not None else None
    if binding is None or not task_id:
        return
    _finished(binding, sender, task_id, _request_args(sender), "SUCCESS", "result", _encode_result(result))


def _on_failure(
    sender: Any = None, task_id: str | None = None, exception: BaseException | None = None,
    args: Any = None, kwargs: Any = None, **_: Any,
) -> None:  # fmt: skip
    binding = _binding_of_task(sender)
    if binding is None or not task_id:
        return
    # Type and message only: a traceback names files and locals, which browsers must never see.
    error = _describe_error(exception, f"{sender.name}[{task_id}]")
    _finished(binding, sender, task_id, (tuple(args or ()), dict(kwargs or {})), "FAILURE", "error", error)


def _finished(
    binding: _Binding, task: Any, task_id: str, call: tuple[tuple[Any, ...], dict[str, Any]],
    status: str, field: str, value: Any,
) -> None:  # fmt: skip
    """A run's end: the lifecycle diff, and the job event on the task's business channels; on failure also
    the tasks that will now never run. `call` is the arguments to format the business channels with when
    prerun did not record them."""
    context = _context(task, task_id)
    if not _first_outcome(task_id, context):
        log.debug("sidecar: %s[%s]: outcome already published for this attempt", task.name, task_id)
        return
    run = _runs.get(task_id)
    if run is not None:
        call = (run.args, run.kwargs)
    changes = {"task_id": task_id, "name": task.name, "status": status, field: value, "runtime": _runtime(task_id)}
    job = {"task_id": task_id, "task": task.name, "status": status, field: value}
    name, job_event = ("task-succeeded", "job-finished") if status == "SUCCESS" else ("task-failed", "job-failed")
    diffs = [(task_channel(task_id), name, changes)] if _lifecycle(task) else []
    if status == "FAILURE":
        for never_id, never_name in _never_run(context):
            if _lifecycle(task.app.tasks.get(never_name)) and _first_outcome(never_id, None):
                patch = {"task_id": never_id, "name": never_name, "status": status, "error": value}
                diffs.append((task_channel(never_id), name, {**patch, "upstream": task_id}))
    events = [(channel, job_event, job) for channel in _business_channels(task, task_id, *call)]
    _publish(binding, name, diffs, events, outcome=True)


def _on_retry(sender: Any = None, request: Any = None, reason: Any = None, **_: Any) -> None:
    binding = _binding_of_task(sender)
    task_id = getattr(request, "id", None)
    if binding is None or not task_id or not _lifecycle(sender) or not _first_outcome(task_id, request):
        return
    changes = {
        "task_id": task_id,
        "name": sender.name,
        "status": "RETRY",
        "reason": _truncate(_describe_reason(reason, f"{sender.name}[{task_id}]"), MESSAGE_MAX_CHARS),
        "retries": (getattr(request, "retries", 0) or 0) + 1,  # the attempt about to be scheduled
    }
    _publish(binding, "task-retried", [(task_channel(task_id), "task-retried", changes)])


def _on_revoked(
    sender: Any = None, request: Any = None, terminated: bool = False, expired: bool = False, **_: Any
) -> None:
    binding = _binding_of_task(sender)
    task_id = getattr(request, "id", None)
    if task_id:
        _runs.pop(task_id, None)
    if binding is None or not task_id or not _lifecycle(sender):
        return
    if not _first_outcome(task_id, getattr(request, "_context", request)):
        return
    changes = {
        "task_id": task_id,
        "name": sender.name,
        "status": "REVOKED",
        "terminated": bool(terminated),
        "expired": bool(expired),
    }
    _publish(binding, "task-revoked", [(task_channel(task_id), "task-revoked", changes)])


# -- helpers -------------------------------------------------------------------------------------------


Diff = tuple[str, str, Mapping[str, Any]] | tuple[str, str, Mapping[str, Any], Any]  # channel, event, changes[, data]


def _publish(
    binding: _Binding, name: str, diffs: Sequence[Diff], events: Sequence[tuple[str, str, Any]] = (),
    outcome: bool = False,
) -> Published | None:  # fmt: skip
    """Lifecycle diffs (data: the changes, unless given) and business events in one round trip; returns the
    first diff's position. A failure is logged, never raised. An `outcome` (succeeded, failed) waits for
    ``publish_wait_replicas`` replicas when that is set (a shortfall is logged by the store, not raised)."""
    channels = ", ".join([diff[0] for diff in diffs] + [ch for ch, _, _ in events])
    if not channels:
        return None
    try:
        pub = binding.publisher()
        batch = pub.batch(wait=pub.store.settings.publish_wait_replicas if outcome else 0)
        for channel, event, changes, *data in diffs:
            batch.diff(channel, event, changes, data=data[0] if data else changes)
        for ch, event, payload in events:
            batch.event(ch, event, data=payload)
    except Exception as exc:  # a bad channel name, no Redis URL: nothing to send, Redis is not in question
        log.warning("sidecar: could not publish %s to %s: %s", name, channels, _explain(exc))
        return None
    if not binding.allow():
        log.warning(
            "sidecar: dropped %s to %s: %s did not answer; next try in %.1f s",
            name, channels, redis_address(pub.store.redis), binding.retry_in(),
        )  # fmt: skip
        return None
    try:
        results = batch.send()
    except PublishError as exc:  # refused by Redis (a state too large): Redis answered
        binding.succeeded(pub)
        log.warning(
            "sidecar: could not publish %s to %s via %s: %s",
            name, channels, redis_address(pub.store.redis), _explain(exc),
        )
        return None
    except Exception as exc:  # Redis away (refused, timed out) or erring: the user's task must go on
        cooldown = binding.failed()
        log.warning(
            "sidecar: could not publish %s to %s via %s: %s; not publishing for %g s",
            name, channels, redis_address(pub.store.redis), _explain(exc), cooldown,
        )  # fmt: skip
        return None
    binding.succeeded(pub)
    return results[0] if diffs else None


def _explain(exc: BaseException) -> str:
    # redis-py 8's repr() of its errors is only "network:TimeoutError": name the class and say the message. A
    # batch the store could not confirm is named by what cut it (its message says which channels it left unsure).
    kind = type(exc.__cause__ if isinstance(exc, PublishNotConfirmed) and exc.__cause__ else exc).__name__
    text = _safe_str(exc)
    return f"{kind}: {text}" if text else kind


def _business_channels(task: Any, task_id: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[str]:
    """The task's ``realtime_channels`` templates formatted with its call arguments; bad ones are skipped."""
    templates = getattr(task, OPT_CHANNELS, None) or ()
    if isinstance(templates, str):
        templates = (templates,)
    if not templates:
        return []
    values = _call_arguments(task, args, kwargs)
    values.setdefault("task_id", task_id)
    channels = []
    for template in templates:
        try:
            channel = validate_channel(str(template).format(**values))
        except (KeyError, IndexError, AttributeError, ValueError) as exc:
            log.warning("sidecar: task %s: skipping realtime channel %r: %r", task.name, template, exc)
            continue
        channels.append(channel)
    return channels


def _call_arguments(task: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The call's arguments by parameter name, defaults applied; ``**kwargs`` are spread in."""
    try:
        bound = inspect.signature(task.run).bind_partial(*args, **kwargs)
    except (TypeError, ValueError):
        return dict(kwargs)  # a call that does not fit the signature: the named ones are all we know
    bound.apply_defaults()
    values: dict[str, Any] = {}
    for name, param in bound.signature.parameters.items():
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            values.update(bound.arguments.get(name, {}))
        elif name in bound.arguments:
            values[name] = bound.arguments[name]
    return values


def _request_args(task: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    request = getattr(task, "request", None)
    return tuple(getattr(request, "args", None) or ()), dict(getattr(request, "kwargs", None) or {})


def _encode_result(result: Any) -> Any:
    """The result as plain JSON if ``json.dumps`` takes it and it is small, else ``{"type", "summary"}``."""
    try:
        text = json.dumps(result, allow_nan=False, ensure_ascii=False, separators=(",", ":"))
    except (TypeError, ValueError, OverflowError, RecursionError):
        return _summary(result)
    if len(text.encode()) > RESULT_MAX_BYTES:
        return _summary(result)
    # Round-trip, so what we publish holds only JSON types (tuples become lists, int keys become strings).
    return json.loads(text)


_repr = reprlib.Repr()
_repr.maxstring = _repr.maxother = SUMMARY_MAX_CHARS


def _summary(value: Any) -> dict[str, str]:
    kind = type(value)
    name = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
    try:
        text = _repr.repr(value)
    except Exception:
        text = f"<{name}>"
    return {"type": name, "summary": _truncate(text, SUMMARY_MAX_CHARS)}


def _describe_error(exc: BaseException | None, task: str = "") -> dict[str, str]:
    """What clients see of an exception: its class name and its message, the message withheld for
    infrastructure errors (and logged here for ``task``) and cut of addresses and paths otherwise."""
    # Celery wraps exceptions it cannot pickle; the wrapper remembers the original class name.
    name = str(getattr(exc, "exc_cls_name", None) or type(exc).__name__)
    if _is_infrastructure(exc):
        # Celery logs the failure too, but redis-py 8's repr() of its errors says no more than the class.
        if task:
            log.info("sidecar: %s: withheld from clients: %s: %s", task, name, _safe_str(exc))
        message = INFRASTRUCTURE_MESSAGE
    else:
        message = _redact(_safe_str(exc))
    return {"type": name, "message": _truncate(message, MESSAGE_MAX_CHARS)}


def _describe_reason(reason: Any, task: str) -> str:
    """Celery's retry reason (``Retry in 5s: ConnectionError('db gone')``), redacted like error messages."""
    if reason is None:
        return ""
    exc = getattr(reason, "exc", None)
    humanize = getattr(reason, "humanize", None)
    if exc is not None and callable(humanize) and not getattr(reason, "message", None) and _is_infrastructure(exc):
        return f"Retry {humanize()}: {_describe_error(exc, task)['type']}: {INFRASTRUCTURE_MESSAGE}"
    return _redact(_safe_str(reason))


def _is_infrastructure(exc: BaseException | None) -> bool:
    if isinstance(exc, OSError):  # socket errors, builtin ConnectionError and TimeoutError, files
        return True
    modules = [getattr(exc, "exc_module", None)] + [kind.__module__ for kind in type(exc).__mro__]
    return any(str(module).partition(".")[0] in INFRASTRUCTURE_PACKAGES for module in modules if module)


def _redact(text: str) -> str:
    return _REDACTED.sub(lambda match: f"<{match.lastgroup}>", text)


def _safe_str(value: Any) -> str:
    try:
        return str(value)
    except Exception:
        return f"<unprintable {type(value).__name__}>"


def _truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _runtime(task_id: str) -> float | None:
    """Seconds from task_prerun to now; where prerun ran in another process (prefork's main process reports
    time limits and lost children), from when the pool accepted the task (Celery's wall-clock time_start)."""
    run = _runs.get(task_id)
    if run is not None:
        return round(time.monotonic() - run.started, 6)
    started = getattr(_received.get(task_id), "time_start", None)
    return round(max(0.0, time.time() - started), 6) if started else None


def _context(task: Any, task_id: str) -> Any:
    """The request context of the task's run: the task's own (in the process that runs it, or pushed there
    by Celery), else the one of the Request this process received (a prefork worker's main process)."""
    request = getattr(task, "request", None)
    if getattr(request, "id", None) == task_id:
        return request
    received = _received.get(task_id)
    return getattr(received, "_context", None) if received is not None else None


def _first_outcome(task_id: str, context: Any) -> bool:
    """True the first time an outcome of this attempt of the task is reported in this process."""
    key = (task_id, getattr(context, "retries", 0) or 0)
    with _outcomes_lock:
        if key in _outcomes:
            return False
        _outcomes[key] = None
        if len(_outcomes) > OUTCOMES_KEPT:
            _outcomes.popitem(last=False)
        return True


def _never_run(context: Any) -> list[tuple[str, str]]:
    """(id, name) of the tasks that will never run now that this one failed: the rest of its chain, and the
    body of the chord it is a header task of. Walks them as Celery's backend does when it marks them FAILURE
    (``Backend._fail_chain``): a chord in the chain stands for its body too."""
    pending = list(getattr(context, "chain", None) or ())
    body = getattr(context, "chord", None)
    if body:
        pending.append(body)
    tasks = []
    while pending:
        sig = pending.pop()
        if not isinstance(sig, Mapping):
            continue
        task_id = (sig.get("options") or {}).get("task_id")
        if task_id and sig.get("task"):
            tasks.append((str(task_id), str(sig["task"])))
        if sig.get("subtask_type") == "chord":
            body = (sig.get("kwargs") or {}).get("body")
            if body:
                pending.append(body)
    return tasks


def _lifecycle(task: Any) -> bool:  # None (a task this process does not know): the default, on
    return getattr(task, OPT_EVENTS, True) is not False


def _unproxy(obj: Any) -> Any:
    # current_app and shared tasks' apps are celery.local.Proxy objects: key the registry by the real app.
    getter = getattr(obj, "_get_current_object", None)
    return getter() if callable(getter) else obj


def _binding_of(app: Any) -> _Binding | None:
    if app is None:
        return None
    try:
        return _bindings.get(_unproxy(app))
    except TypeError:  # not weak-referenceable: not an app of ours
        return None


def _binding_of_task(task: Any) -> _Binding | None:
    """The binding of the task's app, or None: tasks of apps without enable_realtime() are left alone."""
    return _binding_of(getattr(task, "app", None)) if task is not None else None


def _current_binding() -> _Binding | None:
    task = current_task._get_current_object() if current_task else None
    binding = _binding_of_task(task)
    if binding is None and _default_app is not None:
        binding = _binding_of(_default_app())
    return binding
