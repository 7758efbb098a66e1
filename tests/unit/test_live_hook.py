"""The hub's channel hook (a channel got its first local subscriber / lost its last) and the live payload's
decoding: what the channels-mode reader (SIDECAR_LIVE_READ=channels) builds on."""

from __future__ import annotations

import orjson
import pytest

from sidecar.core.connection import SSE, WS, Connection
from sidecar.core.hub import Hub
from sidecar.store import decode_published


def test_the_hook_fires_once_for_a_channels_first_subscriber_and_once_after_its_last():
    hub, calls = Hub(), []
    hub.on_channel = lambda channel, wanted: calls.append((channel, wanted))
    a, b = hub.connect(Connection(SSE, lambda: None)), hub.connect(Connection(WS, lambda: None))
    hub.subscribe(a, "c:1", "diff")
    hub.subscribe(b, "c:1", "event")
    hub.subscribe(a, "c:1", "state")  # a re-subscribe in another mode is not a new channel
    hub.subscribe(b, "c:2", "diff")
    assert calls == [("c:1", True), ("c:2", True)]
    hub.unsubscribe(a, "c:1")
    assert calls[2:] == []
    hub.disconnect(b)
    assert sorted(calls[2:]) == [("c:1", False), ("c:2", False)]


def test_a_published_live_entry_decodes_to_the_message_and_its_shard_counter():
    payload = orjson.dumps(["1700000000000-3", "42", "c", "a:1", "k", "diff", "e", "ev", "s", "7", "ep", "ab12",
                            "t", "1.5", "d", '{"x":"\u00e9/"}', "x", '{"n":1}'])  # fmt: skip
    n, msg = decode_published(payload)
    assert n == 42
    assert (msg.channel, msg.id, msg.seq, msg.epoch) == ("a:1", "1700000000000-3", 7, "ab12")
    assert (msg.kind, msg.ts) == ("diff", 1.5)
    assert orjson.loads(msg.data) == {"x": "\u00e9/"} and msg.change == b'{"n":1}'


@pytest.mark.parametrize("payload", [b"{}", b'["1-0"]', b'["1-0", "1", "c"]', b'["1-0", 1, "c", "a"]', b"nope"])
def test_a_payload_not_written_by_the_publish_script_is_refused(payload):
    with pytest.raises((ValueError, KeyError)):
        decode_published(payload)
