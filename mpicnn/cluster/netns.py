"""Emulated nodes: one network namespace per node on a bridge without uplink.

Each node gets its own hostname (a UTS namespace entered by the launcher wrapper), its
own link to the bridge (optionally limited by ``tc tbf``, one link slower than the
rest if asked) and, where the machine has the cores, its own CPUs (``taskset``).
"""
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
from .world import spans

MAX_NODES = 8
# Interface names hold 15 characters: "<name>-br" and "<name>-h<i>" must fit.
NAME = re.compile(r"[a-z][a-z0-9]{0,9}")
STATE_ROOT = Path("/run/mpicnn-cluster")
BRIDGE_HOST = 254                 # the bridge's address in the subnet; nodes are .1 .. .N
NODE_IFACE = "eth0"               # inside its namespace a node sees a plain eth0
BURST_BYTES = 512 * 1024          # tbf lets this much through at once, unshaped
TBF = ["burst", f"{BURST_BYTES // 1024}kb", "latency", "100ms"]
# tc's rate units in bits per second (tc also knows byte units; one spelling is enough)
RATE = re.compile(r"(\d+(?:\.\d+)?)(bit|kbit|mbit|gbit|tbit)")
RATE_UNITS = {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "tbit": 1e12}


class ClusterError(MpicnnError):
    """The emulated cluster cannot be built or used here (not root, no iproute2, ...)."""


class SubnetTaken(ClusterError):
    """Another interface holds an address in the cluster's subnet."""


@dataclass(frozen=True)
class Node:
    """One emulated node: its namespace, hostname, address and the bridge-side veth."""

    index: int                    # 1-based, as in the hostname
    namespace: str
    hostname: str
    address: str
    veth: str                     # the host end, enslaved to the bridge
    rate: str | None = None       # tc rate of its link; None: unlimited
    cpus: tuple[int, ...] = ()    # the cores its processes run on; (): all of this machine's


@dataclass
class Cluster:
    """``nodes`` network namespaces named ``<name>-node<i>`` on bridge ``<name>-br``."""

    name: str = "mpicnn"
    nodes: int = 2
    subnet: str = "10.77.0.0/24"
    rate: str | None = None       # tc rate of every link, e.g. "1gbit"; None: unlimited
    state_dir: Path | None = None  # holds the launcher wrapper; default /run/mpicnn-cluster/<name>
    slow_links: dict[int, str] = field(default_factory=dict)   # node index -> its own rate
    pin: bool = True              # give each node its own cores where there are enough
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
        if self.rate is not None:
            rate_bits(self.rate)
        for index, rate in self.slow_links.items():
            if not 1 <= index <= self.nodes:
                raise ClusterError(f"--slow-link names node {index}, but the nodes are "
                                   f"1 to {self.nodes}")
            rate_bits(rate)
        cpus = node_cpus(self.nodes, available_cpus()) if self.pin else None
        self.node_list = [Node(i, f"{self.name}-node{i}", f"{self.name}-node{i}", str(net[i]),
                               f"{self.name}-h{i}", self.slow_links.get(i, self.rate),
                               cpus[i - 1] if cpus else ())
                          for i in range(1, self.nodes + 1)]

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

    def describe(self, ranks_per_node: int | None = None) -> str:
        """One line: nodes, addresses, links, cores (and whether ranks outnumber them)."""
        rates = {node.rate for node in self.node_list}
        links = ("links unlimited" if rates == {None} else "links " + ", ".join(
            f"{node.hostname} {node.rate or 'unlimited'}" for node in self.node_list)
            if len(rates) > 1 else f"links {self.rate}")
        line = (f"cluster {self.name}: {self.nodes} node(s) {', '.join(self.hosts)} on bridge "
                f"{self.bridge}; {links}; {self.describe_cpus()}")
        crowded = ranks_per_node and oversubscribed(self, ranks_per_node)
        return f"{line}; {crowded}" if crowded else line

    def describe_cpus(self) -> str:
        """Which cores each node computes on."""
        if not self.node_list[0].cpus:
            return f"all nodes share this machine's {len(available_cpus())} core(s)"
        return "cores " + ", ".join(f"{node.hostname} {spans(node.cpus)}"
                                    for node in self.node_list)

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
        check_tools(["ip", "unshare"] + (["tc"] if any(n.rate for n in self.node_list) else [])
                    + (["taskset"] if self.node_list[0].cpus else []))
        self.down()
        try:
            self._check_subnet_free()
            ip("link", "add", self.bridge, "type", "bridge")
            ip("addr", "add", f"{self.bridge_address}/24", "dev", self.bridge)
            self._check_subnet_free()        # again: a cluster started meanwhile may share it
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
        if node.rate:           # both ends, so each direction of the link is limited
            tc("qdisc", "add", "dev", node.veth, "root", "tbf", "rate", node.rate, *TBF)
            tc("-n", ns, "qdisc", "add", "dev", NODE_IFACE, "root", "tbf", "rate", node.rate,
               *TBF)

    def set_link(self, index: int, up: bool) -> None:
        """Take node ``index``'s link down (a network partition) or bring it back up."""
        node = self.node_list[index - 1]
        ip("link", "set", node.veth, "up" if up else "down",
           what=f"cannot set the link of {node.hostname} {'up' if up else 'down'}")

    def node_pids(self, index: int) -> list[int]:
        """The processes running inside node ``index`` now."""
        return [int(p) for p in ip("netns", "pids", self.node_list[index - 1].namespace,
                                   check=False).split()]

    def _check_subnet_free(self) -> None:
        net = ipaddress.ip_network(self.subnet)
        for line in ip("-o", "-4", "addr", "show").splitlines():
            fields = line.split()
            if (len(fields) > 3 and fields[1] != self.bridge
                    and ipaddress.ip_interface(fields[3]).ip in net):
                raise SubnetTaken(f"subnet {self.subnet} is already used by {fields[1]} "
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
                   unshare_path: str | None = None, taskset_path: str | None = None) -> str:
    """The shell script that hydra's ssh launcher runs instead of ssh (a case per node)."""
    ip_path = ip_path or shutil.which("ip") or "ip"
    unshare_path = unshare_path or shutil.which("unshare") or "unshare"
    taskset_path = taskset_path or shutil.which("taskset") or "taskset"
    # pinned nodes start through taskset: the node's processes inherit its cores
    cases = "".join(f"  {node.address}|{node.hostname}) node={node.namespace}"
                    + (f" pin='{taskset_path} -c {spans(node.cpus)}'" if node.cpus else "")
                    + " ;;\n" for node in cluster.node_list)
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
            f'exec $pin {ip_path} netns exec "$node" {unshare_path} --uts '
            f'sh -c "hostname $node && exec $*"\n')


def free_subnet(seed: int = 0) -> str:
    """An IPv4 /24 in 10.77.0.0/16 that no interface here uses (searched from ``seed``)."""
    check_tools(["ip"])
    used = {ipaddress.ip_interface(line.split()[3]).network.network_address.packed[:3]
            for line in ip("-o", "-4", "addr", "show").splitlines() if len(line.split()) > 3}
    for i in range(256):
        third = (seed + i) % 256
        if bytes([10, 77, third]) not in used:
            return f"10.77.{third}.0/24"
    raise ClusterError("every 10.77.X.0/24 is in use; pass a subnet of your own")


def rate_bits(rate: str) -> float:
    """Bits per second of a tc rate such as ``1gbit`` or ``100mbit``."""
    match = RATE.fullmatch(rate)
    if not match or float(match.group(1)) <= 0:
        raise ClusterError(f"rate {rate!r} is not a tc rate like 10gbit, 1gbit or 100mbit")
    return float(match.group(1)) * RATE_UNITS[match.group(2)]


def available_cpus() -> list[int]:
    """The cores this process may run on."""
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
        else list(range(os.cpu_count() or 1))


def node_cpus(nodes: int, cpus: list[int]) -> list[tuple[int, ...]] | None:
    """Each node's own cores (consecutive, remainder to the first nodes); None if too few."""
    if nodes > len(cpus):
        return None
    share, extra = divmod(len(cpus), nodes)
    out, start = [], 0
    for i in range(nodes):
        width = share + (1 if i < extra else 0)
        out.append(tuple(cpus[start:start + width]))
        start += width
    return out


def oversubscribed(cluster: Cluster, ranks_per_node: int) -> str:
    """A note when ranks outnumber the cores they compute on (else empty)."""
    if cluster.node_list[0].cpus:
        smallest = min(len(node.cpus) for node in cluster.node_list)
        if ranks_per_node > smallest:
            return (f"ranks outnumber cores: {ranks_per_node} rank(s) per node on "
                    f"{smallest} core(s) per node")
        return ""
    ranks, cores = ranks_per_node * cluster.nodes, len(available_cpus())
    if ranks > cores:
        return (f"ranks outnumber cores: {ranks} rank(s) on {cores} shared core(s) (nodes do "
                f"not have cores of their own here)")
    return ""


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


@contextlib.contextmanager
def interrupted_by_signals():
    """Turn Ctrl-C, SIGTERM and SIGHUP into KeyboardInterrupt, which tears the cluster down.

    Ctrl-C too: a shell starts background commands with SIGINT ignored, and Python then
    raises no KeyboardInterrupt of its own.
    """
    def interrupt(signum, frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, interrupt)
                for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
