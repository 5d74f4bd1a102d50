"""Emulated nodes (mpicnn.cluster): the pure command builders, then training across two nodes.

The cross-node tests need root and network namespaces (the session's ``emulated_cluster``
fixture skips them otherwise). Each runs every mode under both of MPICH's netmods: a
wildcard-source receive that never matches across nodes (ch4:ucx) shows up here as a
run killed after HANG_S, not as a stuck test session.
"""
from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import fail_with_output, final, job_env, max_diff, train

from mpicnn.cluster.__main__ import main as cluster_main
from mpicnn.cluster.hydra import mpiexec_command, run
from mpicnn.cluster.netns import Cluster, ClusterError, ip, wrapper_script

HANG_S = 120                     # a run takes ~10 s; past this it hangs
RANKS_PER_NODE = 2
# One torch thread per rank: the emulated nodes share this machine's cores.
COMMON = ["--batch-size", "16", "--epochs", "2", "--deterministic", "--device", "cpu",
          "--threads", "1"]
# name: (ranks, options); the same runs go through plain mpirun on one node and across nodes.
RUNS = {
    "allreduce": (4, []),
    "ps-sync": (4, ["--mode", "ps-sync", "--servers", "1"]),      # 3 workers, server on node 2
    "ps-async": (4, ["--mode", "ps-async", "--servers", "2"]),
    "allreduce-3": (3, []),                                        # ps-sync's 3 workers
}
NETMODS = ["ucx", "ofi"]


# --- pure: names, addresses, command lines (no root) -------------------------------------

def test_nodes_get_names_addresses_and_a_bridge_from_the_cluster_name(tmp_path):
    cluster = Cluster("lab", nodes=3, subnet="10.9.8.0/24", state_dir=tmp_path)
    assert cluster.hosts == ["10.9.8.1", "10.9.8.2", "10.9.8.3"]
    assert (cluster.bridge, cluster.bridge_address) == ("lab-br", "10.9.8.254")
    assert [n.namespace for n in cluster.node_list] == ["lab-node1", "lab-node2", "lab-node3"]
    assert [n.veth for n in cluster.node_list] == ["lab-h1", "lab-h2", "lab-h3"]
    assert cluster.node_for("10.9.8.2") == cluster.node_for("lab-node2")
    assert cluster.node_for("10.9.8.2").index == 2
    with pytest.raises(ClusterError, match="no node of cluster lab"):
        cluster.node_for("10.9.8.4")


@pytest.mark.parametrize("settings,message", [
    ({"name": "Lab"}, "cluster name 'Lab' must be"),
    ({"name": "averylongname"}, "up to 9"),         # interface names hold 15 characters
    ({"nodes": 0}, "--nodes must be 1 to 8, got 0"),
    ({"nodes": 9}, "--nodes must be 1 to 8, got 9"),
    ({"subnet": "10.9.0.0/16"}, "must be an IPv4 /24"),
    ({"subnet": "ten"}, "bad subnet 'ten'"),
], ids=["uppercase", "long-name", "no-nodes", "nine-nodes", "subnet-16", "subnet-text"])
def test_bad_cluster_settings_fail_in_one_line(settings, message):
    with pytest.raises(ClusterError, match=message) as info:
        Cluster(**settings)
    assert "\n" not in str(info.value)


def test_mpiexec_fills_nodes_ranks_per_node_at_a_time_with_the_netmods_environment(tmp_path):
    cluster = Cluster("lab", nodes=2, subnet="10.9.8.0/24", state_dir=tmp_path)
    argv, env = mpiexec_command(cluster, ["python", "-m", "mpicnn.train", "--epochs", 1],
                                ranks_per_node=2, netmod="ucx", mpiexec="mpiexec")
    assert argv == ["mpiexec", "-launcher", "ssh", "-launcher-exec", str(tmp_path / "enter"),
                    "-hosts", "10.9.8.1,10.9.8.2", "-iface", "lab-br", "-ppn", "2", "-n", "4",
                    "python", "-m", "mpicnn.train", "--epochs", "1"]
    assert env == {"MPIR_CVAR_CH4_NETMOD": "ucx", "UCX_TLS": "tcp,self"}
    argv, env = mpiexec_command(cluster, ["true"], 2, ranks=3, netmod="ofi", mpiexec="mpiexec")
    assert argv[argv.index("-n") + 1] == "3"
    assert env == {"MPIR_CVAR_CH4_NETMOD": "ofi", "FI_PROVIDER": "tcp"}
    for kwargs, message in [({"ranks": 5}, "5 ranks do not fit 2 node"),
                            ({"netmod": "tcp"}, "unknown netmod 'tcp'"),
                            ({"ranks_per_node": 0}, "at least 1")]:
        with pytest.raises(ClusterError, match=message):
            mpiexec_command(cluster, ["true"], **{"ranks_per_node": 2, **kwargs},
                            mpiexec="mpiexec")


def test_wrapper_runs_hydras_command_in_the_hosts_namespace_with_its_hostname(tmp_path):
    cluster = Cluster("lab", nodes=2, subnet="10.9.8.0/24", state_dir=tmp_path)
    script = tmp_path / "enter"
    script.write_text(wrapper_script(cluster, ip_path="echo", unshare_path="unshare"))
    # hydra's ssh launcher: WRAPPER -x HOST "COMMAND" (the command is shell text, as for ssh)
    done = subprocess.run(["sh", script, "-x", "10.9.8.2", '"/bin/proxy" --id 1'],
                          capture_output=True, text=True, check=True)
    assert done.stdout == ('netns exec lab-node2 unshare --uts sh -c '
                           'hostname lab-node2 && exec "/bin/proxy" --id 1\n')
    done = subprocess.run(["sh", script, "-x", "lab-node1", "true"], capture_output=True,
                          text=True, check=True)
    assert done.stdout.startswith("netns exec lab-node1 ")
    done = subprocess.run(["sh", script, "-x", "10.9.8.3", "true"], capture_output=True,
                          text=True, check=False)
    assert done.returncode == 255 and "mpicnn cluster lab: no node 10.9.8.3" in done.stderr


def test_up_without_root_or_tools_fails_in_one_line(monkeypatch, tmp_path):
    cluster = Cluster("lab", state_dir=tmp_path, rate="1gbit")
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    with pytest.raises(ClusterError, match="emulated nodes need root"):
        cluster.up()
    monkeypatch.setattr("os.geteuid", lambda: 0)
    monkeypatch.setattr("shutil.which", lambda program: None if program == "tc" else program)
    with pytest.raises(ClusterError, match="tc not found: install iproute2"):
        cluster.up()


@pytest.mark.parametrize("argv,message", [
    (["run", "--nodes", "2"], "run needs a command after --"),
    (["up", "--name", "Lab"], "cluster name 'Lab' must be"),
    (["run", "--nodes", "9", "--", "true"], "--nodes must be 1 to 8"),
], ids=["run-without-command", "bad-name", "nine-nodes"])
def test_cli_errors_are_one_line_and_exit_2(capsys, argv, message):
    assert cluster_main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mpicnn: error: {message}") and err.count("\n") == 1


# --- across two emulated nodes (root) ----------------------------------------------------

def across(cluster: Cluster, netmod: str):
    """A ``launch`` for conftest.train: n ranks over both nodes, RANKS_PER_NODE per node."""
    def launch(n, args):
        command = [sys.executable, "-m", "mpicnn.train", *map(str, args)]
        done = run(cluster, command, RANKS_PER_NODE, n, netmod, timeout=HANG_S, capture=True,
                   env=job_env())
        what = f"{netmod}: {n} ranks across 2 nodes: {' '.join(command[1:])}"
        print(f"{what}: {done.seconds:.1f} s")
        if done.hung:
            fail_with_output(f"{what} hung for {HANG_S} s (killed)", done.stdout, done.stderr)
        if done.returncode != 0:
            fail_with_output(f"{what} exited {done.returncode}", done.stdout, done.stderr)
        # MPI_COMM_TYPE_SHARED split the ranks by emulated node
        hosts = ", ".join(node.hostname for node in cluster.node_list)
        assert f"world: 2 node(s) x 2 rank(s)/node = {n} rank(s) on {hosts}" in done.stdout
        return done
    return launch


@pytest.fixture(scope="module")
def one_node(emulated_cluster, tmp_path_factory):
    """RUNS through plain mpirun on one node: {name: (checkpoint dir, end record)}."""
    where = tmp_path_factory.mktemp("one_node")
    return {name: train(where, name, n, *COMMON, *args)
            for name, (n, args) in RUNS.items() if name != "allreduce-3"}


def train_across(tmp_path, cluster, netmod, name):
    n, args = RUNS[name]
    return train(tmp_path, name, n, *COMMON, *args, start=across(cluster, netmod))


@pytest.mark.mpi
@pytest.mark.cluster
def test_nodes_have_their_hostnames_and_a_timeout_kills_every_process(emulated_cluster):
    done = run(emulated_cluster, ["hostname"], 1, timeout=HANG_S, capture=True, env=job_env())
    assert done.returncode == 0 and not done.hung, done.stderr
    assert sorted(done.stdout.split()) == ["mpicnntest-node1", "mpicnntest-node2"]
    # hydra's mpiexec ignores SIGTERM and its proxies lead their own sessions
    done = run(emulated_cluster, ["sleep", "600"], 2, timeout=3, capture=True, env=job_env())
    assert done.hung and done.returncode == -9
    assert not [ns for ns in emulated_cluster.namespaces() if ip("netns", "pids", ns).split()]


@pytest.mark.parametrize("netmod", NETMODS)
@pytest.mark.cluster
@pytest.mark.mpi
def test_allreduce_across_two_nodes_learns_as_on_one_node(tmp_path, emulated_cluster, one_node,
                                                          netmod):
    out, end = train_across(tmp_path, emulated_cluster, netmod, "allreduce")
    ref, ref_end = one_node["allreduce"]
    assert end["steps"] == ref_end["steps"] == 2 * 22
    assert end["val_acc"] >= 0.9
    assert abs(end["val_acc"] - ref_end["val_acc"]) <= 0.01
    # One node averages through shared memory, two nodes through MPI: the same sums in
    # another float order (Adam's first steps amplify that to ~4e-5), not other training.
    assert max_diff(final(out), final(ref)) <= 1e-3


@pytest.mark.parametrize("netmod", NETMODS)
@pytest.mark.cluster
@pytest.mark.mpi
def test_ps_sync_across_two_nodes_equals_allreduce_and_one_node(tmp_path, emulated_cluster,
                                                                one_node, netmod):
    # ranks 0, 1 on node 1; worker 2 and the server (rank 3) on node 2
    ps, end = train_across(tmp_path, emulated_cluster, netmod, "ps-sync")
    allreduce, allreduce_end = train_across(tmp_path, emulated_cluster, netmod, "allreduce-3")
    ref, ref_end = one_node["ps-sync"]
    assert max_diff(final(ps), final(allreduce)) <= 1e-5      # same 3 workers, same batches
    assert max_diff(final(ps), final(ref)) <= 1e-5
    assert end["steps"] == allreduce_end["steps"] == 2 * 29
    assert end["updates_per_server"] == [2 * 29] and end["ps_unreceived"] == 0
    assert end["val_acc"] >= 0.9
    assert abs(end["val_acc"] - ref_end["val_acc"]) <= 0.01
    assert abs(end["val_acc"] - allreduce_end["val_acc"]) <= 0.01


@pytest.mark.parametrize("netmod", NETMODS)
@pytest.mark.cluster
@pytest.mark.mpi
def test_ps_async_with_two_servers_across_two_nodes_learns_as_on_one_node(
        tmp_path, emulated_cluster, one_node, netmod):
    # workers on node 1, both servers on node 2: every push and pull crosses the link
    _, end = train_across(tmp_path, emulated_cluster, netmod, "ps-async")
    _, ref_end = one_node["ps-async"]
    assert end["ps_workers"] == 2 and end["ps_servers"] == 2
    # 44 steps/epoch, each a push from both workers to both servers
    assert end["steps"] == 2 * 44 and end["updates_per_server"] == [2 * 2 * 44] * 2
    assert sum(end["ps_pushes"]) == 2 * 2 * 44 and end["ps_unreceived"] == 0   # on demand
    assert end["val_acc"] >= 0.9
    assert abs(end["val_acc"] - ref_end["val_acc"]) <= 0.05
