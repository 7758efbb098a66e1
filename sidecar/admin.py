"""The admin API: read and change the throttle policy of every replica at once (docs/operations.md).

Every route needs the admin key (`Authorization: Bearer <SIDECAR_ADMIN_KEY>`; open in dev mode without one).

Example::

    curl -X PUT -H "Authorization: Bearer $KEY" localhost:8000/admin/throttle \\
         -d '{"channels": {"sprint:*": {"poke_rate": 200, "poke_floor": 1}}}'
"""

from __future__ import annotations

import orjson
from flask import Blueprint, Response, current_app, request

from sidecar.app import error, read_body, too_large
from sidecar.auth import bearer
from sidecar.core.throttle import PolicyError

admin = Blueprint("admin", __name__, url_prefix="/admin")


@admin.before_request
def require_admin() -> None:
    current_app.extensions["auth"].require_admin(bearer(request.headers.get("Authorization")))


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
    try:
        current_app.extensions["relay"].control.put_policy(doc)
    except PolicyError as exc:
        return error(400, "bad-policy", str(exc))
    return _describe()


@admin.delete("/throttle")
def reset_throttle() -> Response:
    """Back to the settings' policy, on every replica."""
    current_app.extensions["relay"].control.put_policy(None)
    return _describe()
