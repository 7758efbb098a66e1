"""The relay on a real Redis Cluster (3 masters + 3 replicas): a sidecar process with REDIS_URL naming the
cluster, real clients, and the cluster's failures made for real (kill -9, SIGSTOP, CLUSTER FAILOVER TAKEOVER,
a slot migrated with CLUSTER SETSLOT and MIGRATE).

The spine's guarantees are the tests of test_relay.py, run here with the cluster as their Redis; the rest is
what only a cluster can do to the reader.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import redis
import requests

from sidecar.config import Settings
from sidecar.core.protocol import shard_of, stream_key
from sidecar.core.slots import balanced_tags, key_slot
from sidecar.publish import Publisher
from sidecar.store import Store, connect
from tests.clients import Recorder, SSEClient, WSClient
from tests.cluster import ClusterNode, RedisClusterNodes
from tests.integration import test_relay as spine

pytestmark = pytest.mark.slow

SETTINGS = Settings()


# -- the spine, with the cluster as the Redis ------------------------------------------------------------------
@pytest.fixture
def redis_server(cluster_url: str) -> SimpleNamespace:
    """What the spine's tests take as their Redis: only its URL is used, and here it names the cluster."""
    return SimpleNamespace(url=cluster_url)


@pytest.fixture
def sidecar(cluster_url, sidecar_process):
    return sidecar_process(cluster_url)


@pytest.fixture
def pub(cluster_url: str) -> Iterator[Publisher]:
    publisher = Publisher.from_url(cluster_url)
    yield publisher
    publisher.close()


test_sse_messages_in_order_on_a_cluster = spine.test_sse_client_receives_messages_in_order_with_a_cursor
test_websocket_since_on_a_cluster = spine.test_websocket_resume_with_since_gets_exactly_what_was_missed
test_snapshot_then_changes_on_a_cluster = spine.test_subscribing_with_state_yields_a_snapshot_then_every_change
test_trimmed_resume_on_a_cluster = (
    spine.test_resume_after_trim_sends_snapshot_for_state_channels_and_reset_for_event_channels
)  # noqa: E501
test_another_epoch_on_a_cluster = spine.test_resume_from_another_epoch_is_a_gap
test_four_modes_on_a_cluster = spine.test_four_modes_deliver_what_the_protocol_says_for_one_diff


# -- helpers ---------------------------------------------------------------------------------------------------
def live_key(channel: str) -> str:
    return f"{SETTINGS.key_prefix}:{{{balanced_tags(SETTINGS.shards)[shard_of(channel, SETTINGS.shards)]}}}:live"


def master_of(cluster: RedisClusterNodes, channel: str) -> ClusterNode:
    return cluster.master_for_slot(key_slot(live_key(channel)))


def one_channel_per_master(cluster: RedisClusterNodes, prefix: str) -> list[str]:
    """A channel on each master, the masters in a fixed order (by address)."""
    found: dict[str, str] = {}
    i = 0
    while len(found) < len(cluster.masters()):
        channel = f"{prefix}:{i}"
        found.setdefault(master_of(cluster, channel).addr, channel)
        i += 1
    return [found[addr] for addr in sorted(found)]


def seqs(frames: list[dict], channel: str) -> list[int]:
    return spine.seqs(frames, channel)


class Stamped(list):
    """Frames as they arrive, each stamped with the wall-clock time it arrived at (`_at`)."""

    def append(self, frame: Any) -> None:
        frame["_at"] = time.time()
        super().append(frame)


class Timed(Recorder):
    frames = property(lambda self: self._frames, lambda self, value: setattr(self, "_frames", Stamped(value)))


class TimedSSE(Timed, SSEClient):
    pass


class TimedWS(Timed, WSClient):
    pass


def of_channel(client: Recorder, channel: str) -> list[dict]:
    kinds = ("message", "snapshot", "reset")
    return [f for f in client.frames if f.get("type") in kinds and f.get("channel") == channel]


def check_stream(frames: list[dict], start_seq: int | None = None) -> None:
    """No duplicate, no silent hole: each message follows the previous frame's seq, or a snapshot/reset does."""
    ids = [f["id"] for f in frames if f["type"] == "message"]
    assert len(ids) == len(set(ids)), "a message came twice"
    seq = start_seq
    for frame in frames:
        if frame["type"] == "message" and seq is not None:
            assert frame["seq"] == seq + 1, f"silent hole: seq {frame['seq']} after {seq}"
        seq = frame["seq"]


class Publishing:
    """One publisher thread per channel, a diff every `interval` s, until stop(): what Redis acknowledged,
    with when (a publish that failed is not retried: it is acknowledged or not, and a new one follows)."""

    def __init__(self, url: str, channels: list[str], interval: float = 0.02) -> None:
        self.acked: dict[str, list[tuple[int, str, int, float]]] = {c: [] for c in channels}  # (i, id, seq, at)
        self.errors = 0
        self._stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(url, c, interval), daemon=True) for c in channels]
        for thread in self.threads:
            thread.start()

    def _run(self, url: str, channel: str, interval: float) -> None:
        pub = Publisher.from_url(url, redis_socket_timeout=1.0)
        i = 0
        while not self._stop.is_set():
            try:
                p = pub.diff(channel, "tick", {"i": i}, data={"i": i})
                self.acked[channel].append((i, p.id, p.seq, time.time()))
            except redis.RedisError:
                self.errors += 1
                time.sleep(0.05)
            i += 1
            time.sleep(interval)
        pub.close()

    def stop(self) -> None:
        self._stop.set()
        for thread in self.threads:
            thread.join(10)


def history(url: str, channel: str) -> list[tuple[str, int]]:
    """(id, seq) of the channel's history in Redis now, oldest first."""
    client = connect(url, SETTINGS)
    try:
        return [(m.id, m.seq) for m in Store(client, SETTINGS).history(channel)]
    finally:
        client.close()


def covered(frames: list[dict], entry: tuple[str, int]) -> bool:
    """The entry was delivered, or a snapshot/reset at or past it stands for it."""
    stream_id, seq = entry
    return any(
        (f["type"] == "message" and f["id"] == stream_id) or (f["type"] != "message" and f["seq"] >= seq)
        for f in frames
    )


def wait_for(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"no {what} within {timeout:g} s"
        time.sleep(0.05)


def healthz(url: str) -> tuple[int, dict]:
    answer = requests.get(url + "/healthz", timeout=10)
    return answer.status_code, answer.json()


def ready_clients(url: str, channels: list[str], n: int) -> list[Recorder]:
    """`n` clients, half SSE and half WebSocket, each subscribed to every channel (diff mode)."""
    clients: list[Recorder] = []
    for k in range(n):
        if k % 2:
            ws = TimedWS(url.replace("http://", "ws://"))
            for channel in channels:
                ws.subscribe(channel)
            clients.append(ws)
        else:
            clients.append(TimedSSE(url, channels))
    for c in clients:
        if isinstance(c, WSClient):
            c.wait(lambda f, c=c: len(c.of_type("subscribed")) == len(channels), timeout=30)
        else:
            c.wait(lambda f, c=c: any(x.get("type") == "ready" for x in f), timeout=30)
    return clients


# -- across masters ---------------------------------------------------------------------------------------------
def test_sse_resume_by_last_event_id_alone_across_shards_on_three_masters(redis_cluster, sidecar, pub):
    channels = one_channel_per_master(redis_cluster, "masters")
    assert len({master_of(redis_cluster, c).addr for c in channels}) == 3
    spine.sse_resume_by_cursor_alone(sidecar, pub, channels, 30)
    status, body = healthz(sidecar.url)
    assert status == 200 and body["stuck"] == [] and len(body["shards"]) == SETTINGS.shards


# -- failover ---------------------------------------------------------------------------------------------------
def test_a_killed_master_costs_its_clients_nothing_acknowledged_that_survived_and_no_silent_hole(
    redis_cluster, cluster_url, sidecar_process
):
    sidecar = sidecar_process(cluster_url)
    channels = one_channel_per_master(redis_cluster, "kill")
    victim_channel = channels[0]
    victim = master_of(redis_cluster, victim_channel)
    others = channels[1:]
    clients = ready_clients(sidecar.url, channels, 50)
    publishing = Publishing(cluster_url, channels)
    try:
        wait_for(lambda: all(len(c.messages(victim_channel)) >= 20 for c in clients), 20, "traffic")
        killed_at = time.time()
        victim.kill()
        redis_cluster.wait_promoted(victim)
        promoted_at = time.time()
        wait_for(lambda: any(at > promoted_at + 2 for *_, at in publishing.acked[victim_channel]), 20,
                 "publishes on the promoted master")  # fmt: skip
    finally:
        publishing.stop()
    last = {c: publishing.acked[c][-1] for c in channels}

    def caught_up(client: Recorder) -> bool:
        return all(covered(of_channel(client, c), (last[c][1], last[c][2])) for c in channels)

    wait_for(lambda: all(caught_up(c) for c in clients), 20, "client catching up")
    time.sleep(0.3)  # a duplicate would arrive now

    survived = {c: history(cluster_url, c) for c in channels}
    after_kill = {i for i, _, _, at in publishing.acked[victim_channel] if at > killed_at}
    recovery, other_delays = [], []
    for client in clients:
        for channel in channels:
            frames = of_channel(client, channel)
            check_stream(frames, start_seq=0)
            missing = [e for e in survived[channel] if not covered(frames, e)]
            assert not missing, f"{channel}: acknowledged messages that survived never came: {missing[:3]}"
        for channel in others:  # untouched shards: every acknowledged message, nothing else
            frames = of_channel(client, channel)
            assert [f["id"] for f in frames] == [a[1] for a in publishing.acked[channel]]
            other_delays += [f["_at"] - f["ts"] / 1000 for f in frames if f["ts"] / 1000 > killed_at]
        live_again = [f["_at"] for f in of_channel(client, victim_channel)
                      if f["type"] == "message" and f["data"]["i"] in after_kill]  # fmt: skip
        assert live_again, "a client of the failed shard never heard it again"
        recovery.append(min(live_again) - killed_at)
    print(
        f"\nfailover: promoted {promoted_at - killed_at:.2f} s after the kill; clients of the shard live again "
        f"p50 {statistics.median(recovery):.2f} s, max {max(recovery):.2f} s; other shards' delivery delay "
        f"max {max(other_delays):.3f} s; publish errors {publishing.errors}"
    )
    assert max(other_delays) < 1.0  # the other masters' shards go on while one fails over
    for client in clients:
        client.close()


def test_a_lossy_failover_gives_a_snapshot_or_reset_never_a_resume_across_the_loss(
    redis_cluster, cluster_url, sidecar_process
):
    sidecar = sidecar_process(cluster_url)
    channel, other = one_channel_per_master(redis_cluster, "lossy")[:2]
    master = master_of(redis_cluster, channel)
    replica = redis_cluster.replica_of(master)
    pub = Publisher.from_url(cluster_url)
    ws = WSClient(sidecar.ws_url)
    ws.subscribe(channel)
    ws.subscribe(other)
    events = SSEClient(sidecar.url, [channel], mode="event")
    ws.wait(lambda f: len(ws.of_type("subscribed")) == 2)
    events.wait(lambda f: any(x.get("type") == "ready" for x in f))
    for i in range(3):
        pub.diff(channel, "tick", {"i": i}, data={"i": i})
    pub.diff(other, "tick", {"i": 0})
    offset = lambda node: int(node.info("replication")["master_repl_offset"])  # noqa: E731
    wait_for(lambda: offset(replica) == offset(master), 10, "replica in sync")

    # The replica stops replicating: paused, and its link cut (else the kernel would buffer the stream for it).
    # What the master acknowledges now exists only there.
    replica.pause()
    master.command("CLIENT", "KILL", "TYPE", "slave")
    for i in range(3, 8):
        pub.diff(channel, "tick", {"i": i}, data={"i": i})
    ws.wait(lambda f: len(ws.messages(channel)) == 8)
    events.wait(lambda f: len(events.messages(channel)) == 8)
    cursor, seen = events.last_id, ws.messages(channel)[-1]
    # The master dies before the replica runs again: killing a server resumes it first (a paused one too), and a
    # replica running by then could reconnect in that moment and get the tail (a partial resync: nothing lost).
    master.kill()
    replica.resume()
    redis_cluster.take_over(replica, master, slot=key_slot(live_key(channel)))
    assert master_of(redis_cluster, channel).addr == replica.addr
    newest = replica.command("XREVRANGE", live_key(channel), "+", "-", "COUNT", "1")
    assert stream_key(newest[0][0].decode()) < stream_key(ws.messages(channel)[3]["id"]), "the failover lost nothing"

    # Without a publish: the watchdog finds the stream's head behind the reader and resyncs the shard.
    ws.wait(lambda f: ws.of_type("snapshot"), timeout=15)
    events.wait(lambda f: events.of_type("reset"), timeout=15)
    snapshot, reset = ws.of_type("snapshot")[-1], events.of_type("reset")[-1]
    assert (snapshot["channel"], snapshot["seq"], snapshot["state"]) == (channel, 3, {"i": 2})
    assert (reset["channel"], reset["seq"]) == (channel, 3)
    pub.diff(channel, "tick", {"i": 8}, data={"i": 8})
    ws.wait(lambda f: ws.messages(channel)[-1]["data"]["i"] == 8)
    events.wait(lambda f: events.messages(channel)[-1]["data"]["i"] == 8)
    for client in (ws, events):
        frames = of_channel(client, channel)
        assert [(f["type"], f["seq"]) for f in frames] == [("message", s) for s in range(1, 9)] + [
            (frames[8]["type"], 3), ("message", 4)]  # fmt: skip
    assert not [f for f in of_channel(ws, other) if f["type"] != "message"]  # the other master lost nothing

    # A client coming back with a position Redis has lost is not resumed from it either.
    back = SSEClient(sidecar.url, [channel], mode="event", last_event_id=cursor)
    back.wait(lambda f: back.of_type("reset"))
    assert back.of_type("reset")[0]["reason"] == "gap" and not back.messages()
    ws2 = WSClient(sidecar.ws_url)
    ws2.subscribe(channel, since=seen["id"], epoch=seen["epoch"])
    ws2.wait(lambda f: ws2.of_type("snapshot"))
    assert ws2.of_type("snapshot")[0]["reason"] == "gap" and ws2.of_type("snapshot")[0]["state"] == {"i": 8}
    assert not ws2.messages()
    metrics = requests.get(sidecar.url + "/metrics", timeout=5).text
    assert "sidecar_reader_lost_tails_total 1.0" in metrics.splitlines()
    for client in (ws, events, back, ws2):
        client.close()
    pub.close()


# -- the watchdog -----------------------------------------------------------------------------------------------
def test_a_reader_deaf_on_a_paused_master_turns_healthz_unready_and_recovers_by_itself(
    redis_cluster, cluster_url, sidecar_process
):
    stall = 3.0
    # The reads' socket timeout is far beyond the test: only the watchdog can end a read blocked on the paused node.
    sidecar = sidecar_process(cluster_url, SIDECAR_READER_STALL=str(stall), SIDECAR_REDIS_SOCKET_TIMEOUT="60")
    channel, other = one_channel_per_master(redis_cluster, "deaf")[:2]
    master = master_of(redis_cluster, channel)
    ws = WSClient(sidecar.ws_url)
    ws.subscribe(channel, mode="event")
    ws.subscribe(other, mode="event")
    ws.wait(lambda f: len(ws.of_type("subscribed")) == 2)
    publishing = Publishing(cluster_url, [channel, other], interval=0.1)
    answers: list[tuple[float, int, dict]] = []  # /healthz every 0.1 s from before the pause: (when, status, body)
    polling = threading.Event()

    def poll() -> None:
        while not polling.is_set():
            status, body = healthz(sidecar.url)
            answers.append((time.time(), status, body))
            time.sleep(0.1)

    poller = threading.Thread(target=poll, daemon=True)
    try:
        ws.wait(lambda f: len(ws.messages(channel)) >= 5)
        poller.start()
        paused_at = time.time()
        master.pause()  # its sockets stay open: the reader's blocked XREAD on it just never answers
        # Its replica takes over; then the publisher's messages reach the stream again, on the new master.
        wait_for(lambda: any(at > paused_at for *_, at in publishing.acked[channel]), 30, "the replica promoted")
        wait_for(lambda: any(s == 503 for _, s, _ in answers), stall + 10, "healthz unready")
        unready_at, _, body = next(a for a in answers if a[1] == 503)
        assert body["stuck"] == [shard_of(channel, SETTINGS.shards)] and body["ok"] is False
        wait_for(lambda: answers[-1][0] > unready_at and answers[-1][1] == 200, 15, "healthz ready again")
        ready_at = time.time()
        wait_for(lambda: any(a[3] > ready_at for a in publishing.acked[channel]), 10, "a publish after recovery")
    finally:
        polling.set()
        publishing.stop()
        master.kill()
    assert all(s == 200 for t, s, _ in answers if t < paused_at)
    # The bound: from the first message on the promoted master (the stream moving on), the stall, plus up to
    # three watchdog rounds (each may first wait out a 1 s timeout on the paused node).
    moved_on = min(at for *_, at in publishing.acked[channel] if at > paused_at)
    promoted, unready = moved_on - paused_at, unready_at - moved_on
    assert unready <= stall + 3 * 2
    last = publishing.acked[channel][-1]
    ws.wait(lambda f: covered(of_channel(ws, channel), (last[1], last[2])), timeout=15)
    frames = of_channel(ws, channel)
    check_stream(frames, start_seq=0)
    survived = history(cluster_url, channel)
    assert all(covered(frames, e) for e in survived)
    metrics = requests.get(sidecar.url + "/metrics", timeout=5).text
    kicks = [line for line in metrics.splitlines() if line.startswith("sidecar_reader_watchdog_reconnects_total")]
    assert kicks and float(kicks[0].split()[-1]) >= 1
    print(f"\nwatchdog: the stream moved on {promoted:.2f} s after the pause; /healthz unready {unready:.2f} s "
          "after that")  # fmt: skip
    ws.close()


# -- slot migration ---------------------------------------------------------------------------------------------
def migrate_slot(cluster: RedisClusterNodes, slot: int, source: ClusterNode, target: ClusterNode) -> None:
    """Move `slot` and its keys from `source` to `target`, as redis-cli --cluster reshard does."""
    source_id, target_id = source.node_id, target.node_id
    target.command("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
    source.command("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
    while keys := source.command("CLUSTER", "GETKEYSINSLOT", slot, 100):
        source.command("MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "KEYS", *keys)  # type: ignore[misc]
    for node in cluster.masters():
        node.command("CLUSTER", "SETSLOT", slot, "NODE", target_id)


def test_a_slot_migrated_to_another_master_during_traffic_loses_and_doubles_nothing(
    redis_cluster, cluster_url, sidecar_process
):
    sidecar = sidecar_process(cluster_url)
    channel, other = one_channel_per_master(redis_cluster, "moving")[:2]
    source, target = master_of(redis_cluster, channel), master_of(redis_cluster, other)
    clients = ready_clients(sidecar.url, [channel, other], 6)
    publishing = Publishing(cluster_url, [channel, other])
    try:
        wait_for(lambda: all(len(c.messages(channel)) >= 10 for c in clients), 20, "traffic")
        migrate_slot(redis_cluster, key_slot(live_key(channel)), source, target)
        assert master_of(redis_cluster, channel).addr == target.addr
        time.sleep(2)
    finally:
        publishing.stop()
    for c in (channel, other):
        last = publishing.acked[c][-1]
        entry = (last[1], last[2])
        wait_for(lambda c=c, e=entry: all(covered(of_channel(x, c), e) for x in clients), 20, "catching up")
    time.sleep(0.3)
    for client in clients:
        for c in (channel, other):
            frames = of_channel(client, c)
            check_stream(frames, start_seq=0)
            # nothing was lost: every acknowledged message came, as a message, once
            assert [f["type"] for f in frames] == ["message"] * len(frames)
            assert [f["id"] for f in frames] == [a[1] for a in publishing.acked[c]]
    for client in clients:
        client.close()
