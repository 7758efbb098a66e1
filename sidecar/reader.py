"""The shard-stream reader: one loop per process that reads every shard's live stream and feeds the hub.

It remembers the last id of each shard, so a Redis blip or restart loses nothing: the next XREAD resumes there.
A reader that falls so far behind that the live stream is trimmed past its position (MAXLEN `live_len`), or a
Redis that lost the stream's tail, would lose messages: each live entry carries its shard's publish counter
`n` (store.py), and a jump in it makes the reader resynchronise every local subscriber of that shard.
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
from sidecar.store import Store, connect, decode_entry

log = logging.getLogger(__name__)


class Reader:
    """``on_messages`` gets each shard's new messages in stream order; ``on_gap`` a shard whose live stream
    lost messages before this reader read them (its channels need a snapshot/reset); ``on_error`` each entry
    that is not a message (not written by our publish script), or an error ``on_messages`` let through."""

    def __init__(
        self,
        store: Store,
        settings: Settings,
        on_messages: Callable[[list[Message]], None],
        on_gap: Callable[[int], None] | None = None,
        on_error: Callable[[Message | None, Exception], None] | None = None,
    ) -> None:
        self.store = store
        self.settings = settings
        self.on_messages = on_messages
        self.on_gap = on_gap
        self.on_error = on_error
        # Blocking reads get a client of their own, with a socket timeout longer than the block.
        self.redis = connect(settings.redis_url or "", settings, block_ms=settings.read_block_ms)
        self.last_ids: dict[str, str] = {}
        self.counters: dict[str, int] = {}  # live key -> `n` of the last entry read (absent: not known)
        self.shards = {key: shard for shard, key in enumerate(store.live_keys())}
        self.gaps = 0  # times a shard's stream lost messages before they were read
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
            n = _counter(newest[0][1]) if newest else 0
            if n is not None:
                self.counters[key] = n

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
                if entries:
                    self._read(stream.decode(), entries)

    def _read(self, key: str, entries: list[tuple[bytes, dict[bytes, bytes]]]) -> None:
        self.last_ids[key] = entries[-1][0].decode()
        self._check_counter(key, entries)
        messages = []
        for entry in entries:
            try:
                messages.append(decode_entry(entry))
            except Exception as exc:  # not written by our publish script: skip it, not the batch
                self._failed(exc)
        self.messages_read += len(messages)
        counts = self.read_by_channel
        for msg in messages:
            counts[msg.channel] = counts.get(msg.channel, 0) + 1
        try:
            self.on_messages(messages)
        except Exception as exc:  # a bug in dispatch must not stop the relay
            self._failed(exc)

    def _check_counter(self, key: str, entries: list[tuple[bytes, dict[bytes, bytes]]]) -> None:
        """Resynchronise the shard if its publish counter did not go on from the last entry read. Entries
        without one (from an older publisher) are not counted, so they neither break the chain nor show gaps."""
        first = next((n for n in (_counter(f) for _, f in entries) if n is not None), None)
        if first is None:
            return
        last = self.counters.get(key)
        self.counters[key] = next(n for n in (_counter(f) for _, f in reversed(entries)) if n is not None)
        if last is None or first == last + 1:
            return
        self.gaps += 1
        lost = f"{first - last - 1} messages" if first > last else "a lost tail (the counter went back)"
        log.warning(
            "shard %d: the live stream lost %s before this reader read them (it fell behind SIDECAR_LIVE_LEN=%d, "
            "or Redis lost data); resynchronising the shard's subscribers", self.shards[key], lost,
            self.settings.live_len,
        )  # fmt: skip
        if self.on_gap is not None:
            self.on_gap(self.shards[key])

    def _failed(self, exc: Exception) -> None:
        if self.on_error is not None:
            self.on_error(None, exc)
        else:
            log.error("skipped a stream entry: %s: %s", type(exc).__name__, exc)


def _counter(fields: dict[bytes, bytes]) -> int | None:
    n = fields.get(b"n")
    return int(n) if n is not None and n.isdigit() else None
