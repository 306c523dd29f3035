"""Atomic file writes: a crash never leaves a half-written file under the final name.

Each write goes to a hidden temporary file beside the target, renamed onto the target once
complete. Its writer first creates and ``flock``-s a lock file, ``.<target name>.<random>``
plus ``.bayes_mdn.lock``, and names the temporary file after it (``.bayes_mdn.tmp`` in
place of ``.bayes_mdn.lock``); both are gone once the write ends, however it ends, unless
the process is killed. The lock is held on a file of its own, not on the temporary file,
because some writers (HDF5, for netCDF) lock the file they write themselves. The kernel
drops a dead process's locks, so the next atomic write to the same folder can tell a
killed write from a live one: it removes the temporary and lock files of every unlocked
lock file of this naming, and leaves those of live writes alone. Where ``fcntl.flock`` is
missing (Windows) or refused by the file system, nothing is removed: a live write and a
stale file cannot be told apart there.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["LOCK_SUFFIX", "TEMP_SUFFIX", "atomic_path", "remove_stale_temporaries", "write_json"]

#: Endings of the lock and temporary files of :func:`atomic_path`; only files that start
#: with a dot and end so are ever removed as stale.
LOCK_SUFFIX = ".bayes_mdn.lock"
TEMP_SUFFIX = ".bayes_mdn.tmp"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it onto ``path``.

    The rename is atomic on POSIX and Windows file systems, so readers see either the
    old file or the complete new one. On error the temporary file is removed; stale
    temporary files of killed writers in the same folder are removed first (see the
    module's notes).

    Raises
    ------
    ValueError
        When ``path`` is empty.
    IsADirectoryError
        When ``path`` is an existing folder.
    """
    if os.fspath(path) in ("", b""):
        raise ValueError("path must name a file, got an empty path ''")
    target = Path(path)
    if target.is_dir():
        raise IsADirectoryError(f"path {os.fspath(path)!r} is a folder; name a file to write")
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target.parent)
    lock_fd, lock, tmp = _claim(target)
    try:
        yield tmp
        # mkstemp creates files readable by their owner only; give the usual permissions.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    finally:
        # The lock file goes while still locked, so no cleaner ever sees it unlocked.
        with contextlib.suppress(FileNotFoundError):
            os.remove(lock)
        os.close(lock_fd)


def _claim(target: Path) -> tuple[int, str, Path]:
    """A locked lock file beside ``target`` and the (created, empty) temporary file named
    after it: (lock descriptor, lock path, temporary path).

    Between creating the lock file and locking it, another writer's cleanup may take it
    for stale and remove it; that shows as its path no longer naming the locked file, and
    another is made.
    """
    while True:
        fd, lock = tempfile.mkstemp(
            dir=target.parent, prefix=f".{target.name}.", suffix=LOCK_SUFFIX
        )
        if _lock(fd, block=True) and not _names(lock, fd):
            os.close(fd)
            continue
        tmp = Path(lock[: -len(LOCK_SUFFIX)] + TEMP_SUFFIX)
        try:
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
            return fd, lock, tmp
        except BaseException as err:
            with contextlib.suppress(FileNotFoundError):
                os.remove(lock)
            os.close(fd)
            # A temporary file of that name left without its lock file: take another name.
            if not isinstance(err, FileExistsError):
                raise


def _names(path: str, fd: int) -> bool:
    """Whether ``path`` still names the file open as ``fd``."""
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def _lock(fd: int, block: bool) -> bool:
    """Take an exclusive flock on ``fd``: True when held, False when flock is unavailable.

    Raises ``BlockingIOError`` when ``block`` is False and another holds the lock.
    """
    if fcntl is None:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if block else fcntl.LOCK_NB))
    except BlockingIOError:
        raise
    except OSError:  # a file system without flock (some network mounts)
        return False
    return True


def remove_stale_temporaries(folder: str | os.PathLike[str]) -> list[str]:
    """Remove what killed writers of :func:`atomic_path` left in ``folder`` (temporary
    and lock files); returns the names removed. Best effort: what cannot be checked
    stays."""
    removed: list[str] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        if not (entry.name.startswith(".") and entry.name.endswith(LOCK_SUFFIX)):
            continue
        try:
            if not entry.is_file(follow_symlinks=False):
                continue
            fd = os.open(entry.path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            continue
        try:
            # Unlocked means its writer is gone. Removed while we hold the lock, so that a
            # writer which created it a moment ago sees it vanish and makes another.
            if _lock(fd, block=False) and _names(entry.path, fd):
                tmp = entry.path[: -len(LOCK_SUFFIX)] + TEMP_SUFFIX
                with contextlib.suppress(FileNotFoundError):
                    os.remove(tmp)
                    removed.append(os.path.basename(tmp))
                os.remove(entry.path)
                removed.append(entry.name)
        except OSError:  # BlockingIOError: a live writer holds it
            pass
        finally:
            os.close(fd)
    return removed


def write_json(path: str | os.PathLike[str], data: Any) -> None:
    """Write ``data`` as JSON atomically; NaN or infinity raise ``ValueError`` first."""
    text = json.dumps(data, indent=2, allow_nan=False, sort_keys=False)
    with atomic_path(path) as tmp:
        tmp.write_text(text + "\n")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
