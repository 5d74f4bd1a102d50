"""Emulated nodes (mpicnn.cluster): the pure command builders, then training across two nodes.

The cross-node tests need root and network namespaces (the session's ``emulated_cluster``
fixture skips them otherwise). Each runs every mode under both of MPICH's netmods: a
wildcard-source receive that never matches across nodes (ch4:ucx) shows up here as a
run killed after HANG_S, not as a stuck test session.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import conftest
from conftest import (
    REQUIRE_TIERS,
    cluster_failed,
    fail_with_output,
    final,
    job_env,
    max_diff,
    need_node_emulation,
    private_cluster,
    train,
)

from mpicnn.cluster.__main__ import main as cluster_main
from mpicnn.cluster.hydra import mpiexec_command, run
from mpicnn.cluster.netns import (
    Cluster,
    ClusterError,
    SubnetTaken,
    free_subnet,
    ip,
    node_cpus,
    oversubscribed,
    rate_bits,
    wrapper_script,
)

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
    # ps-sync's 3 workers, with ps-sync's arithmetic: whole gradients summed (across uneven
    # nodes auto would send digitnet's 1024 x 128 layer as factors: other float rounding)
    "allreduce-3": (3, ["--sufficient-factors", "off"]),
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
    cluster = Cluster("lab", nodes=2, subnet="10.9.8.0/24", state_dir=tmp_path, pin=False)
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


def test_links_take_the_cluster_rate_but_a_slow_link_its_own():
    assert rate_bits("1gbit") == 1e9 and rate_bits("100mbit") == 1e8
    assert rate_bits("2.5gbit") == 2.5e9
    cluster = Cluster("lab", nodes=3, rate="1gbit", slow_links={2: "100mbit"})
    assert [n.rate for n in cluster.node_list] == ["1gbit", "100mbit", "1gbit"]
    assert [n.rate for n in Cluster("lab", slow_links={1: "10mbit"}).node_list] == \
        ["10mbit", None]
    for settings, message in [({"rate": "1gb"}, "rate '1gb' is not a tc rate"),
                              ({"rate": "0mbit"}, "rate '0mbit' is not a tc rate"),
                              ({"slow_links": {3: "1mbit"}}, "node 3, but the nodes are 1 to 2"),
                              ({"slow_links": {1: "fast"}}, "rate 'fast' is not")]:
        with pytest.raises(ClusterError, match=message):
            Cluster("lab", **settings)


def test_each_node_gets_cores_of_its_own_where_there_are_enough():
    assert node_cpus(2, [0, 1]) == [(0,), (1,)]
    assert node_cpus(3, [0, 1, 2, 3, 4, 5, 6]) == [(0, 1, 2), (3, 4), (5, 6)]
    assert node_cpus(1, [4, 5]) == [(4, 5)]
    assert node_cpus(3, [0, 1]) is None                 # too few: the nodes share them all


def test_the_description_says_where_ranks_outnumber_cores(monkeypatch, tmp_path):
    monkeypatch.setattr("mpicnn.cluster.netns.available_cpus", lambda: [0, 1])
    two = Cluster("lab", nodes=2, subnet="10.9.8.0/24", rate="1gbit",
                  slow_links={2: "100mbit"}, state_dir=tmp_path)
    assert [n.cpus for n in two.node_list] == [(0,), (1,)]
    assert two.describe(1) == ("cluster lab: 2 node(s) 10.9.8.1, 10.9.8.2 on bridge lab-br; "
                               "links lab-node1 1gbit, lab-node2 100mbit; cores lab-node1 0, "
                               "lab-node2 1")
    assert two.describe(2).endswith("; ranks outnumber cores: 2 rank(s) per node on 1 "
                                    "core(s) per node")
    four = Cluster("lab", nodes=4, state_dir=tmp_path)
    assert [n.cpus for n in four.node_list] == [()] * 4
    assert "all nodes share this machine's 2 core(s)" in four.describe(1)
    assert oversubscribed(four, 1) == ("ranks outnumber cores: 4 rank(s) on 2 shared core(s) "
                                       "(nodes do not have cores of their own here)")
    assert Cluster("lab", nodes=4, pin=False, state_dir=tmp_path).node_list[0].cpus == ()
    assert oversubscribed(Cluster("lab", nodes=2, pin=False), 1) == ""


def test_wrapper_pins_each_node_to_its_cores(monkeypatch, tmp_path):
    monkeypatch.setattr("mpicnn.cluster.netns.available_cpus", lambda: [0, 1, 2, 3])
    cluster = Cluster("lab", nodes=2, subnet="10.9.8.0/24", state_dir=tmp_path)
    script = wrapper_script(cluster, ip_path="ip", unshare_path="unshare",
                            taskset_path="/bin/taskset")
    assert "10.9.8.1|lab-node1) node=lab-node1 pin='/bin/taskset -c 0-1' ;;" in script
    assert "10.9.8.2|lab-node2) node=lab-node2 pin='/bin/taskset -c 2-3' ;;" in script
    assert 'exec $pin ip netns exec "$node"' in script


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
    (["up", "--slow-link", "2"], "--slow-link '2' is not NODE:RATE"),
    (["up", "--slow-link", "3:1mbit"], "--slow-link names node 3, but the nodes are 1 to 2"),
    (["up", "--rate", "fast"], "rate 'fast' is not a tc rate"),
], ids=["run-without-command", "bad-name", "nine-nodes", "slow-link-no-rate",
        "slow-link-no-node", "bad-rate"])
def test_cli_errors_are_one_line_and_exit_2(capsys, argv, message):
    assert cluster_main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mpicnn: error: {message}") and err.count("\n") == 1


# --- when the tier runs: skipped only for what the machine lacks -------------------------

@pytest.fixture
def capable(monkeypatch):
    """A machine that could emulate nodes, whose cluster code fails: ``Cluster.up`` raises."""
    def broken(self):
        raise ClusterError("ip link add t1-br type bridge: forced failure")

    monkeypatch.setattr(conftest, "need_node_emulation", lambda: None)
    monkeypatch.setattr("mpicnn.cluster.netns.free_subnet", lambda seed=0: "10.9.8.0/24")
    monkeypatch.setattr(Cluster, "up", broken)
    for name in ("CI", REQUIRE_TIERS):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize("required", [("CI", "true"), (REQUIRE_TIERS, "1")],
                         ids=["ci", "asked"])
def test_where_the_tier_is_required_a_cluster_error_fails_it(capable, monkeypatch, required):
    monkeypatch.setenv(*required)
    with pytest.raises(pytest.fail.Exception, match="forced failure.*a required tier here"):
        private_cluster("t")


def test_elsewhere_a_cluster_error_skips_naming_it(capable):
    with pytest.raises(pytest.skip.Exception, match="cluster failed: ip link add .* forced"):
        private_cluster("t")


def test_a_machine_without_root_skips_the_tier_even_in_ci(monkeypatch):
    monkeypatch.setenv("CI", "true")
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    with pytest.raises(pytest.skip.Exception, match="cannot emulate nodes here: not root"):
        private_cluster("t")
    # a program .ci/run installs is missing only outside CI
    monkeypatch.setattr("os.geteuid", lambda: 0)
    monkeypatch.setattr("shutil.which", lambda program: None if program == "tc" else program)
    with pytest.raises(pytest.fail.Exception, match="tc not found: install iproute2"):
        need_node_emulation()


# --- the harness itself (root) -------------------------------------------------------------

def private_settings(tag: str) -> list[str]:
    """``--name``/``--subnet`` flags for a cluster of this session alone."""
    need_node_emulation()
    try:
        subnet = free_subnet(os.getpid() % 256 + 64)
    except ClusterError as exc:
        cluster_failed(exc)
    return ["--name", f"{tag}{os.getpid() % 100000}", "--subnet", subnet]


def leftovers(name: str) -> list[str]:
    """Namespaces and links of cluster ``name`` that still exist."""
    pattern = re.compile(re.escape(name) + r"-(node\d+|h\d+|br)")
    names = ip("netns", "list").split() + [line.split(":")[1].strip().split("@")[0]
                                          for line in ip("-o", "link", "show").splitlines()]
    return [n for n in names if pattern.fullmatch(n)]


def cmdline(pid: int) -> bytes:
    """The command line of ``pid`` (empty once it ended)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


@pytest.mark.cluster
def test_run_shapes_links_pins_cores_and_removes_the_nodes(capfd, emulated_cluster):
    own = private_settings("r")
    # one line per node (lines of the two nodes may interleave, never mix)
    probe = ('echo "$(hostname) cpus=$(taskset -cp $$ | cut -d: -f2 | tr -d " ") '
             '$(tc qdisc show dev eth0 | grep -o "tbf.*rate [^ ]*") '
             'routes-out=$(ip route | grep -c default)"')
    code = cluster_main(["run", *own, "--rate", "1gbit", "--slow-link", "2:100mbit",
                         "--timeout", str(HANG_S), "--", "sh", "-c", probe])
    out, err = capfd.readouterr()
    assert code == 0, err
    name = own[1]
    assert f"mpicnn: cluster {name}: 2 node(s)" in err
    assert f"links {name}-node1 1gbit, {name}-node2 100mbit" in err
    lines = sorted(line.split() for line in out.splitlines() if line.startswith(name))
    assert [line[0] for line in lines] == [f"{name}-node1", f"{name}-node2"], out
    assert [line[-2] for line in lines] == ["1Gbit", "100Mbit"], out
    assert [line[-1] for line in lines] == ["routes-out=0"] * 2      # no route off the bridge
    if len(os.sched_getaffinity(0)) >= 2:                # pinned: cores of their own
        assert lines[0][1] != lines[1][1], out
    assert not leftovers(name)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "ctrl-c"])
@pytest.mark.cluster
def test_a_signal_to_run_kills_the_job_and_removes_the_nodes(sig, emulated_cluster):
    own = private_settings("s")
    name = own[1]
    proc = subprocess.Popen([sys.executable, "-m", "mpicnn.cluster", "run", *own,
                             "--ranks-per-node", "2", "--", "sleep", "600"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=job_env())
    try:
        deadline = time.monotonic() + HANG_S
        cluster = Cluster(name, subnet=own[3])
        while not [p for i in (1, 2) for p in cluster.node_pids(i) if b"sleep" in cmdline(p)]:
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.2)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            Cluster(name).down()
    why = "SIGTERM" if sig == signal.SIGTERM else "Ctrl-C"
    assert proc.returncode == 2, (why, out, err)
    errors = [line for line in err.splitlines() if line.startswith("mpicnn: error:")]
    assert len(errors) == 1 and "killed the job and removed the nodes" in errors[0], err
    assert not leftovers(name)


@pytest.mark.cluster
def test_up_after_a_crash_replaces_what_the_crash_left(emulated_cluster):
    own = private_settings("u")
    name, subnet = own[1], own[3]
    Cluster(name, nodes=3, subnet=subnet).up()          # then "crashed": never taken down
    try:
        cluster = Cluster(name, nodes=2, subnet=subnet).up()
        assert sorted(cluster.namespaces()) == [f"{name}-node1", f"{name}-node2"]
        assert sorted(leftovers(name)) == sorted([f"{name}-node1", f"{name}-node2",
                                                  f"{name}-h1", f"{name}-h2", f"{name}-br"])
    finally:
        Cluster(name).down()
    assert not leftovers(name)


@pytest.mark.cluster
def test_a_subnet_in_use_is_refused_and_nothing_is_left(emulated_cluster):
    name = private_settings("v")[1]
    with pytest.raises(SubnetTaken, match=f"subnet {emulated_cluster.subnet} is already used "
                                          f"by {emulated_cluster.bridge}"):
        Cluster(name, subnet=emulated_cluster.subnet).up()
    assert not leftovers(name)


# --- across two emulated nodes (root) ----------------------------------------------------

def across(cluster: Cluster, netmod: str, expect=()):
    """A ``launch`` for conftest.train: n ranks over both nodes, RANKS_PER_NODE per node.

    ``expect``: lines of the startup log the run must print (e.g. the collective chosen).
    """
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
        for text in expect:
            assert text in done.stdout, done.stdout[-3000:]
        # UCX names a message still unreceived at MPI_Finalize (e.g. a stall-watch answer)
        assert "was not matched" not in done.stdout + done.stderr, done.stderr[-3000:]
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
    assert sorted(done.stdout.split()) == [node.hostname for node in emulated_cluster.node_list]
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


# --- which collective runs across nodes, and whether they agree --------------------------

SGD = ["--optimizer", "sgd", "--lr", "0.05"]    # Adam's first steps would amplify rounding
WINDOWS = "MPI shared-memory windows within each of 2 nodes (2 ranks each)"


@pytest.fixture(scope="module")
def flat_across(emulated_cluster, tmp_path_factory):
    """The flat Allreduce over 2 nodes x 2 ranks (no windows): the reference."""
    where = tmp_path_factory.mktemp("flat")
    out, _ = train(where, "flat", 4, *COMMON, *SGD, "--shared-memory", "off",
                   start=across(emulated_cluster, "ucx", expect=["; flat Allreduce;"]))
    return out


@pytest.mark.parametrize("netmod", NETMODS)
@pytest.mark.cluster
@pytest.mark.mpi
def test_windows_within_nodes_and_hierarchical_equal_flat_across_nodes(
        tmp_path, emulated_cluster, flat_across, netmod):
    trace = tmp_path / "trace.json"
    windows, end = train(tmp_path, "windows", 4, *COMMON, *SGD, "--timeline", trace,
                         start=across(emulated_cluster, netmod, expect=[WINDOWS]))
    hierarchical, _ = train(tmp_path, "hierarchical", 4, *COMMON, *SGD, "--hierarchical",
                            start=across(emulated_cluster, netmod,
                                         expect=["hierarchical (2 node(s): Reduce"]))
    # the same sums in other orders: equal to float rounding, not bitwise
    assert max_diff(final(windows), final(flat_across)) <= 1e-5
    # the exchange on into the next forward (small buckets: some are in flight as a step
    # ends); windows sum each element in rank order whatever the buckets: bitwise equal
    if netmod == "ucx":
        overlapped, _ = train(tmp_path, "overlap", 4, *COMMON, *SGD, "--overlap-forward",
                              "--bucket-mb", "0.05",
                              start=across(emulated_cluster, netmod,
                                           expect=[WINDOWS, "update lands as its forward"]))
        assert max_diff(final(overlapped), final(windows)) == 0.0
        # the fully connected layer's gradient rebuilt from every rank's factors
        factored, _ = train(tmp_path, "factors", 4, *COMMON, *SGD, "--sufficient-factors",
                            "on", start=across(emulated_cluster, netmod, expect=[
                                WINDOWS, "1024x128 sent as the batch's factors"]))
        assert max_diff(final(factored), final(flat_across)) <= 1e-5
    assert max_diff(final(hierarchical), final(flat_across)) <= 1e-5
    assert end["steps"] == 2 * 22 and end["world_size"] == 4 and end["val_acc"] >= 0.9
    # every node's ranks are in the one timeline rank 0 wrote
    events = json.loads(trace.read_text())["traceEvents"]
    hosts = [node.hostname for node in emulated_cluster.node_list]
    names = {e["pid"]: e["args"]["name"] for e in events if e["name"] == "process_name"}
    assert names == {r: f"rank {r} ({hosts[r // 2]})" for r in range(4)}
    assert {e["pid"] for e in events if e.get("ph") == "X"} == {0, 1, 2, 3}
