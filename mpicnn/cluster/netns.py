"""Emulated nodes: one network namespace per node on a bridge without uplink."""
from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from .errors import MpicnnError

MAX_NODES = 8
# Interface names hold 15 characters: "<name>-br" and "<name>-h<i>" must fit.
NAME = re.compile(r"[a-z][a-z0-9]{0,9}")
STATE_ROOT = Path("/run/mpicnn-cluster")
BRIDGE_HOST = 254                 # the bridge's address in the subnet; nodes are .1 .. .N
NODE_IFACE = "eth0"               # inside its namespace a node sees a plain eth0
TBF = ["burst", "512kb", "latency", "100ms"]


class ClusterError(MpicnnError):
    """The emulated cluster cannot be built or used here (not root, no iproute2, ...)."""


@dataclass(frozen=True)
class Node:
    """One emulated node: its namespace, hostname, address and the bridge-side veth."""

    index: int                    # 1-based, as in the hostname
    namespace: str
    hostname: str
    address: str
    veth: str                     # the host end, enslaved to the bridge


@dataclass
class Cluster:
    """``nodes`` network namespaces named ``<name>-node<i>`` on bridge ``<name>-br``."""

    name: str = "mpicnn"
    nodes: int = 2
    subnet: str = "10.77.0.0/24"
    rate: str | None = None       # tc rate of every link, e.g. "1gbit"; None: unlimited
    state_dir: Path | None = None  # holds the launcher wrapper; default /run/mpicnn-cluster/<name>
    node_list: list[Node] = field(init=False, repr=False)

    def __post_init__(self):
        if not NAME.fullmatch(self.name):
            raise ClusterError(f"cluster name {self.name!r} must be a lowercase letter and up "
                               f"to 9 lowercase letters or digits (it prefixes interface names)")
        if not 1 <= self.nodes <= MAX_NODES:
            raise ClusterError(f"--nodes must be 1 to {MAX_NODES}, got {self.nodes}")
        try:
            net = ipaddress.ip_network(self.subnet)
        except ValueError as exc:
            raise ClusterError(f"bad subnet {self.subnet!r}: {exc}") from None
        if net.version != 4 or net.prefixlen != 24:
            raise ClusterError(f"subnet must be an IPv4 /24 like 10.77.0.0/24, got {self.subnet}")
        self.state_dir = Path(self.state_dir or STATE_ROOT / self.name)
        self.node_list = [Node(i, f"{self.name}-node{i}", f"{self.name}-node{i}", str(net[i]),
                               f"{self.name}-h{i}") for i in range(1, self.nodes + 1)]

    @property
    def bridge(self) -> str:
        return f"{self.name}-br"

    @property
    def bridge_address(self) -> str:
        return str(ipaddress.ip_network(self.subnet)[BRIDGE_HOST])

    @property
    def hosts(self) -> list[str]:
        return [node.address for node in self.node_list]

    @property
    def wrapper(self) -> Path:
        """The executable that runs a command inside a node: ``WRAPPER [-x] HOST COMMAND``."""
        return self.state_dir / "enter"

    def node_for(self, host: str) -> Node:
        """The node whose address or hostname is ``host``."""
        for node in self.node_list:
            if host in (node.address, node.hostname):
                return node
        raise ClusterError(f"{host!r} is no node of cluster {self.name} "
                           f"({', '.join(self.hosts)})")

    def __enter__(self) -> Cluster:
        self.up()
        return self

    def __exit__(self, *exc) -> None:
        self.down()

    def up(self) -> Cluster:
        """Create bridge, namespaces and links (after removing leftovers of this name)."""
        check_tools(["ip", "unshare"] + (["tc"] if self.rate else []))
        self.down()
        try:
            self._check_subnet_free()
            ip("link", "add", self.bridge, "type", "bridge")
            ip("addr", "add", f"{self.bridge_address}/24", "dev", self.bridge)
            ip("link", "set", self.bridge, "up")
            for node in self.node_list:
                self._add_node(node)
            self.state_dir.mkdir(parents=True, exist_ok=True)
            self.wrapper.write_text(wrapper_script(self))
            self.wrapper.chmod(0o755)
        except BaseException:
            self.down()
            raise
        return self

    def _add_node(self, node: Node) -> None:
        ns = node.namespace
        ip("netns", "add", ns, what=f"cannot create network namespace {ns}")
        ip("link", "add", node.veth, "type", "veth", "peer", "name", NODE_IFACE, "netns", ns)
        ip("link", "set", node.veth, "master", self.bridge, "up")
        ip("-n", ns, "addr", "add", f"{node.address}/24", "dev", NODE_IFACE)
        ip("-n", ns, "link", "set", NODE_IFACE, "up")
        ip("-n", ns, "link", "set", "lo", "up")
        if self.rate:           # both ends, so each direction of the link is limited
            tc("qdisc", "add", "dev", node.veth, "root", "tbf", "rate", self.rate, *TBF)
            tc("-n", ns, "qdisc", "add", "dev", NODE_IFACE, "root", "tbf", "rate", self.rate,
               *TBF)

    def _check_subnet_free(self) -> None:
        net = ipaddress.ip_network(self.subnet)
        for line in ip("-o", "-4", "addr", "show").splitlines():
            fields = line.split()
            if len(fields) > 3 and ipaddress.ip_interface(fields[3]).ip in net:
                raise ClusterError(f"subnet {self.subnet} is already used by {fields[1]} "
                                   f"(another cluster?); choose another with --subnet")

    def namespaces(self) -> list[str]:
        """This cluster's namespaces that exist now (any node count, e.g. a crashed run's)."""
        pattern = re.compile(re.escape(self.name) + r"-node\d+")
        return [line.split()[0] for line in ip("netns", "list").splitlines()
                if line.split() and pattern.fullmatch(line.split()[0])]

    def kill_processes(self) -> None:
        """SIGKILL every process inside this cluster's namespaces (hydra proxies, ranks)."""
        for _ in range(50):
            pids = {int(p) for ns in self.namespaces()
                    for p in ip("netns", "pids", ns, check=False).split()}
            pids.discard(os.getpid())
            if not pids:
                return
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):     # it ended meanwhile
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)    # children forked meanwhile show up in the next round
        raise ClusterError(f"processes in cluster {self.name} survive SIGKILL")

    def down(self) -> None:
        """Kill what runs inside, then delete links, bridge, namespaces and the state dir."""
        check_tools(["ip"])
        self.kill_processes()
        pattern = re.compile(re.escape(self.name) + r"-(h\d+|br)")
        for line in ip("-o", "link", "show").splitlines():
            name = line.split(":")[1].strip().split("@")[0] if ":" in line else ""
            if pattern.fullmatch(name):
                # deleting the host end removes the pair now (a namespace's end goes lazily)
                ip("link", "del", name, check=False)
        for ns in self.namespaces():
            ip("netns", "del", ns, check=False)
        shutil.rmtree(self.state_dir, ignore_errors=True)
        with contextlib.suppress(OSError):       # the shared root, once no cluster uses it
            STATE_ROOT.rmdir()


def wrapper_script(cluster: Cluster, ip_path: str | None = None,
                   unshare_path: str | None = None) -> str:
    """The shell script that hydra's ssh launcher runs instead of ssh (a case per node)."""
    ip_path = ip_path or shutil.which("ip") or "ip"
    unshare_path = unshare_path or shutil.which("unshare") or "unshare"
    cases = "".join(f"  {node.address}|{node.hostname}) node={node.namespace} ;;\n"
                    for node in cluster.node_list)
    # ssh hands its remote shell the command as one string, so the command is shell text
    # here too; the UTS namespace gives each node its own hostname for the rank's logs.
    return (f"#!/bin/sh\n"
            f"# Written by mpicnn.cluster for cluster {cluster.name}: hydra runs\n"
            f"# $0 [-x] HOST COMMAND; run COMMAND inside HOST's namespace.\n"
            f'while [ "${{1#-}}" != "$1" ]; do shift; done\n'
            f'case "$1" in\n{cases}'
            f'  *) echo "mpicnn cluster {cluster.name}: no node $1" >&2; exit 255 ;;\n'
            f"esac\n"
            f"shift\n"
            f'exec {ip_path} netns exec "$node" {unshare_path} --uts '
            f'sh -c "hostname $node && exec $*"\n')


def check_tools(programs) -> None:
    """Fail in one line unless we are root and ``programs`` are on PATH."""
    if os.geteuid() != 0:
        raise ClusterError("emulated nodes need root (network namespaces, veth, bridge)")
    missing = [p for p in programs if shutil.which(p) is None]
    if missing:
        raise ClusterError(f"{', '.join(missing)} not found: install iproute2 and util-linux "
                           f"(apt-get install iproute2)")


def _command(program: str, args, check: bool, what: str | None) -> str:
    done = subprocess.run([program, *args], capture_output=True, text=True, check=False)
    if check and done.returncode != 0:
        detail = (done.stderr or done.stdout).strip().splitlines()
        detail = detail[-1] if detail else f"exit {done.returncode}"
        raise ClusterError(f"{what or program + ' ' + ' '.join(args)}: {detail}")
    return done.stdout


def ip(*args, check: bool = True, what: str | None = None) -> str:
    """Run ``ip ARGS``; on failure raise a ClusterError naming the command and ip's reason."""
    return _command("ip", args, check, what)


def tc(*args, check: bool = True) -> str:
    """Run ``tc ARGS`` like :func:`ip`."""
    return _command("tc", args, check, None)
