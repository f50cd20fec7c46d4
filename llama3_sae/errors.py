"""What every command catches and prints as one line: problems a user can cause or fix."""

from __future__ import annotations

import errno
import sys
from contextlib import contextmanager
from typing import Iterator

# ValueError: bad options, data or files. OSError: missing paths, full disks, read-only or forbidden
# outputs. Both print one line naming the path; nothing is half-written (every output is renamed into place).
USER_ERRORS = (ValueError, OSError)

_HINTS = {
    errno.ENOSPC: "no space left on the device; free some and rerun the same command (it resumes)",
    errno.EDQUOT: "disk quota exceeded; free some space and rerun the same command (it resumes)",
    errno.EFBIG: "file too large for this file system or the process's file-size limit; free space or raise the "
                 "limit and rerun the same command (it resumes)",
    errno.EROFS: "read-only file system; choose an output on a writable one",
    errno.EACCES: "permission denied; choose an output you may write to",
    errno.EPERM: "operation not permitted; choose an output you may write to",
}


class RankZeroDecision(ValueError):
    """A refusal every rank reaches alike (rank 0's broadcast decision, or the same check of the same
    files): every rank raises it, only rank 0 prints it."""


def print_error(prog: str, e: BaseException, rank: int = 0) -> None:
    """Print ``prog: error: ...`` for a user error; under torchrun once per job for a shared decision."""
    if rank != 0 and isinstance(e, RankZeroDecision):
        return
    print(f"{prog}: error: {describe(e)}", file=sys.stderr)


def describe(e: BaseException) -> str:
    """One line for ``e``: a ValueError's own message, an OSError's path and what to do about it."""
    if isinstance(e, OSError) and not isinstance(e, FileNotFoundError) and e.errno in _HINTS:
        where = e.filename or "an output file"
        return f"cannot write {where}: {_HINTS[e.errno]}"
    return str(e)


@contextmanager
def naming(path) -> Iterator[None]:
    """Give an OSError raised inside (a failed write() names no file) the path being written."""
    try:
        yield
    except OSError as e:
        if e.filename is None and e.errno is not None:
            raise OSError(e.errno, e.strerror or str(e), str(path)) from e
        raise
