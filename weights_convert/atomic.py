"""Atomic file output: a temp file in the destination folder, fsync, rename.

An interrupted or failed write never leaves the destination half-written: either the old
file (if any) is untouched, or the new one is complete.  The temp file is removed on any
exception (KeyboardInterrupt included).
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from typing import BinaryIO, Iterator

from .errors import WeightsError


def _umask() -> int:
    old = os.umask(0)
    os.umask(old)
    return old


@contextlib.contextmanager
def atomic_output(path: str) -> Iterator[BinaryIO]:
    """``with atomic_output(path) as f: f.write(...)`` — ``path`` appears only on success."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise WeightsError(f"{path}: output folder {folder} does not exist")
    if os.path.isdir(path):
        raise WeightsError(f"{path}: is a folder, expected a file name")
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".partial")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())      # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):          # make the rename itself durable
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def atomic_write_bytes(path: str, data: bytes) -> None:
    with atomic_output(path) as f:
        f.write(data)
