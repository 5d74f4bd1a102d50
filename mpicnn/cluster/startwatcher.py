"""The process that ends a rank stuck in MPI's start (``startup.StartWatch`` runs it).

A thread of the rank cannot: ``MPI_Init`` holds Python's lock while it waits. This
watcher reads its standard input, a pipe from the rank; the rank closes it once MPI
has started (or the rank dies, which closes it too), and the watcher exits. If nothing
has closed it after the timeout, the watcher prints the rank's error line (when it was
given one) and kills the rank. Standard library only: it runs as ``python -I -S FILE``.
"""
import os
import select
import signal
import sys


def watch(rank_pid: int, timeout: float, line: str) -> None:
    readable, _, _ = select.select([sys.stdin.fileno()], [], [], timeout)
    if readable:                          # closed: MPI started, or the rank is gone
        return
    if line:
        os.write(sys.stderr.fileno(), (line + "\n").encode())
    os.kill(rank_pid, signal.SIGKILL)


if __name__ == "__main__":
    watch(int(sys.argv[1]), float(sys.argv[2]), sys.argv[3])
