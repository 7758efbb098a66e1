"""JSON Merge Patch (RFC 7386): apply a patch, and fold two patches into one.

Pure functions on JSON values (dict, list, str, int, float, bool, None); no I/O. Values are treated as
immutable: nothing passed in is mutated, and results are new objects only where something changed.
Untouched subtrees of the target, and values taken from a patch, are shared, not copied, so callers
must not mutate a result while they still hold its inputs (or the other way round).

Example::

    >>> apply({"state": "PENDING", "meta": {"n": 1}}, {"state": "STARTED", "meta": {"n": None}})
    {'state': 'STARTED', 'meta': {}}
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

__all__ = ["MAX_DEPTH", "MergeError", "apply", "check_depth", "compose", "is_empty_patch"]

# Patches come from outside. Bounding how deeply they nest bounds our recursion (and a serialiser's)
# far below Python's recursion limit, whatever a hostile client sends.
MAX_DEPTH = 64


class MergeError(ValueError):
    """A patch nested more than MAX_DEPTH objects and arrays deep."""


def apply(target: Any, patch: Any) -> Any:
    """Return ``target`` with ``patch`` applied: MergePatch() of RFC 7386 section 2.

    A patch that is not an object replaces the target outright (``null`` included). An object patch
    is merged member by member: ``null`` removes the member, an object recurses into it (starting from
    ``{}`` when the target's member is missing or not an object), anything else replaces it.

    Raises MergeError if ``patch`` nests deeper than MAX_DEPTH. The target is only walked as deep as
    the patch reaches, so it is not checked.

    Example::

        >>> apply({"a": "b", "c": {"d": "e"}}, {"a": None, "c": {"f": "g"}})
        {'c': {'d': 'e', 'f': 'g'}}
    """
    check_depth(patch)
    return _apply(target, patch)


def compose(first: Any, second: Any) -> Any | None:
    """Return one patch that does what applying ``first`` then ``second`` does, or None if none can.

    Whenever the result ``p`` is not None, ``apply(t, p) == apply(apply(t, first), second)`` for every
    JSON value ``t``. Objects compose member by member; where ``second`` holds a non-object it wins.

    No merge patch can express the pair when, at some path through objects in both patches (the root
    included), ``first`` holds a non-object (``null`` included) and ``second`` holds an object. In
    turn, ``second``'s object is then merged into ``{}`` (RFC 7386 section 2: "if Target is not an
    Object: Target = {}"), giving the same object whatever the target held there. A single object
    patch at that path would merge into the target's value instead, keeping every member it does not
    name, and a non-object patch gives a non-object; so we return None and the caller applies both.

    If ``second`` is ``null`` the answer is the null patch, which is also None; either reading is
    right, since both patches in turn replace every target with ``null`` too.

    Example::

        >>> compose({"a": 1, "b": {"c": 2}}, {"b": {"d": None}})
        {'a': 1, 'b': {'c': 2, 'd': None}}
        >>> compose({"b": None}, {"b": {"d": 3}}) is None
        True
    """
    check_depth(first)
    check_depth(second)
    return _compose(first, second)


def is_empty_patch(patch: Any) -> bool:
    """Return whether ``patch`` leaves every target unchanged; per RFC 7386 only ``{}`` does.

    ``{"a": {}}`` is not empty: it turns a missing or non-object ``"a"`` into ``{}``.
    """
    return isinstance(patch, dict) and not patch


def _apply(target: Any, patch: Any) -> Any:
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for name, value in patch.items():
        if value is None:
            result.pop(name, None)
        else:
            # A missing member reads as None, which is not an object, so the recursion starts from {}.
            result[name] = _apply(result.get(name), value)
    return result


def _compose(first: Any, second: Any) -> Any | None:
    if not isinstance(second, dict):
        return second  # replaces whatever ``first`` produced
    if not isinstance(first, dict):
        return None  # a fresh object in turn, a merge in one patch: see compose()
    result = dict(first)
    for name, value in second.items():
        if isinstance(value, dict) and name in first:
            merged = _compose(first[name], value)
            if merged is None:
                return None
            result[name] = merged
        else:
            # ``first`` leaves this member alone, or ``second`` sets or deletes it regardless.
            result[name] = value
    return result


def check_depth(value: Any) -> None:
    """Raise MergeError if ``value`` nests objects and arrays deeper than MAX_DEPTH; never recurses.

    Publishing checks patches with it, so that every patch in Redis can be applied (sidecar/publish.py).
    """
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        node, depth = stack.pop()
        children: Iterable[Any]
        if isinstance(node, dict):
            children = node.values()
        elif isinstance(node, list | tuple):
            children = node
        else:
            continue
        if depth == MAX_DEPTH:
            raise MergeError(f"JSON nested more than {MAX_DEPTH} levels deep")
        stack.extend((child, depth + 1) for child in children)
