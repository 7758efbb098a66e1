"""The shard-stream reader: one loop per process that reads every shard's live stream and feeds the hub.

It remembers the last id of each shard, so a Redis blip or restart loses nothing: the next XREAD resumes there.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import cast

import redis

from sidecar.config import Settings
from sidecar.core.protocol import Message
from sidecar.store import Store, connect, decode_entries

log = logging.getLogger(__name__)


class Reader:
    def __init__(self, store: Store, settings: Settings, on_messages: Callable[[list[Message]], None]) -> None:
        self.store = store
        self.settings = settings
        self.on_messages = on_messages
        # Blocking reads get a client of their own, with a socket timeout longer than the block.
        self.redis = connect(settings.redis_url or "", settings, block_ms=settings.read_block_ms)
        self.last_ids: dict[str, str] = {}
        self.healthy = False
        self.running = False
        self.reconnects = 0
        self.messages_read = 0  # ever, every channel (every replica reads every shard: this is the publish rate)
        self.read_by_channel: dict[str, int] = {}  # the same per channel, read and reset by stats
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        """Start from the current end of every shard, then read in the background."""
        self._load_positions()
        self.running = True
        self.healthy = True
        self.thread = threading.Thread(target=self._run, name="sidecar-reader", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.running = False

    @property
    def alive(self) -> bool:
        return self.running and self.thread is not None and self.thread.is_alive()

    def _load_positions(self) -> None:
        # Explicit ids, not "$": a message published between our start and our first XREAD is not missed.
        pipe = self.redis.pipeline(transaction=False)
        keys = self.store.live_keys()
        for key in keys:
            pipe.xrevrange(key, count=1)
        for key, newest in zip(keys, pipe.execute(), strict=True):
            self.last_ids[key] = newest[0][0].decode() if newest else "0-0"

    def _run(self) -> None:
        backoff = 0.05
        while self.running:
            try:
                streams = cast("dict[bytes | str | memoryview, int | bytes | str | memoryview]", self.last_ids)
                replies = cast(
                    "list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]] | None",
                    self.redis.xread(streams, count=self.settings.read_count, block=self.settings.read_block_ms),
                )  # bytes replies: connect() leaves decode_responses off
                self.healthy = True
                backoff = 0.05
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                if self.healthy:
                    log.warning("reader lost Redis (%s); retrying from the last ids", type(exc).__name__)
                self.healthy = False
                self.reconnects += 1
                time.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            for stream, entries in replies or ():
                if not entries:
                    continue
                messages = decode_entries(entries)
                self.last_ids[stream.decode()] = messages[-1].id
                self.messages_read += len(messages)
                counts = self.read_by_channel
                for msg in messages:
                    counts[msg.channel] = counts.get(msg.channel, 0) + 1
                try:
                    self.on_messages(messages)
                except Exception:  # a bug in dispatch must not stop the relay
                    log.exception("dispatch failed")
