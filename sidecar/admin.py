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

import orjson
import redis
from flask import Blueprint, Response, current_app, g, request

from sidecar.app import error, read_body, too_large
from sidecar.auth import bearer
from sidecar.core.throttle import LOG_MAX, Policy, PolicyError, change_summary, log_count, policy_changes

log = logging.getLogger(__name__)
admin = Blueprint("admin", __name__, url_prefix="/admin")



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
    n = log_count(request.args.get("n", "50"))
    if n is None:
        return error(400, "bad-request", f"n must be an integer from 1 to {LOG_MAX}")
    changes = policy_changes(current_app.extensions["relay"].store.read_policy_log(n))
    return Response(orjson.dumps({"changes": changes}), mimetype="application/json")


def _log_change(before: Policy, after: Policy, stored: bytes | None) -> None:
    """The change is made: log it (a log Redis refuses leaves the change standing, with a warning)."""
    control = current_app.extensions["relay"].control
    try:
        control.store.log_policy_change(control.updated, g.admin, change_summary(before, after, stored), stored)
    except redis.RedisError as exc:
        log.warning("throttle: the policy change was applied but not logged (%s)", type(exc).__name__)
