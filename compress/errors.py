"""The one family of user-facing failures: the CLI prints the message on one line and exits 2."""


class CompressError(Exception):
    """A failure the user can fix: bad input, missing file, unreachable network, failed check."""


class ConfigError(CompressError):
    """A recipe or override that does not validate."""


class CheckFailed(CompressError):
    """A stage's own acceptance check (parity, accuracy goal) did not hold."""
