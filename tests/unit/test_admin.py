"""The admin API's pure parts: who a key is, and what a policy change says (the route is
tests/integration/test_stats.py)."""

from __future__ import annotations

import pytest

from sidecar.auth import Auth, AuthError, InsecureConfig
from sidecar.config import Settings
from sidecar.core.throttle import WHAT_MAX, Policy, describe_change

ANNA, BO, PLAIN = "anna-key-0123456789", "bo:key:with:colons-0123", "plain-admin-key-0123"


def test_named_admin_keys_say_who_and_the_unnamed_ones_are_admin():
    auth = Auth(Settings(admin_key=PLAIN, admin_keys=f"ops-anna:{ANNA}, ops-bo:{BO}"))
    assert auth.require_admin(ANNA) == "ops-anna"
    assert auth.require_admin(BO) == "ops-bo"  # a key may hold ":"
    assert auth.require_admin(PLAIN) == "admin"
    assert Auth(Settings(admin_keys=f"ops-anna:{ANNA}")).require_admin(ANNA) == "ops-anna"
    for wrong in ("nope-nope-nope-nope", "", None, f"ops-anna:{ANNA}"):
        with pytest.raises(AuthError) as caught:
            auth.require_admin(wrong)
        assert caught.value.status == 401 and "anna" not in caught.value.message.lower()
    with pytest.raises(AuthError) as disabled:
        Auth(Settings()).require_admin(ANNA)
    assert disabled.value.status == 403
    assert Auth(Settings(dev=True)).require_admin(None) == "dev"


@pytest.mark.parametrize("value", ["ops-anna", f"ops anna:{ANNA}", ":" + ANNA, "ops-anna:short", "x" * 65 + ":" + ANNA])
def test_a_bad_named_key_is_refused_at_start_without_showing_the_key(value):
    with pytest.raises(InsecureConfig) as caught:
        Auth(Settings(admin_keys=value))
    assert "SIDECAR_ADMIN_KEYS" in str(caught.value) and ANNA not in str(caught.value)
    assert "short" not in str(caught.value)


@pytest.mark.parametrize(
    "before, after, what",
    [
        ({}, {"channels": {"orders:*": {"window": 0.5}}}, "orders:* window 0 -> 0.5 s (new)"),
        ({"channels": {"orders:*": {"window": 0.5}}}, {"channels": {"orders:*": {"window": 0.25, "poke_rate": 200}}},
         "orders:* window 0.5 -> 0.25 s, poke_rate 0 -> 200/s"),
        ({"channels": {"orders:*": {"window": 0.5}}}, {}, "orders:* window 0.5 -> 0 s (removed)"),
        ({}, {"admit_rate": 50, "queue_bytes": 4096}, "admit_rate 0 -> 50/s, queue_bytes 1048576 -> 4096 B"),
        ({}, {"channels": {"*": {"poke_floor": 1}}, "stuck_timeout": 5},
         "* poke_floor 0 -> 1 s; stuck_timeout 30 -> 5 s"),
        ({}, {"channels": {"a:*": {}}}, "a:* as before (new)"),
        ({}, {}, "no change"),
    ],
)  # fmt: skip
def test_a_policy_change_is_summed_up_in_a_line(before, after, what):
    assert describe_change(Policy.from_json(before), Policy.from_json(after)) == what


def test_a_long_summary_is_cut():
    after = Policy.from_json({"channels": {f"pattern{i}:*": {"window": 1} for i in range(50)}})
    what = describe_change(Policy(), after)
    assert len(what) == WHAT_MAX and what.endswith("...")
