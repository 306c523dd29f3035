"""Atomic file writes: a crash never leaves a half-written file under the final name.

Each write goes to a hidden temporary file beside the target, named
``.<target name>.<random>.bayes_mdn.tmp``, which is renamed onto the target once complete.
A writer holds an exclusive ``flock`` on its temporary file until the rename. A process
killed mid-write leaves its temporary file behind, unlocked (the kernel drops a dead
process's locks); the next atomic write to the same folder removes every such unlocked
file of this naming, and leaves a locked one, a write still in progress, alone. Where
``fcntl.flock`` is missing (Windows) or refused by the file system, nothing is removed:
a live write and a stale file cannot be told apart there.
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

__all__ = ["TEMP_SUFFIX", "atomic_path", "remove_stale_temporaries", "write_json"]

#: Ending of the temporary files of :func:`atomic_path`; only files that start with a dot
#: and end so are ever removed as stale.
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
    fd, tmp = _locked_temporary(target)
    try:
        yield Path(tmp)
        # mkstemp creates files readable by their owner only; give the usual permissions.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    finally:
        os.close(fd)  # releases the lock, after the rename


def _locked_temporary(target: Path) -> tuple[int, str]:
    """A new temporary file beside ``target``, created and locked by this process.

    Between creating the file and locking it, another writer's cleanup may take it for
    stale and remove it; that shows as the path no longer naming the locked file, and a
    new one is made.
    """
    while True:
        fd, tmp = tempfile.mkstemp(
            dir=target.parent, prefix=f".{target.name}.", suffix=TEMP_SUFFIX
        )
        if not _lock(fd, block=True):
            return fd, tmp
        try:
            if os.stat(tmp).st_ino == os.fstat(fd).st_ino:
                return fd, tmp
        except FileNotFoundError:
            pass
        os.close(fd)


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
    """Remove the temporary files that killed writers of :func:`atomic_path` left in
    ``folder``; returns their names. Best effort: what cannot be checked stays."""
    removed: list[str] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        if not (entry.name.startswith(".") and entry.name.endswith(TEMP_SUFFIX)):
            continue
        try:
            if not entry.is_file(follow_symlinks=False):
                continue
            fd = os.open(entry.path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            continue
        try:
            # Unlocked means its writer is gone; removed while locked by us, so a writer
            # that created it a moment ago sees it vanish and makes another.
            if _lock(fd, block=False) and os.stat(entry.path).st_ino == os.fstat(fd).st_ino:
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
