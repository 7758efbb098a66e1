"""JSON Merge Patch (RFC 7386): the RFC's examples, and properties of apply() and compose()."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.core.merge import MAX_DEPTH, MergeError, apply, compose, is_empty_patch

FAST = settings(max_examples=300, deadline=None)

# A small alphabet of keys so that patches collide with the target and with each other.
KEYS = st.sampled_from("abc")
SCALARS = st.none() | st.booleans() | st.integers(-2, 2) | st.text("xy", max_size=2)
VALUES = st.recursive(
    SCALARS, lambda kids: st.lists(kids, max_size=2) | st.dictionaries(KEYS, kids, max_size=3), max_leaves=10
)
# Mostly objects, as in practice, but any JSON value is a patch (RFC 7386 section 2).
PATCHES = st.dictionaries(KEYS, VALUES, max_size=3) | VALUES
FRESH = "zz"  # never drawn from KEYS, so no generated patch names it


def same(a: Any, b: Any) -> bool:
    """Strict JSON equality: unlike ==, tells true from 1 and false from 0."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def in_turn(target: Any, *patches: Any) -> Any:
    for patch in patches:
        target = apply(target, patch)
    return target


def nest(path: tuple[str, ...], leaf: Any) -> Any:
    for name in reversed(path):
        leaf = {name: leaf}
    return leaf


def at(document: Any, path: tuple[str, ...]) -> Any:
    for name in path:
        document = document[name]
    return document


def replace_then_merge_path(first: Any, second: Any) -> tuple[str, ...] | None:
    """Where ``first`` holds a non-object and ``second`` an object, reached through objects in both."""
    if not isinstance(second, dict):
        return None
    if not isinstance(first, dict):
        return ()
    for name, value in second.items():
        if name in first and (rest := replace_then_merge_path(first[name], value)) is not None:
            return (name, *rest)
    return None


def deep_merge(first: Any, second: Any) -> Any:
    """The obvious candidate for compose(): merge objects, otherwise take ``second``."""
    if not (isinstance(first, dict) and isinstance(second, dict)):
        return second
    return {**first, **{k: deep_merge(first[k], v) if k in first else v for k, v in second.items()}}


# RFC 7386 Appendix A, every row: original, patch, result.
RFC_7386_APPENDIX_A = [
    ({"a": "b"}, {"a": "c"}, {"a": "c"}),
    ({"a": "b"}, {"b": "c"}, {"a": "b", "b": "c"}),
    ({"a": "b"}, {"a": None}, {}),
    ({"a": "b", "b": "c"}, {"a": None}, {"b": "c"}),
    ({"a": ["b"]}, {"a": "c"}, {"a": "c"}),
    ({"a": "c"}, {"a": ["b"]}, {"a": ["b"]}),
    ({"a": {"b": "c"}}, {"a": {"b": "d", "c": None}}, {"a": {"b": "d"}}),
    ({"a": [{"b": "c"}]}, {"a": [1]}, {"a": [1]}),
    (["a", "b"], ["c", "d"], ["c", "d"]),
    ({"a": "b"}, ["c"], ["c"]),
    ({"a": "foo"}, None, None),
    ({"a": "foo"}, "bar", "bar"),
    ({"e": None}, {"a": 1}, {"e": None, "a": 1}),
    ([1, 2], {"a": "b", "c": None}, {"a": "b"}),
    ({}, {"a": {"bb": {"ccc": None}}}, {"a": {"bb": {}}}),
]


@pytest.mark.parametrize(("original", "patch", "result"), RFC_7386_APPENDIX_A)
def test_apply_gives_the_rfc_7386_appendix_a_results(original: Any, patch: Any, result: Any) -> None:
    assert same(apply(original, patch), result)


@pytest.mark.parametrize(
    ("first", "second", "expected"),
    [
        ({"a": 1}, {"b": 2}, {"a": 1, "b": 2}),
        ({"a": {"x": 1}}, {"a": {"y": None}}, {"a": {"x": 1, "y": None}}),
        ({"a": {"x": 1}}, {"a": 2}, {"a": 2}),
        ({"a": 1}, {"a": None}, {"a": None}),
        ({"a": 1}, ["list"], ["list"]),
        ("text", 3, 3),
    ],
)
def test_compose_folds_patches_it_can_express(first: Any, second: Any, expected: Any) -> None:
    assert same(compose(first, second), expected)


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ({"a": None}, {"a": {"b": 1}}),  # deleted, then rebuilt from {}
        ({"a": 1}, {"a": {"b": 1}}),  # replaced by a scalar, then rebuilt from {}
        ({"a": {"b": []}}, {"a": {"b": {}}}),  # the same, one level down
        ("text", {"a": 1}),  # the whole document replaced, then rebuilt from {}
        (None, {}),
    ],
)
def test_compose_declines_a_replace_followed_by_a_merge(first: Any, second: Any) -> None:
    assert compose(first, second) is None


def test_only_the_empty_object_is_an_empty_patch() -> None:
    assert is_empty_patch({})
    assert not is_empty_patch({"a": {}})
    assert not is_empty_patch({"a": None})
    assert not is_empty_patch(None)
    assert not is_empty_patch([])


def test_apply_shares_untouched_subtrees_of_the_target() -> None:
    untouched = {"deep": [1, 2]}
    target = {"keep": untouched, "change": {"x": 1}}
    result = apply(target, {"change": {"x": 2}})
    assert result["keep"] is untouched
    assert target == {"keep": untouched, "change": {"x": 1}}


@FAST
@given(target=VALUES, first=PATCHES, second=PATCHES)
def test_apply_and_compose_leave_their_inputs_unchanged(target: Any, first: Any, second: Any) -> None:
    before = copy.deepcopy((target, first, second))
    apply(target, first)
    compose(first, second)
    assert same((target, first, second), before)


@FAST
@given(target=VALUES, first=PATCHES, second=PATCHES)
def test_composed_patch_applies_like_the_patches_in_turn(target: Any, first: Any, second: Any) -> None:
    composed = compose(first, second)
    if composed is not None:
        assert same(apply(target, composed), in_turn(target, first, second))


@FAST
@given(target=VALUES, patches=st.lists(PATCHES, min_size=1, max_size=6))
def test_composing_a_run_of_patches_applies_like_applying_each_in_turn(target: Any, patches: list[Any]) -> None:
    # Fold left to right; where compose() declines, apply what was folded so far and start again.
    result, pending = target, patches[0]
    for patch in patches[1:]:
        composed = compose(pending, patch)
        if composed is None:
            result, pending = apply(result, pending), patch
        else:
            pending = composed
    assert same(apply(result, pending), in_turn(target, *patches))


@FAST
@given(first=PATCHES, second=PATCHES)
def test_compose_declines_exactly_when_first_replaces_where_second_merges(first: Any, second: Any) -> None:
    declined = replace_then_merge_path(first, second) is not None
    # A null ``second`` composes to the null patch, which reads the same as declining (see compose()).
    assert (compose(first, second) is None) == (declined or second is None)


@FAST
@given(target=VALUES, pair=st.tuples(PATCHES, PATCHES), candidate=PATCHES)
def test_no_single_patch_matches_a_declined_pair(target: Any, pair: tuple[Any, Any], candidate: Any) -> None:
    # Plant a member no patch names where ``first`` replaces and ``second`` merges. In turn, the two
    # patches drop it; any single patch either keeps it (an object patch only removes members it
    # names) or leaves no object there. So a patch that names no fresh key never matches, and since
    # every patch is finite and some key is fresh to it, no patch does: declining is forced.
    first, second = pair
    path = replace_then_merge_path(first, second)
    if path is None:
        return
    planted = apply(target, nest(path, {FRESH: 0}))
    expected = in_turn(planted, first, second)
    assert isinstance(at(expected, path), dict)
    assert FRESH not in at(expected, path)
    assert same(expected, in_turn(target, first, second))  # what the target held there never matters
    for patch in (candidate, deep_merge(first, second)):
        assert not same(apply(planted, patch), expected)


def nested(depth: int, container: str) -> Any:
    value: Any = 0
    for _ in range(depth):
        value = {"a": value} if container == "object" else [value]
    return value


@pytest.mark.parametrize("container", ["object", "array"])
def test_patches_as_deep_as_max_depth_are_accepted(container: str) -> None:
    patch = nested(MAX_DEPTH, container)
    assert same(apply({}, patch), patch)
    assert same(compose({}, patch), patch)


@FAST
@given(depth=st.integers(MAX_DEPTH + 1, 5_000), container=st.sampled_from(["object", "array"]))
def test_patches_deeper_than_max_depth_raise_merge_error(depth: int, container: str) -> None:
    hostile = nested(depth, container)
    with pytest.raises(MergeError):
        apply({}, hostile)
    with pytest.raises(MergeError):
        compose(hostile, {})
    with pytest.raises(MergeError):
        compose({}, hostile)


def test_the_depth_guard_stops_hostile_input_before_python_recursion_does() -> None:
    with pytest.raises(MergeError):
        apply({}, nested(100_000, "object"))
