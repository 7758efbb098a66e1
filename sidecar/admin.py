"""The admin API: read and change the throttle policy of every replica at once (docs/operations.md), and read
who changed it (the policy-change log, docs/dashboard.md "Policy changes").

Every route needs an admin key (`Authorization: Bearer <key>` of SIDECAR_ADMIN_KEY or SIDECAR_ADMIN_KEYS; open
in dev mode without one). Each PUT and DELETE is logged with the key's name, never the key.

Example::

    curl -X PUT -H "Authorization: Bearer $KEY" localhost:8000/admin/throttle \\
         -d '{"channels": {"sprint:*": {"poke_rate": 200, "poke_floor": 1}}}'
    curl -H "Authorization: Bearer $KEY" 'localhost:8000/admin/throttle/log?n=10'
"""

from __future__ import annotations

import logging
from dataclasses import fields

import orjson
import redis
from flask import Blueprint, Response, current_app, g, request

from sidecar.app import error, read_body, too_large
from sidecar.auth import bearer
from sidecar.core.throttle import LIMITS, ChannelPolicy, Policy, PolicyError

log = logging.getLogger(__name__)
admin = Blueprint("admin", __name__, url_prefix="/admin")

LOG_MAX = 1000  # GET /admin/throttle/log?n= at most (the stream keeps about as many)
WHAT_MAX = 200  # characters of a change's summary
UNITS = {"window": " s", "poke_rate": "/s", "poke_floor": " s", "admit_rate": "/s", "queue_bytes": " B",
         "stuck_timeout": " s"}  # fmt: skip


@admin.before_request
def require_admin() -> None:
    g.admin = current_app.extensions["auth"].require_admin(bearer(request.headers.get("Authorization")))


def _describe() -> Response:
    control = current_app.extensions["relay"].control
    return Response(orjson.dumps(control.describe()), mimetype="application/json")


@admin.get("/throttle")
def get_throttle() -> Response:
    """The policy in force on this replica, where it comes from ("settings" or "redis"), and its version."""
    return _describe()


@admin.put("/throttle")
def put_throttle() -> Response:
    """Replace the policy: what the document leaves out takes the settings' value. Every replica applies it
    within a second."""
    data = read_body()
    if data is None:
        return too_large()
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError:
        return error(400, "bad-json", "the body must be a JSON policy document")
    if not isinstance(doc, dict):  # None would mean "back to the settings": that is DELETE, never a refusal
        return error(400, "bad-policy", "the policy is a JSON object (DELETE /admin/throttle restores the settings')")
    control = current_app.extensions["relay"].control
    before = control.throttle.policy
    try:
        policy = control.put_policy(doc)
    except PolicyError as exc:
        return error(400, "bad-policy", str(exc))
    _log_change(before, policy, orjson.dumps(policy.to_json()))
    return _describe()


@admin.delete("/throttle")
def reset_throttle() -> Response:
    """Back to the settings' policy, on every replica."""
    control = current_app.extensions["relay"].control
    before = control.throttle.policy
    _log_change(before, control.put_policy(None), None)
    return _describe()


@admin.get("/throttle/log")
def throttle_log() -> Response:
    """The last `n` (1-1000, default 50) policy changes, newest first."""
    raw = request.args.get("n", "50")
    n = int(raw) if raw.isascii() and raw.isdigit() and len(raw) <= 4 else 0
    if not 1 <= n <= LOG_MAX:
        return error(400, "bad-request", f"n must be an integer from 1 to {LOG_MAX}")
    changes = []
    for stream_id, entry in current_app.extensions["relay"].store.read_policy_log(n):
        try:
            at = float(entry.get("at", ""))
            policy = orjson.loads(entry["policy"]) if entry.get("policy") else None
        except (ValueError, orjson.JSONDecodeError):
            continue  # not written by us
        changes.append({"id": stream_id, "at": at, "who": entry.get("who", ""), "what": entry.get("what", ""),
                        "policy": policy})  # fmt: skip
    return Response(orjson.dumps({"changes": changes}), mimetype="application/json")


def _log_change(before: Policy, after: Policy, stored: bytes | None) -> None:
    """The change is made: log it (a log Redis refuses leaves the change standing, with a warning)."""
    control = current_app.extensions["relay"].control
    what = describe_change(before, after)
    if stored is None:
        what = f"back to the settings' policy: {what}"[:WHAT_MAX]
    try:
        control.store.log_policy_change(control.updated, g.admin, what, stored)
    except redis.RedisError as exc:
        log.warning("throttle: the policy change was applied but not logged (%s)", type(exc).__name__)


def describe_change(before: Policy, after: Policy) -> str:
    """A short human summary of what changed, e.g. ``orders:* window 0 -> 0.5 s; admit_rate 0 -> 200/s``.

    A pattern added is compared with what its channels got before (the pattern that matched it), a pattern
    removed with what they get now."""
    parts = []
    for pattern in sorted(before.channels.keys() | after.channels.keys()):
        old, new = before.channels.get(pattern), after.channels.get(pattern)
        if old == new:
            continue
        note = ""
        if old is None:
            old, note = before.match(pattern)[1], " (new)"
        elif new is None:
            new, note = after.match(pattern)[1], " (removed)"
        changed = _changes(old, new, [f.name for f in fields(ChannelPolicy)])
        parts.append(f"{pattern} {changed or 'as before'}{note}")
    limits = _changes(before, after, list(LIMITS))
    if limits:
        parts.append(limits)
    text = "; ".join(parts) or "no change"
    return text if len(text) <= WHAT_MAX else text[: WHAT_MAX - 3] + "..."


def _changes(old: object, new: object, names: list[str]) -> str:
    return ", ".join(
        f"{name} {_number(getattr(old, name))} -> {_number(getattr(new, name))}{UNITS.get(name, '')}"
        for name in names
        if getattr(old, name) != getattr(new, name)
    )


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"
