"""Small file helpers: checksums, directories replaced atomically, and a lock per output path.

**Atomic replacement.** :func:`atomic_directory` writes into a hidden temporary folder beside the
target. On Linux the finished folder and the old target trade places in one step
(``renameat2(RENAME_EXCHANGE)``), so the path always holds either the old or the new directory,
whatever moment a save is killed at. Where that call is missing (other systems, some network file
systems) it falls back to two renames (old away, new in), and a kill between them leaves no
directory at the path (the previous one survives beside it, in the hidden ``.old-`` folder).

**Cleaning up after killed saves.** Every temporary folder has a marker file beside it
(``<folder>.owner``: JSON naming qcompile, the folder, the pid and the host) written before the
folder is made and removed after it is gone. The next save into the same parent deletes the
temporary folders whose marker proves qcompile made them and whose process is dead (same host, pid
no longer running); nothing without such a marker is touched.

**One writer per path.** :func:`output_lock` takes an exclusive ``flock`` on ``.<name>.lock``
beside the target; a second writer fails at once with :class:`ArtifactError` naming the path and
the pid holding it. The lock is re-entrant within a thread (``qcompile compile`` holds it from
the start, then ``save`` takes it again).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import json
import os
import secrets
import shutil
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

from qcompile.errors import ArtifactError

OWNER_SUFFIX = ".owner"
_OWNER_TAG = "qcompile temporary folder"


def sha256_file(path: str | Path) -> str:
    with open(path, "rb") as f:
        return sha256_fd(f.fileno())


def sha256_fd(fd: int) -> str:
    """The sha256 of what remains to read from the open file ``fd``."""
    h = hashlib.sha256()
    for block in iter(lambda: os.read(fd, 1 << 20), b""):
        h.update(block)
    return h.hexdigest()


# ---- renameat2(RENAME_EXCHANGE) ----------------------------------------------------------------
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _renameat2() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2  # glibc >= 2.28
    except (AttributeError, OSError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_RENAMEAT2 = _renameat2()


def exchange(a: Path, b: Path) -> bool:
    """Swap the directory entries ``a`` and ``b`` in one atomic step. False when this system or file
    system cannot (the caller falls back); OSError for real failures."""
    if _RENAMEAT2 is None:
        return False
    if _RENAMEAT2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a))


# ---- temporary folders with owner markers ------------------------------------------------------
def _marker(folder: Path) -> Path:
    return folder.with_name(folder.name + OWNER_SUFFIX)


def _host() -> str:
    return socket.gethostname()


def _make_temp(parent: Path, prefix: str) -> Path:
    """A new empty folder ``parent/prefix<random>``, its owner marker written first."""
    for _ in range(100):
        folder = parent / f"{prefix}{secrets.token_hex(6)}"
        record = {"owner": _OWNER_TAG, "folder": folder.name, "pid": os.getpid(), "host": _host()}
        try:
            fd = os.open(_marker(folder), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        except FileExistsError:
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(record, f)
        try:
            os.mkdir(folder, 0o700)
        except FileExistsError:
            _marker(folder).unlink()
            continue
        return folder
    raise FileExistsError(f"cannot create a temporary folder in {parent}")


def _remove_temp(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    if not os.path.lexists(folder):
        _marker(folder).unlink(missing_ok=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    return True


def remove_stale_temps(parent: Path) -> list[Path]:
    """Delete the temporary folders in ``parent`` that a dead qcompile process left (see the module
    docstring); returns them. Anything whose marker does not prove that is left alone."""
    removed: list[Path] = []
    try:
        markers = [p for p in parent.iterdir() if p.name.startswith(".") and p.name.endswith(OWNER_SUFFIX)]
    except OSError:
        return removed
    for marker in markers:
        try:
            if not marker.is_file() or marker.is_symlink() or marker.stat().st_size > 4096:
                continue
            record = json.loads(marker.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        folder = marker.with_name(marker.name.removesuffix(OWNER_SUFFIX))
        if not (
            isinstance(record, dict)
            and record.get("owner") == _OWNER_TAG
            and record.get("folder") == folder.name
            and record.get("host") == _host()
            and isinstance(record.get("pid"), int)
            and not isinstance(record.get("pid"), bool)
            and record["pid"] > 0
            and not _pid_alive(record["pid"])
        ):
            continue
        if os.path.lexists(folder) and (folder.is_symlink() or not folder.is_dir()):
            continue  # not what we made: leave it
        _remove_temp(folder)
        removed.append(folder)
    return removed


@contextlib.contextmanager
def atomic_directory(target: Path) -> Iterator[Path]:
    """Yield a hidden temporary directory beside ``target``; when the block succeeds it replaces
    ``target`` (atomically where the system allows: see the module docstring), when it fails it is
    removed and ``target`` is untouched. Permissions follow the umask (not mkdtemp's 0700)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(target.parent)
    tmp = _make_temp(target.parent, f".{target.name}.tmp-")
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        for p in [tmp, *tmp.rglob("*")]:
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~umask)
        _install(tmp, target)
    except BaseException:
        _remove_temp(tmp)
        raise
    _remove_temp(tmp)  # after an exchange it holds the previous directory


def _install(tmp: Path, target: Path) -> None:
    """Put ``tmp`` at ``target``. An existing target ends up at ``tmp`` (exchange) or inside a marked
    ``.old-`` folder (fallback), both removed by the caller or by the next save's cleanup."""
    if not os.path.lexists(target):
        os.replace(tmp, target)
        return
    if exchange(tmp, target):
        return
    old = _make_temp(target.parent, f".{target.name}.old-")
    os.replace(target, old / "previous")
    os.replace(tmp, target)  # a kill before this line leaves no directory at target (see the docstring)
    _remove_temp(old)


# ---- one writer per output path ----------------------------------------------------------------
_held: dict[Path, tuple[int, int]] = {}  # lock path -> (thread id, depth)
_held_guard = threading.Lock()


def lock_path(target: Path) -> Path:
    return target.parent / f".{target.name}.lock"


@contextlib.contextmanager
def output_lock(target: Path) -> Iterator[None]:
    """Hold the exclusive lock on writing ``target`` (see the module docstring)."""
    target = Path(os.path.abspath(target.expanduser()))
    lock = lock_path(target)
    me = threading.get_ident()
    with _held_guard:
        holder = _held.get(lock)
        if holder is not None:
            if holder[0] != me:
                raise ArtifactError(f"{target} is being written by another thread of this process; wait for it")
            _held[lock] = (me, holder[1] + 1)
    if holder is not None:
        try:
            yield
        finally:
            with _held_guard:
                tid, depth = _held[lock]
                _held[lock] = (tid, depth - 1)
        return
    fd = _acquire(lock, target)
    with _held_guard:
        _held[lock] = (me, 1)
    try:
        yield
    finally:
        with _held_guard:
            del _held[lock]
        with contextlib.suppress(OSError):
            os.unlink(lock)  # before unlocking: a waiter that opened this file rechecks the inode
        os.close(fd)


def _acquire(lock: Path, target: Path) -> int:
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ArtifactError(f"cannot write {target}: cannot create {lock.parent}: {e.strerror}") from None
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
        except OSError as e:
            raise ArtifactError(f"cannot write {target}: cannot open its lock file {lock}: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.read(fd, 64).decode("ascii", "replace").strip()
            os.close(fd)
            raise ArtifactError(
                f"{target} is being written by another qcompile process"
                f"{f' (pid {pid})' if pid.isdigit() else ''}; wait for it to finish or choose another output path"
            ) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock, follow_symlinks=False).st_ino
        except FileNotFoundError:
            same = False
        if same:  # not a file its previous holder had already unlinked
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())
            return fd
        os.close(fd)
