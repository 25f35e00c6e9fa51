"""The one family of user-facing failures: the CLI prints the message on one line and exits 2."""


class CompressError(Exception):
    """A failure the user can fix: bad input, missing file, unreachable network, failed check."""


class ConfigError(CompressError):
    """A recipe or override that does not validate."""


class CheckFailed(CompressError):
    """A stage's own acceptance check (parity, accuracy goal) did not hold; ``details``: its numbers."""

    def __init__(self, message: str, details: dict | None = None):
        super().__init__(message)
        self.details = details or {}


def short(e: BaseException, limit: int = 160, typed: bool = True) -> str:
    """An exception as one short line: its type (``typed``) and the first line of its message."""
    lines = str(e).strip().splitlines()
    first = lines[0][:limit] if lines else ""
    if not typed:
        return first or type(e).__name__
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def as_os_error(e: BaseException, path: object = None) -> OSError | None:
    """The failed system call behind ``e``: ``e`` itself or an OSError it was raised from (``raise ...
    from``), or, for a library that reports I/O errors in its own exception type the way Rust's do
    ("No space left on device (os error 28)"), an OSError with that errno for ``path``; None when
    ``e`` is no such failure (an exception merely raised while handling one is not)."""
    import errno
    import os
    import re

    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, OSError) and cur.errno is not None:
            return cur
        m = re.search(r"\(os error (\d+)\)", str(cur))
        if m and int(m.group(1)) in errno.errorcode:
            code = int(m.group(1))
            return OSError(code, os.strerror(code), None if path is None else str(path))
        cur = cur.__cause__
    return None


# what a user can do about the failed system calls a run meets on its files
_ERRNO_HINTS = {"ENOSPC": "the disk is full: free some space and rerun (finished stages are kept)",
                "EDQUOT": "the disk quota is exceeded: free some space and rerun (finished stages are kept)",
                "EFBIG": "the file is larger than this system allows",
                "EROFS": "the file system is read-only: choose another folder",
                "EACCES": "permission denied: choose a folder you may write to, or change its permissions",
                "EPERM": "operation not permitted: choose a folder you may write to",
                "ENOTDIR": "a part of the path is a file, not a folder",
                "EISDIR": "it is a folder, not a file",
                "ENOENT": "no such file or folder",
                "EMFILE": "too many open files: raise the limit (ulimit -n)",
                "EIO": "input/output error: the disk may be failing"}


def os_error_line(e: OSError) -> str:
    """A failed system call as one line: what failed, on which file, and what to do."""
    import errno
    import os

    name = errno.errorcode.get(e.errno or -1, "")
    what = _ERRNO_HINTS.get(name) or (e.strerror or os.strerror(e.errno or 0) or type(e).__name__).lower()
    files = [str(f) for f in (e.filename, e.filename2) if f is not None]
    where = f" ({' -> '.join(files)})" if files else ""
    return f"{what}{where}".replace("\n", " ")
