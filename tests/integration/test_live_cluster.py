"""SIDECAR_LIVE_READ=channels on the real 3+3 Redis Cluster: the spine's guarantees, a master killed (-9) under
50 clients, a lossy failover, and a pub/sub connection whose node dies. The tests are test_cluster_relay.py's,
run with every sidecar in channels mode; only what differs in this mode is written here."""

from __future__ import annotations

import time

import pytest

from tests.clients import WSClient
from tests.integration import test_cluster_relay as on_cluster
from tests.integration.test_cluster_relay import (  # noqa: F401  (fixtures and tests, run here in channels mode)
    Publishing,
    healthz,
    history,
    of_channel,
    one_channel_per_master,
    redis_server,
    test_a_killed_master_costs_its_clients_nothing_acknowledged_that_survived_and_no_silent_hole,
    test_a_lossy_failover_gives_a_snapshot_or_reset_never_a_resume_across_the_loss,
    test_another_epoch_on_a_cluster,
    test_four_modes_on_a_cluster,
    test_snapshot_then_changes_on_a_cluster,
    test_sse_messages_in_order_on_a_cluster,
    test_trimmed_resume_on_a_cluster,
    test_websocket_since_on_a_cluster,
    wait_for,
)
from tests.integration.test_live_channels import CHANNELS

pytestmark = pytest.mark.slow
sidecar, pub = on_cluster.sidecar, on_cluster.pub  # the cluster's fixtures, by these names


@pytest.fixture
def sidecar_process(sidecar_process):
    def start(redis_url: str, **env: str):
        return sidecar_process(redis_url, **{**CHANNELS, **env})

    return start


def test_sse_resume_by_last_event_id_alone_across_three_masters_in_channels_mode(redis_cluster, sidecar, pub):
    channels = one_channel_per_master(redis_cluster, "masters")
    on_cluster.spine.sse_resume_by_cursor_alone(sidecar, pub, channels, 30)
    status, body = healthz(sidecar.url)
    assert status == 200 and body["shards"] == []  # no shard is read in this mode


def pubsub_node(cluster):
    """The node that holds the sidecar's pub/sub connection (CLIENT LIST of every node)."""
    for node in cluster.live_nodes():
        for line in node.client().execute_command("CLIENT", "LIST", "TYPE", "pubsub").decode().splitlines():
            fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
            if int(fields.get("sub", 0)) > 0:
                return node
    return None


def test_the_node_holding_the_pubsub_connection_killed_costs_the_other_masters_clients_nothing(
    redis_cluster, cluster_url, sidecar_process
):
    sidecar = sidecar_process(cluster_url)
    channels = one_channel_per_master(redis_cluster, "pubnode")
    ws = WSClient(sidecar.ws_url)
    for channel in channels:
        ws.subscribe(channel)
    ws.wait(lambda f: len(ws.of_type("subscribed")) == 3)
    holder = pubsub_node(redis_cluster)
    assert holder is not None
    publishing = Publishing(cluster_url, channels)
    try:
        wait_for(lambda: all(len(ws.messages(c)) >= 10 for c in channels), 20, "traffic")
        was_master = holder.role() == "master"
        holder.kill()
        if was_master:
            redis_cluster.wait_promoted(holder)
        time.sleep(2)
    finally:
        publishing.stop()
    for channel in channels:
        last = publishing.acked[channel][-1]
        wait_for(lambda c=channel, s=last[2]: any(f["seq"] >= s for f in of_channel(ws, c)), 20, "catch-up")
    time.sleep(0.3)
    for channel in channels:
        frames = of_channel(ws, channel)
        on_cluster.check_stream(frames, start_seq=0)
        survived = history(cluster_url, channel)
        assert all(on_cluster.covered(frames, e) for e in survived)
    ws.close()


def test_a_paused_node_holding_the_pubsub_connection_is_found_by_the_liveness_probe(
    redis_cluster, cluster_url, sidecar_process
):
    sidecar = sidecar_process(cluster_url)
    channels = one_channel_per_master(redis_cluster, "probe")
    ws = on_cluster.TimedWS(sidecar.ws_url)
    for channel in channels:
        ws.subscribe(channel)
    ws.wait(lambda f: len(ws.of_type("subscribed")) == 3)
    holder = pubsub_node(redis_cluster)
    assert holder is not None
    flowing = [c for c in channels if on_cluster.master_of(redis_cluster, c).addr != holder.addr]
    publishing = Publishing(cluster_url, flowing)
    try:
        wait_for(lambda: all(len(ws.messages(c)) >= 5 for c in flowing), 20, "traffic")
        holder.pause()  # its connections stay open and say nothing: a deaf pub/sub connection
        try:
            paused_at = time.time()
            # The position check already brings the other masters' messages from history, late; the probe must
            # also find the connection deaf and move it to another node (the node is still paused).
            wait_for(lambda: "liveness probe" in sidecar.log_text(), 10, "the liveness probe's reconnect")
            found = time.time() - paused_at
            wait_for(lambda: sidecar.log_text().count("live pub/sub connected") > 1, 10, "a reconnect")
            later = time.time()
            heard = lambda c: any(f["ts"] / 1000 > later for f in of_channel(ws, c))  # noqa: E731
            wait_for(lambda: all(heard(c) for c in flowing), 10, "messages published after the reconnect")
        finally:
            holder.resume()
    finally:
        publishing.stop()
    for channel in flowing:
        last = publishing.acked[channel][-1]
        wait_for(lambda c=channel, i=last[1]: any(f["id"] == i for f in of_channel(ws, c)), 10, "the last message")
    time.sleep(0.3)
    for channel in flowing:  # every acknowledged message once, in order, none replaced by a snapshot
        assert [f["id"] for f in of_channel(ws, channel)] == [a[1] for a in publishing.acked[channel]]
    print(f"\nliveness probe: the deaf connection found {found:.2f} s after the pause")
    ws.close()
