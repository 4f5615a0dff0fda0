"""Crash-safe file writes: the one atomic-write helper every writer in the project uses.

The data goes to a temporary file in the target's directory (same filesystem, so the rename is
atomic on POSIX), the file is fsync'ed, renamed over the target with ``os.replace`` and the
directory is fsync'ed so the rename itself survives a power loss. A crash at any point leaves
either the old file or the new one, never a truncated mix. A full disk (or quota) is a
:class:`DiskFullError` naming the file: the partial temporary file is removed, the earlier
files are untouched.

The new file gets the mode an ordinary ``open(path, "w")`` would give it (``0666`` less the
umask; ``mkstemp`` alone makes it ``0600``, so a group could not read prepared data), or the
mode of the file it replaces. Renaming over a symbolic link replaces the link, never its target.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any, Callable

from mamba_train.errors import MambaTrainError

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class DiskFullError(MambaTrainError, OSError):
    """No space left on the device (or quota exceeded) while writing a file."""


def _is_disk_full(e: BaseException | None) -> bool:
    """Also through torch.save, which reports a failed write as a RuntimeError."""
    while e is not None:
        if isinstance(e, OSError) and e.errno in DISK_FULL:
            return True
        if "No space left on device" in str(e) or "Disk quota exceeded" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def disk_full_error(path: Path) -> DiskFullError:
    try:
        free = f"{shutil.disk_usage(path.parent).free / 2**20:.0f} MiB free"
    except OSError:
        free = "free space unknown"
    return DiskFullError(
        f"no space left on the device while writing {path} ({free}); the files written before "
        "it are intact: free some space (or move the output elsewhere) and rerun -- a training "
        "run resumes with ckpt_path=last, prepare continues where it stopped")


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. platforms without directory file descriptors
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def umask() -> int:
    """The process umask, read without changing it where Linux shows it (``os.umask`` can only
    be read by setting it, which races with other threads creating files)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _new_file_mode(path: Path) -> int:
    try:
        st = os.lstat(path)
        if stat.S_ISREG(st.st_mode):
            return stat.S_IMODE(st.st_mode)
    except OSError:
        pass
    return 0o666 & ~umask()


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` to produce the content, then move it into place atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, _new_file_mode(path))
    finally:
        os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except (OSError, RuntimeError) as e:
        if _is_disk_full(e):
            raise disk_full_error(path) from None
        raise
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_bytes(path: str | Path, data: bytes | memoryview) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
    atomic_write(path, write)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


class UnsafePathError(MambaTrainError, OSError):
    """A file the project would write is a symbolic link: writing would change the link's target."""


def refuse_symlinks(*paths: str | Path) -> None:
    """One line naming the first path that is a symbolic link (a link planted in a run or data
    directory would make a write land on whatever it points to)."""
    for p in paths:
        if os.path.islink(p):
            raise UnsafePathError(
                f"{p} is a symbolic link (to {os.readlink(p)}); mamba_train writes its files "
                "there itself and never through a link: remove the link, or use another directory")


def exclusive_lock(path: str | Path, note: str) -> tuple[int | None, str]:
    """Take an exclusive ``flock`` on ``path`` (created if missing, never through a symbolic
    link) and write ``note`` into it: ``(fd, "")``; ``(None, holder's note)`` while another
    process holds it. The kernel drops the lock when the holder dies, even on ``kill -9``."""
    import fcntl

    refuse_symlinks(path)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)
    except OSError as e:
        if e.errno == errno.ELOOP:  # a link planted since the check
            refuse_symlinks(path)
        raise
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        return None, holder
    os.ftruncate(fd, 0)
    os.pwrite(fd, note.encode(), 0)
    return fd, ""


def release_lock(fd: int) -> None:
    import fcntl

    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)
