"""The one logger: stdlib ``logging`` under the ``compress`` name, rich's handler on a terminal and
plain lines elsewhere, a level from the CLI's ``-v``/``-q``, and a per-run file (``run.log``)."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = "compress"
FILE_ONLY = "file_only"  # a record with extra={FILE_ONLY: True} goes to run.log, not the console
_console: logging.Handler | None = None


def setup(verbosity: int = 0) -> None:
    """Console logging at INFO (``verbosity`` 0), DEBUG (> 0) or WARNING (< 0); safe to call again."""
    global _console
    root = logging.getLogger(ROOT)
    if _console is not None:
        root.removeHandler(_console)
    if sys.stderr.isatty():
        from rich.console import Console
        from rich.logging import RichHandler

        _console = RichHandler(console=Console(stderr=True), show_path=False, show_time=False)
    else:
        _console = logging.StreamHandler(sys.stderr)
    _console.setFormatter(logging.Formatter("%(message)s"))
    _console.addFilter(lambda record: not getattr(record, FILE_ONLY, False))
    _console.setLevel(logging.DEBUG if verbosity > 0 else logging.WARNING if verbosity < 0 else logging.INFO)
    root.addHandler(_console)
    root.setLevel(logging.DEBUG)  # the handlers choose; run.log keeps everything
    root.propagate = False


class _RunLogHandler(logging.FileHandler):
    """``run.log``: a record it cannot write (a full disk) is dropped without logging's own traceback
    on stderr; the console still shows it, and the error that stops the run is the CLI's one line."""

    def handleError(self, record: logging.LogRecord) -> None:
        pass


@contextmanager
def run_log(path: Path) -> Iterator[None]:
    """Also append every record of the ``compress`` loggers to ``path`` while the block runs."""
    root = logging.getLogger(ROOT)
    if _console is None and not root.handlers:
        setup()
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = _RunLogHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.DEBUG)
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        handler.close()
