"""The one family of user-facing failures: the CLI prints the message on one line and exits 2."""


class CompressError(Exception):
    """A failure the user can fix: bad input, missing file, unreachable network, failed check."""


class ConfigError(CompressError):
    """A recipe or override that does not validate."""


class CheckFailed(CompressError):
    """A stage's own acceptance check (parity, accuracy goal) did not hold."""


def short(e: BaseException, limit: int = 160, typed: bool = True) -> str:
    """An exception as one short line: its type (``typed``) and the first line of its message."""
    lines = str(e).strip().splitlines()
    first = lines[0][:limit] if lines else ""
    if not typed:
        return first or type(e).__name__
    return f"{type(e).__name__}: {first}" if first else type(e).__name__
