"""MPI across emulated nodes: hydra's command line per netmod, and a runner that cleans up."""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass

from .netns import Cluster, ClusterError

# Cross-node traffic over TCP on the bridge; ranks of one node still use MPICH's shared memory.
NETMODS = {
    "ucx": {"MPIR_CVAR_CH4_NETMOD": "ucx", "UCX_TLS": "tcp,self"},
    "ofi": {"MPIR_CVAR_CH4_NETMOD": "ofi", "FI_PROVIDER": "tcp"},
}


@dataclass
class Finished:
    """How a job across the nodes ended (output only when captured)."""

    returncode: int
    seconds: float
    timed_out: bool = False
    stdout: str = ""
    stderr: str = ""


def mpiexec_command(cluster: Cluster, command, ranks_per_node: int = 1, ranks: int | None = None,
                    netmod: str = "ucx", mpiexec: str | None = None) -> tuple[list[str], dict]:
    """``mpiexec`` argv that fills the nodes ``ranks_per_node`` at a time, and its env additions.

    ``ranks`` defaults to nodes x ranks_per_node; fewer leave the last node part-filled.
    """
    if netmod not in NETMODS:
        raise ClusterError(f"unknown netmod {netmod!r}; choose {' or '.join(NETMODS)}")
    if ranks_per_node < 1:
        raise ClusterError(f"--ranks-per-node must be at least 1, got {ranks_per_node}")
    ranks = cluster.nodes * ranks_per_node if ranks is None else ranks
    if not 1 <= ranks <= cluster.nodes * ranks_per_node:
        raise ClusterError(f"{ranks} ranks do not fit {cluster.nodes} node(s) x "
                           f"{ranks_per_node} rank(s)")
    mpiexec = mpiexec or shutil.which("mpiexec")
    if mpiexec is None:
        raise ClusterError("mpiexec not found on PATH (pip install mpich)")
    # hydra's ssh launcher runs our wrapper instead of ssh; its proxies call back to
    # mpiexec on the bridge address (-iface), the only one the nodes can reach.
    argv = [mpiexec, "-launcher", "ssh", "-launcher-exec", str(cluster.wrapper),
            "-hosts", ",".join(cluster.hosts), "-iface", cluster.bridge,
            "-ppn", str(ranks_per_node), "-n", str(ranks), *map(str, command)]
    return argv, dict(NETMODS[netmod])


def run(cluster: Cluster, command, ranks_per_node: int = 1, ranks: int | None = None,
        netmod: str = "ucx", timeout: float | None = None, capture: bool = False,
        env: dict | None = None) -> Finished:
    """Run ``command`` on every rank; on timeout or interrupt kill mpiexec and the nodes' processes."""
    argv, extra = mpiexec_command(cluster, command, ranks_per_node, ranks, netmod)
    pipe = subprocess.PIPE if capture else None
    start = time.monotonic()
    # Its own session: hydra's mpiexec ignores SIGTERM, so it ends by SIGKILL to its group.
    proc = subprocess.Popen(argv, env={**(os.environ if env is None else env), **extra},
                            stdout=pipe, stderr=pipe, text=True, start_new_session=True)
    timed_out = False
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        kill(proc, cluster)
        out, err = proc.communicate()
    except BaseException:                 # Ctrl-C included: no rank may outlive the run
        kill(proc, cluster)
        proc.communicate()
        raise
    return Finished(proc.returncode, time.monotonic() - start, timed_out, out or "", err or "")


def kill(proc: subprocess.Popen, cluster: Cluster) -> None:
    """SIGKILL mpiexec's group, then everything in the nodes (proxies lead their own sessions)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    cluster.kill_processes()
