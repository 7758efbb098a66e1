"""The asyncio front's lean stand-ins for uvicorn's and wsproto's per-connection objects (sidecar/asgi/front.py)
fit the installed versions, and fall back to the libraries' own objects, warning once, when they do not."""

from __future__ import annotations

import asyncio
import logging
from collections import deque

import pytest

from sidecar.asgi import front
from sidecar.asgi.front import LeanDeque, LeanEvent, stand_in, stand_in_problems


class Owner:
    def __init__(self) -> None:
        self.pipeline: object = deque()
        self.event: object = asyncio.Event()


@pytest.fixture
def fits(monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201
    monkeypatch.setattr(front, "_misfits", set())
    monkeypatch.setattr(front, "_fits", True)
    return monkeypatch


def test_the_installed_uvicorn_and_wsproto_are_what_the_stand_ins_replace() -> None:
    assert stand_in_problems() == []


def test_an_attribute_of_the_expected_type_is_replaced(fits) -> None:
    owner = Owner()
    stand_in(owner, "pipeline", deque, LeanDeque)
    stand_in(owner, "event", asyncio.Event, lambda e: LeanEvent(e.is_set()))
    assert type(owner.pipeline) is LeanDeque and type(owner.event) is LeanEvent


def test_a_missing_or_changed_attribute_is_left_as_the_library_made_it_and_warned_once(fits, caplog) -> None:
    owners = [Owner(), Owner()]
    with caplog.at_level(logging.WARNING, "sidecar.asgi.front"):
        for owner in owners:
            owner.pipeline = []  # a version that made it something else
            stand_in(owner, "pipeline", deque, LeanDeque)
            stand_in(owner, "gone", deque, LeanDeque)  # a version without it
    assert all(type(owner.pipeline) is list and not hasattr(owner, "gone") for owner in owners)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2 and "Owner.pipeline is a list" in warnings[0], warnings


def test_when_the_startup_check_fails_nothing_is_replaced_and_it_is_said_once(fits, caplog) -> None:
    fits.setattr(front, "_fits", None)
    fits.setattr(front, "stand_in_problems", lambda: ["uvicorn FlowControl._is_writable_event is not an asyncio.Event"])
    owners = [Owner(), Owner()]
    with caplog.at_level(logging.WARNING, "sidecar.asgi.front"):
        for owner in owners:
            stand_in(owner, "pipeline", deque, LeanDeque)
            stand_in(owner, "event", asyncio.Event, lambda e: LeanEvent(e.is_set()))
    assert all(type(o.pipeline) is deque and type(o.event) is asyncio.Event for o in owners)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "_is_writable_event" in warnings[0] and "their own objects" in warnings[0]
