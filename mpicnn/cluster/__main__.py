"""``python -m mpicnn.cluster up|run|down``: emulated nodes on this machine (needs root)."""
from __future__ import annotations

import argparse
import shlex
import sys

from .hydra import NETMODS, mpiexec_command, run
from .netns import MAX_NODES, Cluster, ClusterError, interrupted_by_signals
from .world import run_guarded


def build_parser() -> argparse.ArgumentParser:
    nodes = argparse.ArgumentParser(add_help=False)
    nodes.add_argument("--name", default="mpicnn",
                       help="prefix of namespaces and interfaces (default mpicnn)")
    shape = argparse.ArgumentParser(add_help=False)
    shape.add_argument("--nodes", type=int, default=2, help=f"1 to {MAX_NODES} (default 2)")
    shape.add_argument("--subnet", default="10.77.0.0/24",
                       help="IPv4 /24 of the nodes (.1 ...) and the bridge (.254)")
    shape.add_argument("--rate", help="limit every link, e.g. 1gbit (tc tbf); default none")
    shape.add_argument("--slow-link", action="append", default=[], metavar="NODE:RATE",
                       help="give node NODE (1-based) a link of its own rate, e.g. 2:100mbit")
    shape.add_argument("--no-pin", action="store_true",
                       help="let every node use every core (default: each node gets cores of "
                            "its own where there are at least as many cores as nodes)")
    shape.add_argument("--ranks-per-node", type=int, default=1, help="MPI ranks per node")
    shape.add_argument("--netmod", choices=sorted(NETMODS), default="ucx",
                       help="MPICH network module across nodes (over TCP; default ucx)")
    parser = argparse.ArgumentParser(
        prog="python -m mpicnn.cluster",
        description="Emulated nodes: one network namespace per node on a bridge, with MPICH's "
                    "mpiexec starting ranks inside them.",
        epilog="example: python -m mpicnn.cluster run --nodes 2 --ranks-per-node 2 -- "
               "python -m mpicnn.train --mode ps-sync")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("up", parents=[nodes, shape],
                   help="create the nodes and print the mpiexec line that uses them")
    p = sub.add_parser("run", parents=[nodes, shape],
                       help="up, run COMMAND (after --) across the nodes, down")
    p.add_argument("--timeout", type=float, help="kill the job after this many seconds")
    sub.add_parser("down", parents=[nodes], help="kill what runs in the nodes and remove them")
    return parser


def slow_links(specs) -> dict[int, str]:
    """``["2:100mbit"]`` -> ``{2: "100mbit"}``."""
    links = {}
    for spec in specs:
        node, _, rate = spec.partition(":")
        if not node.isdigit() or not rate:
            raise ClusterError(f"--slow-link {spec!r} is not NODE:RATE, e.g. 2:100mbit")
        links[int(node)] = rate
    return links


def cluster_of(args) -> Cluster:
    return Cluster(args.name, args.nodes, args.subnet, args.rate,
                   slow_links=slow_links(args.slow_link), pin=not args.no_pin)


def cmd_up(args, command) -> int:
    cluster = cluster_of(args).up()
    argv, env = mpiexec_command(cluster, command or ["COMMAND"], args.ranks_per_node,
                                netmod=args.netmod)
    print(f"mpicnn: {cluster.describe(args.ranks_per_node)}; run across them with\n"
          f"  {shlex.join(f'{k}={v}' for k, v in env.items())} {shlex.join(argv)}\n"
          f"and remove them with: python -m mpicnn.cluster down --name {cluster.name}")
    return 0


def cmd_run(args, command) -> int:
    if not command:
        raise ClusterError("run needs a command after --, e.g. -- python -m mpicnn.train")
    cluster = cluster_of(args)
    with interrupted_by_signals():
        try:
            with cluster:                 # up; down also on failure, Ctrl-C, SIGTERM and SIGHUP
                print(f"mpicnn: {cluster.describe(args.ranks_per_node)}", file=sys.stderr,
                      flush=True)
                done = run(cluster, command, args.ranks_per_node, netmod=args.netmod,
                           timeout=args.timeout)
        except KeyboardInterrupt as exc:
            why = f" by {exc.args[0]}" if exc.args else ""
            raise ClusterError(f"interrupted{why}; killed the job and removed the nodes") \
                from None
    if done.hung:
        raise ClusterError(f"{shlex.join(command)} ran past --timeout {args.timeout:g} s; "
                           f"killed it and removed the nodes")
    # a job killed by a signal exits as a shell reports it
    return done.returncode if done.returncode >= 0 else 128 - done.returncode


def cmd_down(args, command) -> int:
    Cluster(args.name).down()
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    own, command = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv \
        else (argv, [])

    def dispatch(_world, _argv) -> int:
        args = build_parser().parse_args(own)
        return {"up": cmd_up, "run": cmd_run, "down": cmd_down}[args.command](args, command)

    # one error line, exit 2, as mpicnn.train reports; no MPI world here
    return run_guarded(dispatch, own, world_factory=lambda: None)


if __name__ == "__main__":
    sys.exit(main())
