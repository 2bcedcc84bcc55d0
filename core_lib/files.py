"""Atomic file writes: a reader sees the previous file or the new one, never a torn one."""
from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path
from typing import Callable

from core_lib.errors import UserError

__all__ = ["atomic_write", "OutputError"]


class OutputError(UserError):
    """A result could not be written (disk full, no permission); nothing partial was left behind."""


def _umask() -> int:
    """The process's file-creation mask (read by setting and restoring it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Write ``path`` through ``write(tmp_path)`` into a temporary file of the same folder, fsync, rename.

    The temporary file keeps ``path``'s suffix (so writers that infer the format from it, such as
    matplotlib, still work) and gets the mode ``open`` would give. On any failure it is removed and
    ``path`` is untouched; a full disk or a permission error becomes an :class:`OutputError`.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    except OSError as err:
        raise OutputError(f"cannot write into {path.parent} ({err.strerror}); choose a writable output directory "
                          "(hydra.run.dir=...).") from None
    try:
        os.close(fd)
        os.chmod(tmp, 0o666 & ~_umask())   # mkstemp creates the file 0600
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS, errno.EPERM):
            kept = "the previous version is kept" if path.exists() else "nothing was written"
            raise OutputError(f"could not write {path} ({os.strerror(err.errno)}); {kept}. Free space or choose "
                              "another output directory.") from None
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
