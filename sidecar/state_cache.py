"""The pull endpoint's cache: N pulls of one channel version cost one Redis read, however they arrive.

A poke makes every subscriber pull the channel's state. Two things keep that off Redis:
- single flight: concurrent pulls of one (channel, version) share one read;
- a cache per channel, valid while this replica's hub has subscribers on the channel and has seen no message
  newer than the cached state (the hub sees every message of a channel it has subscribers for). Without local
  subscribers there is no such knowledge, so only single flight applies.

`get` is the gevent front's whole pull. The asyncio front runs the same three steps with its own flights
(sidecar/asgi/): `cached` and `keep` on the event loop, `read` in the runtime's pool.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import orjson

from sidecar.core.hub import ChannelRecord, Hub
from sidecar.core.protocol import ZERO_KEY, StreamKey, stream_key
from sidecar.store import Snapshot, Store

Pulled = tuple[str, bytes] | None  # (ETag, JSON body), or None: nothing was ever published on the channel


@dataclass
class _Entry:
    record: ChannelRecord
    epoch: str
    key: StreamKey
    result: Pulled


class _Flight:
    def __init__(self) -> None:
        self.done = threading.Event()
        self.result: Pulled = None
        self.failed = False


class StateCache:
    def __init__(self, store: Store, hub: Hub, wait: float, size: int = 1024) -> None:
        self.store = store
        self.hub = hub
        self.wait = wait  # seconds a pull waits for another's read before reading itself
        self.size = size
        self.reads = 0  # Redis reads made, ever
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._flights: dict[tuple[Any, ...], _Flight] = {}

    def cached(self, channel: str) -> tuple[bool, Pulled, tuple[Any, ...], ChannelRecord | None]:
        """(hit, what to answer if hit, the version a flight for it is keyed by, the channel's hub record)."""
        record = self.hub.channels.get(channel)
        entry = self._entries.get(channel)
        if entry is not None and record is not None and entry.record is record and _current(entry, record):
            self._entries.move_to_end(channel)
            return True, entry.result, (), record
        # A pull that comes after a newer message must not share a read started before it.
        version = (channel, id(record), record.epoch, record.last) if record is not None else (channel,)
        return False, None, version, record

    def get(self, channel: str) -> Pulled:
        hit, result, version, record = self.cached(channel)
        if hit:
            return result
        flight = self._flights.get(version)
        if flight is not None and flight.done.wait(self.wait) and not flight.failed:
            return flight.result
        flight = self._flights[version] = _Flight()
        try:
            flight.result = self._read(channel, record)
            return flight.result
        except BaseException:
            flight.failed = True
            raise
        finally:
            if self._flights.get(version) is flight:
                del self._flights[version]
            flight.done.set()

    def _read(self, channel: str, record: ChannelRecord | None) -> Pulled:
        return self.keep(channel, record, self.read(channel))

    def read(self, channel: str) -> Snapshot | None:
        """The Redis read (any thread)."""
        return self.store.snapshot(channel)

    def keep(self, channel: str, record: ChannelRecord | None, snap: Snapshot | None) -> Pulled:
        """What a read gives the pull, cached if the hub's record of the channel is still the one read for."""
        self.reads += 1
        if snap is None:
            result: Pulled = None
            epoch, key = "", ZERO_KEY
        else:
            body = {"channel": channel, "id": snap.id, "seq": snap.seq, "epoch": snap.epoch, "state": snap.state}
            result = (f'"{snap.epoch}:{snap.id}"', orjson.dumps(body))
            epoch, key = snap.epoch, stream_key(snap.id)
        if record is not None and self.hub.channels.get(channel) is record:
            self._entries[channel] = _Entry(record, epoch, key, result)
            self._entries.move_to_end(channel)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)
        return result


def _current(entry: _Entry, record: ChannelRecord) -> bool:
    """Whether the hub has seen nothing newer than the entry since it was read (while it had subscribers)."""
    return record.last == ZERO_KEY or (record.epoch == entry.epoch and record.last <= entry.key)
