"""A write that failed: one line naming the file, the cause and the last good checkpoint.

Checkpoints, the metrics file and ``config.toml`` raise ``WriteFailed`` from the
``OSError`` underneath. A cause that stays after a restart (disk full, no permission,
read-only file system) ends the job with ``EXIT_CODE``, which the restart supervisor
does not retry; any other (an I/O error of a network file system) exits 1 and may be.
"""
from __future__ import annotations

import errno
import os

from ..cluster.errors import MpicnnError

EXIT_CODE = 74            # EX_IOERR of sysexits.h
LASTING = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS})


class WriteFailed(MpicnnError):
    """Writing ``what`` to ``path`` failed with ``cause``; ``last_checkpoint`` is still whole."""

    def __init__(self, what: str, path: str | os.PathLike, cause: OSError,
                 last_checkpoint: str | os.PathLike | None = None):
        kept = (f"last good checkpoint: {str(last_checkpoint)!r}" if last_checkpoint
                else "no checkpoint written yet")
        super().__init__(f"cannot write {what} {str(path)!r}: {reason(cause)}; {kept}")
        self.cause = cause
        self.exit_code = EXIT_CODE if cause.errno in LASTING else 1


def reason(error: OSError) -> str:
    """The system's words for ``error`` (``No space left on device``), not its repr."""
    if error.errno is not None:
        return error.strerror or os.strerror(error.errno)
    return str(error) or type(error).__name__
