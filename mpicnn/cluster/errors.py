"""The one user-facing error, and how a failure reaches the user: one line, once per job.

Every rank that fails ends: a collective error (all ranks found it) exits together, any
other aborts the whole MPI job so no rank is left waiting in a collective.
"""
from __future__ import annotations

import argparse
import sys
import traceback


class MpicnnError(Exception):
    """A user-facing failure, reported as one line ``mpicnn: error: <message>``.

    ``collective=True`` means every rank detected the same failure (config parsing,
    agreed validation), so rank 0 alone reports it and all ranks exit together
    instead of aborting the job.
    """

    exit_code = 2

    def __init__(self, message: str, *, collective: bool = False):
        super().__init__(message)
        self.collective = collective


class Parser(argparse.ArgumentParser):
    """argparse whose errors are MpicnnErrors: one line, from rank 0 alone under MPI."""

    def error(self, message):
        raise MpicnnError(f"{message} (see {self.prog} --help)", collective=True)


def report_failure(exc: BaseException, debug: bool, rank: int = 0, size: int = 1) -> int:
    """Print one ``mpicnn: error:`` line (once per job) and return the exit code."""
    collective = isinstance(exc, MpicnnError) and exc.collective
    if debug:
        traceback.print_exception(exc, file=sys.stderr)
    if isinstance(exc, MpicnnError):
        message = str(exc)
    else:
        hint = "" if debug else " (rerun with --debug for the traceback)"
        message = f"{type(exc).__name__}: {exc}{hint}"
    if not collective and size > 1:
        message = f"rank {rank}: {message}"
    if not collective or rank == 0:
        print_error(message)
    return exc.exit_code if isinstance(exc, MpicnnError) else 1


def print_error(message: str) -> None:
    """Print a user-facing error in its one format, ``mpicnn: error: <message>``."""
    print(error_line(message), file=sys.stderr, flush=True)


def error_line(message: str) -> str:
    """The one format of a user-facing error."""
    return f"mpicnn: error: {message}"


def run_tool(main, *args) -> int:
    """Run a single-process command: an MpicnnError becomes one error line and its exit code."""
    try:
        return main(*args) or 0
    except MpicnnError as exc:
        print_error(str(exc))
        return exc.exit_code
