"""The publisher: what Celery workers, backends and `POST /publish` call to send a message to a channel.

Example::

    pub = Publisher.from_url("redis://127.0.0.1:6379/0")
    pub.diff("sprint:7", "sprint-completed",
             {"completed_date": "2026-11-28", "tasks": {"t1": {"status": "completed"}}})
    with pub.batch() as b:
        for row in rows:
            b.diff("import:42", "row-imported", {"rows": {row.id: row.as_dict()}})

Each message is one atomic Redis script (see store.py); a batch is all of them in one round trip. `wait=N`
(any call, or `batch(wait=N)`) ends the round trip with Redis' `WAIT N timeout` (`SIDECAR_PUBLISH_WAIT_TIMEOUT_MS`)
and returns how many replicas acknowledged in `Published.replicas`: fewer than N is logged and counted, not
raised (the message is published; see docs/celery.md, "WAIT").
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import orjson

from sidecar.config import Settings
from sidecar.core import merge
from sidecar.core.protocol import ProtocolError, validate_channel, validate_event
from sidecar.pubstats import PublishStats
from sidecar.store import Published, Snapshot, Store, connect

__all__ = ["Publisher", "Published", "Snapshot", "PublishError"]

Item = tuple[str, str, str, bytes | None, bytes | None, float]


class PublishError(ProtocolError):
    """A message that cannot be published (bad channel, event, payload or size)."""


class Publisher:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.max_bytes = store.settings.max_publish_bytes
        self.stats = PublishStats(store)  # publish -> Redis acknowledged, one "pub" record a second (pubstats.py)

    @classmethod
    def from_settings(cls, settings: Settings) -> Publisher:
        if not settings.redis_url:
            raise ValueError("the publisher needs a Redis URL (REDIS_URL)")
        return cls(Store(connect(settings.redis_url, settings), settings))

    @classmethod
    def from_url(cls, url: str, **settings: Any) -> Publisher:
        return cls.from_settings(Settings(redis_url=url, **settings))

    def event(self, channel: str, name: str, data: Any = None, *, wait: int = 0) -> Published:
        """A business event: no state change."""
        return self._send([self.item(channel, "event", name, data)], wait)[0]

    def diff(
        self, channel: str, name: str, changes: Mapping[str, Any], data: Any = None, *, wait: int = 0
    ) -> Published:
        """A business event plus the fields it changed, as an RFC 7386 merge patch of the channel's state."""
        return self._send([self.item(channel, "diff", name, data, changes)], wait)[0]

    def state(
        self, channel: str, name: str, full_state: Mapping[str, Any], data: Any = None, *, wait: int = 0
    ) -> Published:
        """Replace the channel's state."""
        return self._send([self.item(channel, "state", name, data, full_state)], wait)[0]

    def poke(self, channel: str, name: str = "changed", *, wait: int = 0) -> Published:
        """Only "the channel changed": subscribers re-fetch the state themselves."""
        return self._send([self.item(channel, "poke", name)], wait)[0]

    def batch(self, wait: int = 0) -> Batch:
        """Messages sent in one round trip when the `with` block ends; `wait`: then WAIT for that many replicas."""
        return Batch(self, wait)

    def close(self) -> None:
        """Release the Redis connections."""
        self.stats.close()
        self.store.redis.close()

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def snapshot(self, channel: str) -> Snapshot | None:
        return self.store.snapshot(validate_channel(channel))

    def history(self, channel: str) -> list[dict[str, Any]]:
        """The channel's retained history, oldest first, as `diff`-mode message dicts (for tests and tools)."""
        from sidecar.core.protocol import dumps, message_body

        return [orjson.loads(dumps(message_body(m, "diff"))) for m in self.store.history(channel)]

    def item(self, channel: object, kind: str, name: object, data: Any = None, change: Any = None) -> Item:
        """Validate and encode one message; raises PublishError with a message fit for an HTTP 400."""
        try:
            channel = validate_channel(channel)
            name = validate_event(name)
        except ProtocolError as exc:
            raise PublishError(exc.code, exc.message) from None
        if kind in ("diff", "state") and not isinstance(change, Mapping):
            what = "changes" if kind == "diff" else "state"
            raise PublishError("bad-change", f"{what} must be a JSON object")
        data_json = _encode(data, "data") if data is not None else None
        change_json = _encode(change, "changes") if change is not None else None
        size = len(data_json or b"") + len(change_json or b"")
        if size > self.max_bytes:
            raise PublishError("too-large", f"message is {size} bytes; the limit is {self.max_bytes}")
        if kind == "diff":
            try:
                merge.check_depth(change)  # the merge's own limit: a patch it refuses would poison the channel
            except merge.MergeError:
                raise PublishError("bad-change", f"changes nest more than {merge.MAX_DEPTH} levels deep") from None
        return channel, kind, name, data_json, change_json, round(time.time() * 1000, 3)

    def _send(self, items: list[Item], wait: int = 0) -> list[Published]:
        try:
            published = self.store.publish_many(items, wait) if items else []
        except ProtocolError as exc:  # state-too-large
            raise PublishError(exc.code, exc.message) from None
        self.stats.observe(item[5] for item in items)
        return published


class Batch:
    """Messages collected and sent in one round trip when the `with` block ends."""

    def __init__(self, publisher: Publisher, wait: int = 0) -> None:
        self.publisher = publisher
        self.wait = wait
        self.items: list[Item] = []
        self.results: list[Published] = []

    def event(self, channel: str, name: str, data: Any = None) -> None:
        self.items.append(self.publisher.item(channel, "event", name, data))

    def diff(self, channel: str, name: str, changes: Mapping[str, Any], data: Any = None) -> None:
        self.items.append(self.publisher.item(channel, "diff", name, data, changes))

    def state(self, channel: str, name: str, full_state: Mapping[str, Any], data: Any = None) -> None:
        self.items.append(self.publisher.item(channel, "state", name, data, full_state))

    def poke(self, channel: str, name: str = "changed") -> None:
        self.items.append(self.publisher.item(channel, "poke", name))

    def send(self) -> list[Published]:
        items, self.items = self.items, []
        self.results.extend(self.publisher._send(items, self.wait))
        return self.results

    def __enter__(self) -> Batch:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is None:
            self.send()


def _encode(value: Any, what: str) -> bytes:
    try:
        return orjson.dumps(value)
    except TypeError as exc:
        raise PublishError("bad-json", f"{what} must be JSON-serialisable: {exc}") from None
