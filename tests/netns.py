"""A small network of Linux network namespaces, one per "host", for tests that must
not share a loopback: a bridge in the root namespace with a veth pair per host, and
point-to-point links between two hosts that nobody else can route to.

Each host's loopback stays down, so a process that dials 127.0.0.1 fails instead of
quietly reaching a neighbour. Processes run as ``ip netns exec <ns> unshare --uts``
with the host's name as their hostname (a worker names itself after it). Needs root
and iproute2; ``Network.probe`` says why not where the machine does not allow it.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tests import processes


class NetnsUnavailable(Exception):
    """The machine cannot build the network (not root, no iproute2, no veth or bridge)."""


def ip(*args: str) -> str:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)
    if result.returncode != 0:
        raise subprocess.CalledProcessError(result.returncode, ["ip", *args], result.stdout, result.stderr)
    return result.stdout


@dataclass
class Host:
    name: str
    netns: str
    address: str  # on the bridge
    veth: str  # the root namespace's end of its link to the bridge


def _free_subnet() -> ipaddress.IPv4Network:
    """A random 10.x.y.0/24 that no route of the root namespace covers (runs may overlap in time)."""
    taken = []
    for line in ip("-4", "route").splitlines():
        dest = line.split()[0]
        if dest != "default":
            taken.append(ipaddress.ip_network(dest, strict=False))
    while True:
        subnet = ipaddress.ip_network(f"10.{secrets.randbelow(190) + 64}.{secrets.randbelow(256)}.0/24")
        if not any(subnet.overlaps(t) for t in taken):
            return subnet


def listening_on(host: Host) -> list[str]:
    """The local addresses (``ip:port``) of the host's listening TCP sockets."""
    out = subprocess.run(["ip", "netns", "exec", host.netns, "ss", "-ltnH"], capture_output=True, text=True, check=True, timeout=10)
    return [line.split()[3] for line in out.stdout.splitlines()]


def connected_to(host: Host) -> set[str]:
    """The remote addresses (``ip:port``) of the host's established TCP connections."""
    command = ["ip", "netns", "exec", host.netns, "ss", "-tnH", "state", "established"]
    out = subprocess.run(command, capture_output=True, text=True, check=True, timeout=10)
    return {line.split()[-1] for line in out.stdout.splitlines()}


class Network:
    """The bridge takes the /24's lower half (the root namespace, where the test runs, is
    .1 on it); point-to-point links take /30s from its upper half."""

    def __init__(self) -> None:
        self.tag = "hv" + secrets.token_hex(3)  # interface names: at most 15 characters
        subnet = _free_subnet()
        self._bridge_net, upper = subnet.subnets()
        self._bridge_ips = self._bridge_net.hosts()
        self._p2p = upper.subnets(new_prefix=30)
        self.bridge = f"{self.tag}br"
        self.hosts: dict[str, Host] = {}
        self._namespaces: list[str] = []
        self._procs: list[processes.Proc] = []
        self._links = 0

    @staticmethod
    def probe() -> None:
        """Raises NetnsUnavailable, with the reason, where namespaces cannot be built."""
        if os.geteuid() != 0:
            raise NetnsUnavailable("network namespaces need root")
        if shutil.which("ip") is None or shutil.which("unshare") is None:
            raise NetnsUnavailable("iproute2's ip or util-linux's unshare is not installed")
        name = f"hvprobe{os.getpid()}"
        try:
            ip("netns", "add", name)
            ip("-n", name, "link", "add", "p0", "type", "veth", "peer", "name", "p1")
            ip("-n", name, "link", "add", "b0", "type", "bridge")
        except subprocess.CalledProcessError as e:
            raise NetnsUnavailable(f"`{' '.join(e.cmd)}` failed: {e.stderr.strip()}") from e
        finally:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)

    def start(self) -> None:
        ip("link", "add", self.bridge, "type", "bridge")
        ip("addr", "add", f"{next(self._bridge_ips)}/{self._bridge_net.prefixlen}", "dev", self.bridge)
        ip("link", "set", self.bridge, "up")

    def add_host(self, name: str) -> Host:
        netns = f"{self.tag}-{name}"
        ip("netns", "add", netns)
        self._namespaces.append(netns)
        veth = f"{self.tag}v{len(self.hosts)}"
        address = str(next(self._bridge_ips))
        ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", netns)
        ip("link", "set", veth, "master", self.bridge, "up")
        ip("-n", netns, "addr", "add", f"{address}/{self._bridge_net.prefixlen}", "dev", "eth0")
        ip("-n", netns, "link", "set", "eth0", "up")
        host = self.hosts[name] = Host(name, netns, address, veth)
        return host

    def add_private_host(self, name: str, via: Host) -> Host:
        """A host off the bridge, linked to ``via`` alone: no other host has a route to it."""
        netns = f"{self.tag}-{name}"
        ip("netns", "add", netns)
        self._namespaces.append(netns)
        near, far = list(next(self._p2p).hosts())
        self._links += 1
        ip("-n", via.netns, "link", "add", f"p2p{self._links}", "type", "veth", "peer", "name", "eth0", "netns", netns)
        ip("-n", via.netns, "addr", "add", f"{near}/30", "dev", f"p2p{self._links}")
        ip("-n", via.netns, "link", "set", f"p2p{self._links}", "up")
        ip("-n", netns, "addr", "add", f"{far}/30", "dev", "eth0")
        ip("-n", netns, "link", "set", "eth0", "up")
        host = self.hosts[name] = Host(name, netns, str(far), "")
        return host

    def start_process(self, host: Host, name: str, command: list[str], log_dir: Path, env: dict | None = None) -> processes.Proc:
        """Runs ``command`` on ``host``, with the host's name as its hostname."""
        wrapped = ["ip", "netns", "exec", host.netns, "unshare", "--uts", "--", "sh", "-c", 'hostname "$0" && exec "$@"', host.name, *command]
        proc = processes.start(name, wrapped, log_dir, env)
        self._procs.append(proc)
        return proc

    def cut(self, host: Host) -> None:
        """Pulls the host's cable at the bridge: its packets are dropped, nothing is refused."""
        ip("link", "set", host.veth, "down")

    def restore(self, host: Host) -> None:
        ip("link", "set", host.veth, "up")

    def close(self) -> None:
        """Stops the processes, the last started first (workers before the Redis they
        use), then deletes the namespaces (and with them the veths) and the bridge."""
        for proc in reversed(self._procs):
            proc.stop(grace_s=5)
        for netns in self._namespaces:
            subprocess.run(["ip", "netns", "del", netns], capture_output=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)
