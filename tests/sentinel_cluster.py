"""A Redis Sentinel deployment of real processes for tests and benchmarks: a master,
two replicas and three Sentinels on loopback, configured as compose.ha.yaml's
(min-replicas-to-write 1, an append-only file, noeviction), with a short
down-after so that a failover takes seconds, not the default half-minute."""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

from tests import processes

MASTER_NAME = "hive"
#: Sentinels call a master down after this long without an answer (default 30 s).
DOWN_AFTER_MS = 1000


@dataclass
class SentinelCluster:
    log_dir: Path
    data_dir: Path
    nodes: dict[int, processes.Proc] = field(default_factory=dict)  # port → redis-server
    sentinels: dict[int, processes.Proc] = field(default_factory=dict)
    #: The hive and worker started by ``serve``: stopped first.
    clients: list[processes.Proc] = field(default_factory=list)

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.sentinels)
        return f"redis+sentinel://{hosts}/{MASTER_NAME}/0"

    def start(self) -> "SentinelCluster":
        ports = [processes.free_port() for _ in range(3)]
        master = ports[0]
        for port in ports:
            self._start_node(port, replica_of=None if port == master else master)
        for port in ports[1:]:
            processes.wait_until(lambda p=port: _role(p) == ("slave", "up"), 20, f"replica {port}", tuple(self.nodes.values()))
        for _ in range(3):
            port = processes.free_port()
            config = self.data_dir / f"sentinel-{port}.conf"
            config.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {self.data_dir}\n"
                f"sentinel monitor {MASTER_NAME} 127.0.0.1 {master} 2\n"
                f"sentinel down-after-milliseconds {MASTER_NAME} {DOWN_AFTER_MS}\n"
                f"sentinel failover-timeout {MASTER_NAME} 10000\n"
                f"sentinel parallel-syncs {MASTER_NAME} 1\n"
            )
            self.sentinels[port] = processes.start(f"sentinel-{port}", [_exe(), str(config), "--sentinel"], self.log_dir)
        # Ready once every Sentinel knows both replicas and the other two Sentinels.
        for port in self.sentinels:
            processes.wait_until(lambda p=port: self._sentinel_ready(p), 30, f"sentinel {port}", tuple(self.sentinels.values()))
        return self

    def _start_node(self, port: int, replica_of: int | None) -> None:
        node_dir = self.data_dir / f"node-{port}"
        node_dir.mkdir(exist_ok=True)
        command = [
            _exe(), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(node_dir), "--save", "",
            "--appendonly", "yes", "--maxmemory-policy", "noeviction",
            "--min-replicas-to-write", "1", "--min-replicas-max-lag", "10", "--repl-diskless-sync-delay", "0",
        ]
        if replica_of is not None:
            command += ["--replicaof", "127.0.0.1", str(replica_of)]
        self.nodes[port] = processes.start(f"redis-{port}-{time.monotonic_ns()}", command, self.log_dir)
        client = redis.Redis(port=port)
        processes.wait_until(client.ping, 10, f"redis-server {port}", (self.nodes[port],))
        client.close()

    def _sentinel_ready(self, port: int) -> bool:
        with redis.Redis(port=port, decode_responses=True) as client:
            state = client.sentinel_master(MASTER_NAME)
        return int(state["num-slaves"]) == 2 and int(state["num-other-sentinels"]) == 2

    def master_port(self) -> int:
        """The master as the Sentinels see it now."""
        with redis.Redis(port=next(iter(self.sentinels)), decode_responses=True) as client:
            return int(client.sentinel_get_master_addr_by_name(MASTER_NAME)[1])

    def kill_master(self) -> int:
        """SIGKILLs the master (it loses whatever it had not yet replicated) and
        returns its port."""
        port = self.master_port()
        self.nodes[port].process.kill()
        self.nodes[port].process.wait()
        return port

    def wait_for_new_master(self, old: int, timeout_s: float = 30) -> int:
        processes.wait_until(lambda: self.master_port() != old and _role(self.master_port())[0] == "master", timeout_s, "a failover")
        return self.master_port()

    def failover(self) -> int:
        """A Sentinel-run failover with every node up (SENTINEL FAILOVER): the old
        master is demoted to a replica, which is when it answers its blocked
        clients with UNBLOCKED and its writers with READONLY. Returns the new master."""
        old = self.master_port()
        with redis.Redis(port=next(iter(self.sentinels))) as client:
            client.sentinel_failover(MASTER_NAME)
        new = self.wait_for_new_master(old)
        # Until the Sentinels have demoted it, the old master still takes writes (and
        # loses them when it resyncs as a replica): Redis's replication is asynchronous,
        # and docs/high-availability.md says so. Done once it is a replica of the new master.
        processes.wait_until(lambda: _role(old) == ("slave", "up"), 30, "the old master demoted")
        return new

    def serve(
        self, hub_url: str, hf_home: Path, name: str = "sentinel", hive_args: tuple[str, ...] = (), worker_args: tuple[str, ...] = ()
    ) -> tuple[str, processes.Proc, processes.Proc]:
        """A `hive serve` and a CPU `hive worker` on this deployment's Sentinel URL,
        returned once the hive lists the worker: (the hive's URL, the hive, the worker)."""
        port = processes.free_port()
        url = f"http://127.0.0.1:{port}"
        hive = processes.start(f"hive-{name}", processes.hive_command("serve", "--redis-url", self.url, "--port", str(port), *hive_args), self.log_dir)
        self.clients.append(hive)
        worker = processes.start(
            f"worker-{name}",
            processes.hive_command("worker", "--redis-url", self.url, "--device", "cpu", *worker_args),
            self.log_dir,
            env={"HF_ENDPOINT": hub_url, "HF_HOME": str(hf_home)},
        )
        self.clients.append(worker)
        processes.wait_until(lambda: processes.health(url).get("workers") == 1, processes.STARTUP_TIMEOUT_S, "hive and worker", (hive, worker))
        return url, hive, worker

    def stop(self) -> None:
        for proc in (*reversed(self.clients), *self.sentinels.values(), *self.nodes.values()):
            proc.stop()


def _role(port: int) -> tuple[str, str]:
    """(role, replication link state) of the node on ``port``."""
    with redis.Redis(port=port, decode_responses=True, socket_timeout=2) as client:
        info = client.info("replication")
    return info["role"], info.get("master_link_status", "")


def _exe() -> str:
    exe = shutil.which("redis-server")
    if exe is None:
        raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
    return exe
