"""Every file the project writes goes through here, and every storage fault becomes one line.

``atomic_write`` is the one way to write a file: a hidden temporary name beside the target
(``.<name>.<token>.tmp``), flush, fsync, rename over the target, fsync of the directory. A reader
sees the old file or the new complete one, never a part; a write that fails removes its
temporary file and raises ``StorageError``: one line naming the path, what happened (full disk,
quota, read-only or vanished filesystem, permission), the space needed and free where that is
the cause, and the fix.

Standard library only: ``trainer.run_lock`` and the SLURM launcher import it without torch.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

TMP_SUFFIX = ".tmp"
RETRY_HINT = "run the same command again"
EXIT_STORAGE = 74  # the exit code of every command stopped by a storage fault while working (EX_IOERR)

# errno -> kind. Only these are storage faults; anything else is a bug or a missing input.
_FAULTS = {
    errno.ENOSPC: "full",
    errno.EDQUOT: "quota",
    errno.EROFS: "read-only",
    errno.EACCES: "permission",
    errno.EPERM: "permission",
    errno.EIO: "io",
    errno.ESTALE: "vanished",
    errno.ENOTCONN: "vanished",
    errno.ENODEV: "vanished",
}
# Raised deep inside other libraries (torch.compile's cache, TensorBoard), these are unambiguous.
_UNAMBIGUOUS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.ESTALE}


class StorageError(OSError):
    """A write failed because of the storage; ``str()`` is the one line a user sees."""

    def __init__(self, message: str, path: str | os.PathLike, kind: str, code: int | None) -> None:
        super().__init__(code or 0, message)
        self.message = message
        self.path = str(path)
        self.kind = kind  # full | quota | read-only | permission | io | vanished

    def __str__(self) -> str:
        return self.message

    def __reduce__(self) -> tuple:  # picklable across ranks (broadcast_object) and processes
        return (StorageError, (self.message, self.path, self.kind, self.errno))


def fmt_bytes(n: float | None) -> str:
    """1536 -> '1.5 KiB'; None -> '?'."""
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def existing_parent(path: str | os.PathLike) -> Path:
    """``path`` or its nearest ancestor that exists (for statvfs of a folder not made yet)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def free_bytes(path: str | os.PathLike) -> int | None:
    """Bytes free for this user on the filesystem holding ``path`` (None when unknown)."""
    try:
        st = os.statvfs(existing_parent(path))
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def is_fault(e: BaseException) -> bool:
    """True for an OSError caused by the storage (full, quota, read-only, vanished, I/O, permission)."""
    return isinstance(e, StorageError) or (isinstance(e, OSError) and e.errno in _FAULTS)


def find_fault(e: BaseException | None) -> OSError | None:
    """The storage fault inside an exception chain (``__cause__``/``__context__``), if any.

    torch.compile, TensorBoard and pickling wrap the OSError of a full disk in their own errors;
    only unambiguous errnos count there (a permission error deep inside a library may be a bug).
    """
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, StorageError):
            return e
        if isinstance(e, OSError) and e.errno in _UNAMBIGUOUS:
            return e
        e = e.__cause__ or e.__context__
    return None


def storage_error(e: OSError, path: str | os.PathLike, *, needed: int | None = None,
                  what: str = "", fix: str = "") -> StorageError:
    """The one-line StorageError for OSError ``e`` while writing ``path`` (``e`` itself if it is one).

    ``needed``: bytes the write needed (shown for a full disk); ``what``: what was being written
    ('checkpoint', 'TensorBoard events', ...); ``fix``: overrides the default advice.
    """
    if isinstance(e, StorageError):
        return e
    path = Path(path)
    kind = _FAULTS.get(e.errno or 0, "io")
    reason = e.strerror or str(e)
    item = f"{what} {path}" if what else str(path)
    where = path if path.is_dir() else path.parent
    if kind in ("full", "quota"):
        free = free_bytes(path)
        need = f"needs {fmt_bytes(needed)}, " if needed else ""
        cause = "no space left" if kind == "full" else "disk quota exceeded"
        msg = (f"{cause} writing {item} ({need}{fmt_bytes(free)} free on its filesystem): "
               f"{fix or 'free space (or raise the quota) and ' + RETRY_HINT}")
    elif kind == "read-only":
        msg = (f"cannot write {item}: {where} is on a read-only filesystem: "
               f"{fix or 'remount it read-write or use another directory, then ' + RETRY_HINT}")
    elif kind == "permission":
        msg = (f"cannot write {item}: permission denied in {where}: "
               f"{fix or 'make it writable for this user or use another directory, then ' + RETRY_HINT}")
    else:
        msg = (f"cannot write {item}: {reason} (the filesystem of {where} failed or went away): "
               f"{fix or 'check the mount, then ' + RETRY_HINT}")
    return StorageError(msg, path, kind, e.errno)


def tmp_path(path: str | os.PathLike) -> Path:
    """The temporary name a write of ``path`` uses: hidden, unique, ending in ``.tmp``."""
    p = Path(path)
    return p.with_name(f".{p.name}.{secrets.token_hex(4)}{TMP_SUFFIX}")


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename in ``path`` durable (a no-op where the filesystem cannot fsync folders)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


Writer = Callable[[IO[bytes]], Any]


def atomic_write(path: str | os.PathLike, data: bytes | str | Writer, *, needed: int | None = None,
                 what: str = "", fix: str = "", mode: int | None = None) -> Path:
    """Write ``data`` (bytes, text, or a function writing to a binary file) to ``path`` atomically.

    Temporary file, flush, fsync, rename, folder fsync. On failure the temporary file is removed
    and a storage fault raises StorageError (one line); other errors propagate unchanged.
    """
    path = Path(path)
    tmp = tmp_path(path)
    if isinstance(data, str):
        data = data.encode()
    if needed is None and isinstance(data, bytes | bytearray):
        needed = len(data)
    try:
        if (gone := vanished(path)) is not None:
            raise gone  # never re-create its folders on the filesystem below
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException as e:
        _fail(e, tmp, path, needed, what, fix)
    return path


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, *, needed: int | None = None, what: str = "",
                fix: str = "") -> Iterator[IO[bytes]]:
    """``with atomic_open(p) as f: ...``: the body writes ``f``; committed like ``atomic_write``."""
    path = Path(path)
    tmp = tmp_path(path)
    try:
        if (gone := vanished(path)) is not None:
            raise gone
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException as e:
        _fail(e, tmp, path, needed, what, fix)


def _fail(e: BaseException, tmp: Path, path: Path, needed: int | None, what: str, fix: str) -> None:
    """After a failed write: remove the temporary file; raise the one-line StorageError of a storage
    fault (a watched directory that went away explains any error, e.g. a rename that found no
    folder), else ``e`` unchanged."""
    with contextlib.suppress(OSError):
        tmp.unlink()
    fault = vanished(path) or (e if is_fault(e) else find_fault(e))
    if fault is None:
        raise e
    err = storage_error(fault, path, needed=needed, what=what, fix=fix)
    raise err from (None if err is e else e)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, what: str = "", fix: str = "") -> Iterator[Path]:
    """For writers that only take a file name (FFCV's DatasetWriter): yields the temporary name to
    write; after the block the file is fsynced and renamed into place, committed like ``atomic_write``."""
    path = Path(path)
    tmp = tmp_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException as e:
        _fail(e, tmp, path, None, what, fix)


def atomic_link(src: str | os.PathLike, dst: str | os.PathLike, *, what: str = "") -> Path:
    """Make ``dst`` a hard link to ``src`` atomically (a copy where links are not supported)."""
    src, dst = Path(src), Path(dst)
    tmp = tmp_path(dst)
    try:
        try:
            os.link(src, tmp)
        except OSError as e:
            if e.errno in _FAULTS and e.errno not in (errno.EPERM,):
                raise
            shutil.copyfile(src, tmp)  # filesystems without hard links
        os.replace(tmp, dst)
        fsync_dir(dst.parent)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise storage_error(e, dst, needed=src.stat().st_size if src.exists() else None, what=what) from e
    return dst


def remove_partial(directory: str | os.PathLike, legacy: str = "") -> list[Path]:
    """Delete the temporary files a killed writer left in ``directory`` (not recursive); returns them.

    Only this module's names (``.<name>.<token>.tmp``), plus those matching the glob ``legacy``
    (temporary names of earlier versions): never a user's own ``*.tmp`` file.
    """
    d = Path(directory)
    if not d.is_dir():
        return []
    removed = []
    old = set(d.glob(legacy)) if legacy else set()
    for p in d.iterdir():
        mine = p.name.startswith(".") and p.name.endswith(TMP_SUFFIX) and p.name.count(".") >= 3
        if (mine or p in old) and p.is_file():
            with contextlib.suppress(OSError):
                p.unlink()
                removed.append(p)
    return removed


def check_writable(directory: str | os.PathLike, *, what: str = "directory", fix: str = "") -> Path:
    """Create ``directory`` if needed and prove a file can be written there; StorageError if not."""
    d = Path(directory)
    probe = d / f".write-check-{secrets.token_hex(4)}"
    try:
        d.mkdir(parents=True, exist_ok=True)
        atomic_write(probe, b"ok")
    except OSError as e:  # the message names the folder, not the probe
        fault = e if not isinstance(e, StorageError) else OSError(e.errno, e.strerror or str(e))
        raise storage_error(fault, d, what=what, fix=fix) from e
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()
    return d


def reserve_check(directory: str | os.PathLike, needed: int) -> tuple[bool, int | None]:
    """(whether ``needed`` bytes fit on the filesystem of ``directory``, bytes free)."""
    free = free_bytes(directory)
    return (free is None or free >= needed), free


class DirWatch:
    """Notices when a directory's filesystem goes away under a running job.

    After ``umount -l`` (or a replaced mount, or a lost network filesystem) the same path names
    another directory, or none: a writer that creates missing folders would then write beside the
    user's data on the filesystem below, and one holding an open file into a detached one.
    ``fault()`` compares the directory's (device, inode) with those it had when watched. Watches
    made by ``watch_dir`` are checked by every write of this module under their directory.
    """

    def __init__(self, path: str | os.PathLike, what: str = "run directory") -> None:
        self.path = Path(path).absolute()
        self.what = what
        st = os.stat(self.path)
        self.ident = (st.st_dev, st.st_ino)

    def fault(self) -> StorageError | None:
        """A one-line StorageError when the directory is gone or is not the one it was, else None."""
        try:
            st = os.stat(self.path)
        except OSError as e:
            if e.errno not in (errno.ENOENT, *_FAULTS):
                return None  # e.g. an interrupted stat: look again at the next check
            st = None
        if st is not None and (st.st_dev, st.st_ino) == self.ident:
            return None
        return StorageError(
            f"the {self.what} {self.path} went away while the job was writing to it (its filesystem was "
            f"unmounted, replaced or lost): remount it, then {RETRY_HINT}", self.path, "vanished", errno.ENODEV)

    def close(self) -> None:
        """Stop checking writes under this directory."""
        with contextlib.suppress(ValueError):
            _watched.remove(self)


_watched: list[DirWatch] = []


def watch_dir(path: str | os.PathLike, what: str = "run directory") -> DirWatch:
    """From now on every write under ``path`` first checks that it is still the same directory."""
    w = DirWatch(path, what)
    _watched.append(w)
    return w


def vanished(path: str | os.PathLike) -> StorageError | None:
    """The fault of a watched directory holding ``path`` that went away, else None (one stat per watch)."""
    p = Path(path).absolute()
    for w in list(_watched):
        if p.is_relative_to(w.path) and (gone := w.fault()) is not None:
            return gone
    return None
