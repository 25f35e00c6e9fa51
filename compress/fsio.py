"""Atomic, durable file writes, content hashes and inter-process locks: a killed run never leaves a
half-written file behind, a finished write survives a power cut, and two processes never write the
same folder at once.

Every write goes through :func:`commit`: the finished file (or every file of a finished folder) is
flushed to disk, renamed into place, and the folder holding it is flushed, so after a crash a name
points to the whole new content or to the old one, never to a torn or empty file."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from compress.errors import CompressError

log = logging.getLogger(__name__)

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; runs are not protected from each other there
    fcntl = None  # type: ignore[assignment]

_UMASK = os.umask(0)
os.umask(_UMASK)


# -- durability ------------------------------------------------------------------------------------


def _fsync(path: Path) -> None:
    """Flush ``path`` (a file's data, or a folder's entries) to disk."""
    if path.is_dir():
        if os.name == "nt":  # folders cannot be opened for fsync there
            return
        flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)
    else:
        flags = os.O_RDONLY
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    except OSError:  # a file system that cannot fsync a folder (some network mounts): nothing to add
        if not path.is_dir():
            raise
    finally:
        os.close(fd)


def commit(tmp: Path, dst: Path) -> None:
    """The one way a write lands: flush ``tmp`` (a finished file, or a finished folder with every file
    and folder in it) to disk, rename it to ``dst`` (a folder ``dst`` must not exist), then flush the
    folder that holds ``dst`` so the rename itself survives a crash."""
    if tmp.is_dir():
        for folder, dirs, files in os.walk(tmp):
            for name in files + dirs:
                if not os.path.islink(os.path.join(folder, name)):
                    _fsync(Path(folder) / name)
    _fsync(tmp)
    os.replace(tmp, dst)
    _fsync(dst.parent)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; it replaces ``path`` (durably, :func:`commit`) only if
    the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with contextlib.suppress(OSError):  # mkstemp's file is private: the file gets the usual mode
            os.chmod(tmp_path, 0o666 & ~_UMASK)
        commit(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):  # numpy / torch scalars
        return obj.item()
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def sha256_file(path: str | Path, chunk_bytes: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            h.update(chunk)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=_json_default).encode()).hexdigest()


def replace_dir(src: Path, dst: Path) -> None:
    """Move the finished directory ``src`` to ``dst`` durably (:func:`commit`), replacing whatever
    ``dst`` held."""
    old = dst.with_name(f".{dst.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if dst.exists():
        os.replace(dst, old)
    commit(src, dst)
    if old.exists():
        shutil.rmtree(old)


def link_or_copy(src: Path, dst: Path) -> None:
    """``dst`` as a hard link to ``src``, or an (atomic) copy where links are not possible."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        with atomic_path(dst) as tmp:
            shutil.copy2(src, tmp)


# -- what a finished folder holds ------------------------------------------------------------------


def manifest(folder: Path, exclude: tuple[str, ...] = ()) -> dict[str, dict]:
    """Every file under ``folder`` (POSIX relative path -> sha256 and size), ``exclude`` left out."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel not in exclude:
            files[rel] = {"sha256": sha256_file(path), "size": path.stat().st_size}
    return files


def damage(folder: Path, files: dict[str, dict]) -> str | None:
    """Why ``folder`` no longer holds what :func:`manifest` recorded (a file missing, of another size
    or with other content), or None when every file is as written. Sizes are checked first; each file
    is hashed once."""
    for rel, want in files.items():
        try:
            size = (folder / rel).stat().st_size
        except OSError:
            return f"{rel} is missing"
        if size != want["size"]:
            return f"{rel} has {size} bytes, {want['size']} were written"
    for rel, want in files.items():
        try:
            digest = sha256_file(folder / rel)
        except OSError as e:
            return f"{rel} cannot be read ({e.strerror or e})"
        if digest != want["sha256"]:
            return f"{rel} was altered (sha256 {digest[:12]}, {want['sha256'][:12]} was written)"
    return None


# -- locks -----------------------------------------------------------------------------------------

_held: dict[str, int] = {}  # lock files this process holds -> how many times (re-entered)


def _holder(path: Path) -> str:
    try:
        pid = path.read_text(encoding="utf-8").strip()
    except OSError:
        pid = ""
    return f"pid {pid}" if pid.isdigit() else "another process"


@contextmanager
def locked(path: Path, what: str, timeout: float | None = None, hint: str = "") -> Iterator[None]:
    """Hold an exclusive lock on the file ``path`` (created if absent; it records the holder's pid)
    while the block runs. Another process holding it: one log line "waiting for WHAT held by pid N",
    then wait, as long as it takes (``timeout`` None) or ``timeout`` seconds (0: not at all), after
    which a :class:`CompressError` says who holds it (``hint`` appended). The lock goes with the
    process: a killed holder frees it. Re-entrant within a process."""
    path = Path(path)
    key = str(path.resolve())
    if key in _held or fcntl is None:
        _held[key] = _held.get(key, 0) + 1
        try:
            yield
        finally:
            _held[key] -= 1
            if not _held[key]:
                del _held[key]
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        _acquire(fd, path, what, timeout, hint)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        _held[key] = 1
        try:
            yield
        finally:
            del _held[key]
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _acquire(fd: int, path: Path, what: str, timeout: float | None, hint: str) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return
    except BlockingIOError:
        pass
    holder = _holder(path)
    if timeout is not None and timeout <= 0:
        raise CompressError(f"{what} is held by {holder}{hint}")
    log.info(f"waiting for {what} held by {holder}")
    if timeout is None:
        fcntl.flock(fd, fcntl.LOCK_EX)
        return
    deadline = time.monotonic() + timeout
    while True:
        time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise CompressError(f"{what} is still held by {_holder(path)} after {timeout:g} s{hint}") from None
