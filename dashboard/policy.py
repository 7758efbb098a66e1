"""The throttle policy as the dashboard shows it, and the admin API that changes it. No Panel here.

Ops' policy lives in Redis at ``<prefix>:throttle``, a hash (sidecar/store.py): ``doc`` the whole policy
document as ``PUT /admin/throttle`` stored it, ``v`` its version, ``at`` when. No ``doc``: every replica runs its
settings' policy (SIDECAR_COALESCE_WINDOW, ...). A document looks like (docs/operations.md)::

    {"channels": {"*": {"window": 0.0, ...}, "sprint:*": {"poke_rate": 200, "poke_floor": 1}},
     "admit_rate": 0, "max_connections": 0, ...}

The reader tolerates what it does not know (a plain JSON string, other wrappers), so the view never breaks.
Changes go through ``PUT /admin/throttle`` with the admin key; while that route 404s the view stays read-only.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import orjson
import requests

from sidecar.core.throttle import CHANNEL_LIMITS, LIMITS, ChannelPolicy, Policy, PolicyError


@dataclass(frozen=True)
class Rule:
    pattern: str
    policy: Any  # the pattern's policy as stored (usually a dict)

    def fields(self) -> dict[str, str]:
        """The policy flattened for a table: scalars as text, nested values as JSON."""
        if not isinstance(self.policy, dict):
            return {"policy": _text(self.policy)}
        return {str(k): _text(v) for k, v in self.policy.items()}


@dataclass(frozen=True)
class PolicyView:
    rules: list[Rule] = field(default_factory=list)  # per channel pattern
    limits: dict[str, Any] = field(default_factory=dict)  # the replica-wide values (admit_rate, ...)
    doc: Any = None  # the whole document, as stored; None: the settings' policy is in force
    version: int = 0
    updated: float = 0.0  # epoch seconds

    @property
    def summary(self) -> str:
        if self.doc is None:
            return "No policy set by ops: every replica runs its settings' policy."
        limits = ", ".join(f"{k} {_text(v)}" for k, v in self.limits.items())
        return f"Policy version {self.version}" + (f"; {limits}" if limits else "")


def read_policy(client: Any, key: str) -> PolicyView:
    """The policy at ``key``; an empty view when there is none. Never raises for a shape it does not know."""
    kind = _str(client.type(key))
    if kind == "none":
        return PolicyView()
    if kind == "hash":
        fields = {_str(k): v for k, v in client.hgetall(key).items()}
        doc = _json(fields["doc"]) if "doc" in fields else None
        return view_of(doc, int(_json(fields.get("v", b"0")) or 0), float(_json(fields.get("at", b"0")) or 0))
    if kind == "string":
        return view_of(_json(client.get(key)))
    return PolicyView([Rule("(unreadable)", f"a Redis {kind} at {key}")])


def view_of(doc: Any, version: int = 0, updated: float = 0.0) -> PolicyView:
    if doc is None:
        return PolicyView(version=version, updated=updated)
    limits: dict[str, Any] = {}
    if isinstance(doc, dict):
        rules_doc = next(
            (doc[k] for k in ("channels", "patterns", "rules") if isinstance(doc.get(k), dict | list)), None
        )
        if rules_doc is None:
            rules_doc = doc
        else:
            limits = {k: v for k, v in doc.items() if not isinstance(v, dict | list)}
    else:
        rules_doc = doc
    return PolicyView(rules_of(rules_doc), limits, doc, version, updated)


def rules_of(doc: Any) -> list[Rule]:
    if isinstance(doc, dict):
        return [Rule(str(p), v) for p, v in doc.items()]
    if isinstance(doc, list):
        rules = []
        for i, item in enumerate(doc):
            if isinstance(item, dict):
                rest = {k: v for k, v in item.items() if k != "pattern"}
                rules.append(Rule(str(item.get("pattern", f"#{i}")), rest))
            else:
                rules.append(Rule(f"#{i}", item))
        return rules
    if doc is None:
        return []
    return [Rule("*", doc)]


def with_rule(doc: Any, pattern: str, policy: dict[str, Any]) -> dict[str, Any]:
    """The whole document with one pattern's policy replaced: PUT replaces the document, so what ops set
    for the other patterns and limits must go along."""
    new = copy.deepcopy(doc) if isinstance(doc, dict) else {}
    channels = new.get("channels")
    new["channels"] = {**(channels if isinstance(channels, dict) else {}), pattern: policy}
    return new


def in_force(view: PolicyView, defaults: Policy) -> tuple[Policy, str]:
    """The policy the replicas run, and where it comes from: ops' document over the settings' policy
    (``defaults``, as sidecar/control.py applies it), or the settings' policy when ops set none."""
    if view.doc is None:
        return defaults, "settings"
    try:
        return Policy.from_json(view.doc, defaults), "ops"
    except PolicyError:
        return defaults, "settings (ops' document is not valid)"


def channel_rows(policy: Policy, source: str = "") -> list[dict[str, Any]]:
    """One row per channel pattern, most specific first (the order patterns are matched in)."""
    return [
        {"pattern": pattern, **policy_fields(rule), "from": source}
        for pattern, rule in sorted(policy.channels.items(), key=lambda kv: _specific(kv[0]))
    ]


def _specific(pattern: str) -> tuple[int, int, str]:
    return (-len(pattern.replace("*", "")), pattern.count("*"), pattern)  # as Policy.match orders them


def policy_fields(rule: ChannelPolicy) -> dict[str, float]:
    """A pattern's rule as its JSON policy (for the editor)."""
    return {name: getattr(rule, name) for name in CHANNEL_LIMITS}


def limit_rows(policy: Policy) -> list[dict[str, Any]]:
    """The replica-wide limits, one row each."""
    return [{"limit": name, "value": getattr(policy, name)} for name in LIMITS]


def rule_for(policy: Policy, pattern: str) -> ChannelPolicy:
    """The rule a pattern's channels get now: its own, else the one its name matches (the default ``*``)."""
    return policy.channels.get(pattern) or policy.match(pattern)[1]


def policy_frame(policy: Policy, source: str = "") -> Any:
    """The policy as a DataFrame: one row per channel pattern, for notebooks."""
    import pandas as pd

    return pd.DataFrame(channel_rows(policy, source))


# -- the change history: <prefix>:policy:log ----------------------------------------------------------------
CHANGES = 50  # changes read (newest first), shown and drawn as markers


@dataclass(frozen=True)
class PolicyChange:
    """One entry of ``<prefix>:policy:log``: a PUT or DELETE of /admin/throttle."""

    id: str  # the stream id
    at: float  # unix seconds
    who: str  # the admin key's name ("admin": the unnamed key)
    what: str  # a short summary, e.g. "orders:* window 0 -> 0.5 s"
    policy: str  # the new policy JSON; "" for a DELETE (back to the settings' policy)


def parse_change(stream_id: Any, fields: Any) -> PolicyChange | None:
    """A :class:`PolicyChange` from an XREVRANGE entry, None if it has no readable time."""
    values = {_str(k): _str(v) for k, v in dict(fields).items()}
    try:
        at = float(values.get("at", ""))
    except ValueError:
        return None
    what = values.get("what", "") or ("back to the settings' policy" if not values.get("policy") else "policy set")
    return PolicyChange(_str(stream_id), at, values.get("who", "") or "?", what[:200], values.get("policy", ""))


def read_changes(client: Any, key: str, n: int = CHANGES) -> list[PolicyChange]:
    """The last ``n`` policy changes, newest first (one bounded XREVRANGE; none while the stream is missing)."""
    changes = (parse_change(i, f) for i, f in client.xrevrange(key, count=n))
    return [c for c in changes if c is not None]


def changes_frame(changes: list[PolicyChange]) -> Any:
    """The change history as a DataFrame (oldest first), for notebooks."""
    import pandas as pd

    rows = [{"time": pd.Timestamp(c.at, unit="s"), "who": c.who, "what": c.what, "policy": c.policy}
            for c in reversed(changes)]  # fmt: skip
    return pd.DataFrame(rows, columns=["time", "who", "what", "policy"])


def _json(raw: Any) -> Any:
    text = _str(raw)
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return text


def _str(raw: Any) -> str:
    return raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    return orjson.dumps(value).decode()


class AdminAPI:
    """``/admin/throttle`` on a sidecar, with the admin key as a bearer token."""

    def __init__(self, base_url: str, key: str | None, timeout: float = 2.0) -> None:
        self.url = base_url.rstrip("/") + "/admin/throttle"
        self.key = key
        self.timeout = timeout

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"} if self.key else {}

    def available(self) -> tuple[bool, str]:
        """Whether the controls can work: an admin key, and a sidecar that has the route and takes the key."""
        if not self.key:
            return False, "Read-only: set SIDECAR_ADMIN_KEY (and SIDECAR_URL) to change the policy here."
        try:
            status = requests.get(self.url, headers=self.headers, timeout=self.timeout).status_code
        except requests.RequestException as exc:
            return False, f"Read-only: the sidecar at {self.url} is unreachable ({type(exc).__name__})."
        return self._verdict(status, "")

    def current(self) -> Any:
        """The policy in force (``GET /admin/throttle``), or None."""
        try:
            response = requests.get(self.url, headers=self.headers, timeout=self.timeout)
            return response.json().get("policy") if response.ok else None
        except (requests.RequestException, ValueError, AttributeError):
            return None

    def put(self, doc: dict[str, Any]) -> tuple[bool, str]:
        """Replace the whole policy document; (ok, what to tell the user)."""
        headers = {**self.headers, "Content-Type": "application/json"}
        try:
            response = requests.put(self.url, data=orjson.dumps(doc), headers=headers, timeout=self.timeout)
        except requests.RequestException as exc:
            return False, f"Not changed: the sidecar is unreachable ({type(exc).__name__})."
        if response.ok:
            return True, "Policy changed; every replica applies it within a second."
        ok, message = self._verdict(response.status_code, "")
        if ok:
            try:
                message = response.json().get("message") or response.text
            except (ValueError, AttributeError):
                message = response.text
            message = f"Not changed (HTTP {response.status_code}): {str(message)[:200]}"
        return False, message

    @staticmethod
    def _verdict(status: int, ready: str) -> tuple[bool, str]:
        if status == 404:
            return False, "Read-only: this sidecar has no admin API yet (/admin/throttle is a 404)."
        if status in (401, 403):
            return False, "Read-only: the sidecar refused the admin key."
        return True, ready
