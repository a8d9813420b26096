"""Writing the user's files: atomically, keeping their mode and links, one writer at a time.

* :func:`atomic_write_bytes` writes through a temporary file in the same folder and ``os.replace``:
  readers see the old file or the new one, never a partial write. A file that is replaced keeps its
  permission bits (and, where allowed, its owner); a new one gets ``0o666 & ~umask`` like any file
  the user creates. A path that is a symbolic link stays a link: its target is replaced.
* Temporaries are named ``.{name}.{pid}.{random}.tmp``; one left by a killed writer (its process is
  gone, or it is older than an hour) is removed by the next write to that path.
* :func:`locked` holds an exclusive ``flock`` on ``.{name}.lock`` next to the file, for a
  read-modify-write by several processes (calibration runs of a job array writing one LUT).
* Every failure is a :class:`FileWriteError` whose message starts with the path and says why;
  :func:`check_writable` raises it before any work is done.
"""
from __future__ import annotations

import errno
import os
import re
import secrets
import stat
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Union

try:
    import fcntl
except ImportError:  # pragma: no cover - not on Linux/macOS: no locking
    fcntl = None

__all__ = ["atomic_write_bytes", "check_writable", "locked", "FileWriteError", "STALE_AFTER_S", "special_file_kind"]

PathLike = Union[str, os.PathLike]
STALE_AFTER_S = 3600.0  # a temporary this old is stale even if its pid is alive (pids are reused)


class FileWriteError(OSError):
    """A file cannot be written. The message starts with the path and says why."""

    def __init__(self, message: str, code: int = None, path: PathLike = None):
        super().__init__(message)
        self.message = message
        self.errno = code
        self.filename = None if path is None else str(path)

    def __str__(self) -> str:
        return self.message

    def __reduce__(self):  # picklable (across multiprocessing)
        return (type(self), (self.message, self.errno, self.filename))


def target_of(path: PathLike) -> Path:
    """The file a write to ``path`` replaces: ``path`` itself, or where its symbolic link(s) lead."""
    path = Path(path)
    return Path(os.path.realpath(path)) if path.is_symlink() else path


def _why(exc: OSError) -> str:
    return exc.strerror or str(exc)


def _fail(path: PathLike, exc: OSError, what: str) -> FileWriteError:
    code = getattr(exc, "errno", None)
    if code == errno.ENOSPC or code == errno.EDQUOT:
        what = f"the disk is full ({_why(exc)}); any earlier version of the file is unchanged"
    return FileWriteError(f"{path}: cannot write: {what}", code, path)


def special_file_kind(path: PathLike) -> Optional[str]:
    """``"a FIFO"``, ``"a character device"``, ... when ``path`` exists and is neither a regular file
    nor a folder (links followed); ``None`` otherwise."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return None
    for test, kind in ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return None


def _folder(path: PathLike, target: Path) -> Path:
    """Check ``target`` is not a folder or a special file (a FIFO, a device such as /dev/null: replacing
    it would destroy it), create its folder; raise :class:`FileWriteError` otherwise."""
    if target.is_dir():
        raise FileWriteError(f"{path}: cannot write: it is a directory; give a file name inside it",
                             errno.EISDIR, path)
    kind = special_file_kind(target)
    if kind is not None:
        raise FileWriteError(f"{path}: cannot write: it is {kind}, not a regular file; give a file path",
                             errno.EINVAL, path)
    folder = target.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        above = next((p for p in [folder, *folder.parents] if p.exists()), None)
        if above is not None and not above.is_dir():
            raise FileWriteError(f"{path}: cannot write: {above} is a file, not a folder",
                                 errno.ENOTDIR, path) from exc
        raise _fail(path, exc, f"folder {folder} cannot be created ({_why(exc)})") from exc
    if not folder.is_dir():
        raise FileWriteError(f"{path}: cannot write: {folder} is not a folder", errno.ENOTDIR, path)
    return folder


def _temporary(target: Path) -> Path:
    return target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return pid > 0  # exists, owned by someone else
    return not _zombie(pid)


def _zombie(pid: int) -> bool:
    """Whether ``pid`` has ended but its parent has not reaped it (a killed DDP rank under Lightning's launcher, a
    child of rank 0: it looked alive, and its temporary stayed until the next write after the job)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] == b"Z"
    except (OSError, IndexError):
        return False  # no /proc (macOS) or gone meanwhile: the kill above decides


def remove_stale_temporaries(target: PathLike) -> list:
    """Remove the temporaries of ``target`` left by writers that died; returns the removed paths."""
    target = Path(target)
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.(\d+)\.[0-9a-f]{{8}}\.tmp$")
    legacy = re.compile(rf"^\.{re.escape(target.name)}\.[a-z0-9_]{{8}}\.tmp$")  # earlier taohooks' mkstemp
    removed = []
    try:
        entries = list(os.scandir(target.parent))
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        match = pattern.match(entry.name)
        if match is None and not legacy.match(entry.name):
            continue
        try:
            pid, age = int(match.group(1)) if match else os.getpid(), now - entry.stat(follow_symlinks=False).st_mtime
            if age > STALE_AFTER_S or (pid != os.getpid() and not _alive(pid)):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
        except OSError:  # another writer cleaned it first, or it is not ours to remove
            continue
    return removed


def _create(tmp: Path, replaced: Path) -> int:
    """Open a new temporary with the mode (and owner) of the file it will replace."""
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
    try:
        old = os.stat(replaced)
    except OSError:
        return fd  # a new file: 0o666 & ~umask, as the kernel applied it
    try:
        os.fchmod(fd, stat.S_IMODE(old.st_mode))
        if hasattr(os, "fchown") and (old.st_uid, old.st_gid) != (os.geteuid(), os.getegid()):
            try:
                os.fchown(fd, old.st_uid, old.st_gid)
            except PermissionError:
                pass  # only root may give a file away; it stays ours with the old mode
    except BaseException:
        os.close(fd)
        raise
    return fd


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder and ``os.replace``.

    Readers see either the old file or the new one, never a partial write. Returns ``path``.
    Raises :class:`FileWriteError` (an ``OSError``) naming the path and the reason.
    """
    path = Path(path)
    target = target_of(path)
    folder = _folder(path, target)
    remove_stale_temporaries(target)
    tmp = _temporary(target)
    try:
        fd = _create(tmp, target)
    except OSError as exc:
        raise _fail(path, exc, f"folder {folder} is not writable ({_why(exc)})") from exc
    try:
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except OSError as exc:
            raise _fail(path, exc, _why(exc)) from exc
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _sync_folder(folder)
    return path


def _sync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def check_writable(path: PathLike) -> Path:
    """Raise :class:`FileWriteError` now if :func:`atomic_write_bytes` could not write ``path`` later:
    it is a directory, its folder cannot be created, or no file can be created in the folder.
    Creates the folder; leaves no file behind. Returns ``path``."""
    path = Path(path)
    target = target_of(path)
    folder = _folder(path, target)
    tmp = _temporary(target)
    try:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError as exc:
        raise _fail(path, exc, f"folder {folder} is not writable ({_why(exc)})") from exc
    try:
        os.unlink(tmp)
    except OSError:
        pass
    return path


@contextmanager
def locked(path: PathLike) -> Iterator[Path]:
    """Hold an exclusive lock for writing ``path`` (blocks until other holders are done).

    The lock is ``flock`` on the sidecar ``.{name}.lock`` (next to the link's target), so it is
    shared by every process on every machine that sees the folder through a file system with
    ``flock`` (local, NFSv4). Locks are per open file: do not nest ``locked`` on the same path.
    Yields ``path``."""
    path = Path(path)
    target = target_of(path)
    folder = _folder(path, target)
    lock = folder / f".{target.name}.lock"
    try:  # read-only open: other users who can read the folder can lock too
        fd = os.open(lock, os.O_RDONLY | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
    except OSError as exc:
        raise _fail(path, exc, f"folder {folder} is not writable ({_why(exc)}; needed for the lock file "
                               f"{lock.name})") from exc
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield path
    finally:
        os.close(fd)  # releases the lock
