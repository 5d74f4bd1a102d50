"""``python -m mpicnn.run [--max-restarts N] -- LAUNCHER ...``: restart a job after a crash."""
from __future__ import annotations

import argparse
import sys

from .cluster.errors import MpicnnError, run_tool
from .resilience.supervisor import Policy, Supervisor


def main(argv=None) -> int:
    return run_tool(supervise, sys.argv[1:] if argv is None else argv)


def supervise(argv) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mpicnn.run",
        usage="python -m mpicnn.run [options] -- mpirun -n N python -m mpicnn.train ...",
        description="Run a training launch; after a crash relaunch it with --resume auto "
                    "(not after bad input, exit 2, or a clean stop, exit 75).")
    defaults = Policy()
    parser.add_argument("--max-restarts", type=int, default=defaults.max_restarts,
                        help="restarts before giving up (default %(default)s)")
    parser.add_argument("--backoff", type=float, default=defaults.backoff,
                        help="seconds before the first restart, doubling after each "
                             "(default %(default)s)")
    parser.add_argument("--backoff-max", type=float, default=defaults.backoff_max,
                        help="longest wait between restarts (default %(default)s)")
    parser.add_argument("--exclude-after", type=int, default=defaults.exclude_after,
                        help="failures of one node before srun leaves it out "
                             "(default %(default)s)")
    parser.add_argument("command", nargs=argparse.REMAINDER,
                        help="the launcher command line, after --")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        raise MpicnnError("no command to run: python -m mpicnn.run [options] -- mpirun -n N "
                          "python -m mpicnn.train ...")
    if args.max_restarts < 0 or args.backoff < 0 or args.backoff_max < 0 \
            or args.exclude_after < 1:
        raise MpicnnError("--max-restarts, --backoff and --backoff-max must not be negative, "
                          "--exclude-after must be at least 1")
    policy = Policy(args.max_restarts, args.backoff, args.backoff_max, args.exclude_after)
    return Supervisor(command, policy).run()


if __name__ == "__main__":
    sys.exit(main())
