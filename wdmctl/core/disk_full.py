"""A write that fails for lack of space (or any OS error while a known file set is written) as one line:
which file, how much space is free, and what is still safe, instead of a traceback from deep inside
safetensors or diffusers.

safetensors reports a full disk as `SafetensorError: Error while serializing: I/O error: No space left on
device (os error 28)`: an Exception without an errno, so the words of ENOSPC in a message count too.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from wdmctl.errors import WdmError, first_line

_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


class WriteFailed(WdmError):
    """Writing a file failed (usually a full disk); the message names the file, the free space and what is safe."""


def free_bytes(path: str | Path) -> int:
    """Free space for an unprivileged writer on the filesystem holding `path` (or its nearest existing parent)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def format_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def newest_file(folder: Path) -> Path | None:
    """The most recently modified file under `folder`: the one being written when a write into it failed."""
    files = [p for p in Path(folder).rglob("*") if p.is_file()] if Path(folder).is_dir() else []
    return max(files, key=lambda p: p.stat().st_mtime_ns, default=None)


def note_failed_file(err: BaseException, folder: Path) -> None:
    """Remember on `err` the file a failed write into `folder` was writing (its newest file), for
    `write_failure`: a writer that removes its partial folder before re-raising calls this first, or the name
    goes with the folder."""
    if getattr(err, "written_file", None) is None and not getattr(err, "filename", None):
        err.written_file = newest_file(folder)


def full_disk(err: BaseException) -> str | None:
    """What ran out, in the OS's words made lower case ("no space left on device", "disk quota exceeded",
    "file too large"), from `err`'s errno or, where it carries none (safetensors), its message; else None."""
    for code in sorted(_FULL_ERRNOS):
        words = os.strerror(code)
        if (isinstance(err, OSError) and err.errno == code) or (isinstance(err, Exception) and words in str(err)):
            return words[0].lower() + words[1:]
    return None


def write_failure(err: BaseException, where: str | Path, doing: str, safe: str,
                  any_os_error: bool = False) -> WriteFailed | None:
    """The one-line error for `err`, raised while `doing` (e.g. "saving checkpoint step-0000040") wrote into
    `where` (a file, or a folder being filled: then its newest file is named), or None when `err` is not a
    failed write (a full disk; with `any_os_error` any OSError) and should propagate as it is. `safe` says
    what is intact. Call it before cleaning up a partial folder, so the file can still be found."""
    full = full_disk(err)
    if not (full or (any_os_error and isinstance(err, OSError))):
        return None
    named = getattr(err, "filename", None) or getattr(err, "written_file", None)
    file = Path(named) if named else (newest_file(Path(where)) if Path(where).is_dir() else Path(where))
    cause = full or getattr(err, "strerror", None) or first_line(err, 120)
    return WriteFailed(f"{doing} failed: {cause} writing {file or where} ({format_bytes(free_bytes(where))} free); "
                       f"{safe}")
