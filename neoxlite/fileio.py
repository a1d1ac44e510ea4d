"""Atomic file and folder writes: a reader sees the old content or the new, never half of one.

A folder is written as a hidden temporary sibling, `.<name>.<8 chars>.partial`, renamed into place when complete.
Its writer holds an flock on it while writing; a lock dies with its process, so the next write of the same
folder deletes the temporary folders whose lock is free (left by a kill -9) and never a live writer's.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _disk_error(path: Path, err: OSError) -> OSError:
    if err.errno == errno.ENOSPC:
        return OSError(errno.ENOSPC, f"no space left on the disk holding {path}; free some space or choose another folder")
    return err


def umask() -> int:
    """The process's umask (read without changing it for good)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp makes 0600; the result should read like any saved file
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise _disk_error(path, err) from err
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def file_identity(st: os.stat_result) -> tuple[int, ...]:
    """What changes when a file is written to, truncated or replaced: device, inode, size and mtime."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def remove_orphans(dest: str | os.PathLike) -> list[Path]:
    """Deletes what killed writes of the folder `dest` left beside it; returns what was removed. A `dest` missing
    beside its `.<name>.old` (a kill between an overwrite's two renames) is first restored from it.

    Only names atomic_folder generates for `dest` are looked at: `.<name>.<8 chars>.partial` folders and
    `.<name>.old` (the old `dest` between the two renames of an overwrite), and the same names generated for
    those in turn (an atomic write nested in another); each only when its lock is free (its writer is gone)."""
    dest = Path(dest)
    removed = []
    old = dest.with_name(f".{dest.name}.old")
    if not os.path.lexists(dest) and old.is_dir() and not old.is_symlink():
        # killed between an overwrite's two renames: the old folder is the only complete one, so it goes back
        with contextlib.suppress(FileNotFoundError):
            os.replace(old, dest)
    for path in sorted(dest.parent.iterdir()):
        if _made_for(path.name, dest.name) and _remove_if_unlocked(path):
            removed.append(path)
    return removed


def _made_for(name: str, dest: str) -> bool:
    """Whether `name` is a temporary name atomic_folder generates for `dest`, or for one of those."""
    match = re.fullmatch(r"\.(.+)\.(?:[a-z0-9_]{8}\.partial|old)", name)
    return match is not None and (match.group(1) == dest or _made_for(match.group(1), dest))


def _remove_if_unlocked(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False  # gone already, or not a folder this module made
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return False  # a live writer
    try:
        if os.stat(path).st_ino != os.fstat(fd).st_ino:
            return False
        shutil.rmtree(path, ignore_errors=True)
        return True
    except FileNotFoundError:
        return False
    finally:
        os.close(fd)


def _locked_temp_folder(dest: Path) -> tuple[Path, int]:
    """A new temporary sibling folder of `dest` and the descriptor holding its flock."""
    while True:
        tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".partial"))
        fd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        fcntl.flock(fd, fcntl.LOCK_EX)
        with contextlib.suppress(FileNotFoundError):
            if os.stat(tmp).st_ino == os.fstat(fd).st_ino:
                return tmp, fd
        os.close(fd)  # another run took it for an orphan in the instant before the lock: make another


@contextlib.contextmanager
def atomic_folder(dest: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yields a temporary sibling folder; on success it is renamed to `dest`, on any error removed.

    Leftovers of earlier killed writes of `dest` are removed first (remove_orphans)."""
    dest = Path(dest)
    if dest.exists() and not overwrite:
        raise FileExistsError(f"{dest} already exists; choose another destination or remove it first")
    dest.parent.mkdir(parents=True, exist_ok=True)
    remove_orphans(dest)
    tmp, lock = _locked_temp_folder(dest)
    try:
        os.chmod(tmp, 0o777 & ~umask())  # mkdtemp makes 0700
        yield tmp
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(dest, old)
            try:
                os.replace(tmp, dest)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.replace(old, dest)  # the old folder back in its place (a kill here: remove_orphans does it)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _disk_error(dest, err) from err
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        os.close(lock)
