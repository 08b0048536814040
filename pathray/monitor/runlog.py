"""Where a command-line run's output goes: the person gets the progress display and the
summary; everything else (pathray's log lines, Ray's own logs and warnings, native
libraries' stderr) goes to the run's log file, ``_runs/<run_id>/run.log`` in the store.

:func:`run_terminal` points file descriptor 2 at the log file for the length of the run,
so output that bypasses Python's logging (Ray's C++ core worker, processes a local Ray
starts) lands there too, and hands out the real terminal as
:attr:`RunTerminal.stream`. A local store gets its log in place while the run goes (watch it
with ``tail -f``); an ``s3://`` store's log is written to a local temporary file and uploaded
at the end (:meth:`RunTerminal.finish`). ``verbose`` leaves the terminal as it was (every log
line and Ray's output) and also writes the log file.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TextIO

from pathray.fs import join, split_uri
from pathray.store.layout import RUN_LOG, RUN_REPORT

LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"


@dataclass
class RunTerminal:
    """The terminal of one run: ``stream`` (progress and summary), ``log_path`` (local)."""

    stream: TextIO
    log_path: str
    verbose: bool

    def finish(self, store_root: str, run_id: str, storage_options: dict | None = None) -> str:
        """Move or upload the log into ``<store_root>/_runs/<run_id>/`` once the run is over;
        returns where it is."""
        target = join(store_root, RUN_LOG.file(run_id=run_id))
        fs, path = split_uri(target, storage_options)
        if "://" not in target and os.path.abspath(path) == os.path.abspath(self.log_path):
            return target
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        if "://" in target:
            fs.put_file(self.log_path, path)
        else:
            shutil.move(self.log_path, path)
        return target


def log_path_for(out: str, run_id: str) -> str:
    """The local file a run logs to while it goes: in the store for a local store, else a
    temporary file (uploaded by :meth:`RunTerminal.finish`)."""
    if "://" in out and not out.startswith("file://"):
        return os.path.join(tempfile.mkdtemp(prefix=f"pathray-{run_id}-"), RUN_LOG.name)
    return os.path.join(out.removeprefix("file://"), RUN_LOG.file(run_id=run_id))


def run_footer(log_uri: str, store_root: str, run_id: str, html: str) -> str:
    """The lines a command prints after its summary: where the run's log and its report are
    (the page when one was written, else ``report.json``)."""
    return f"\nRun log: {log_uri}\nRun report: {html or join(store_root, RUN_REPORT.file(run_id=run_id))}"


@contextmanager
def run_terminal(out: str, run_id: str, verbose: bool = False) -> Iterator[RunTerminal]:
    """Route a run's output (see the module doc) until the block ends."""
    path = log_path_for(out, run_id)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    file_handler = logging.FileHandler(path, encoding="utf-8")
    file_handler.setFormatter(logging.Formatter(LOG_FORMAT))
    handlers: list[logging.Handler] = [file_handler]
    if verbose:
        console = logging.StreamHandler(sys.stderr)
        console.setFormatter(logging.Formatter(LOG_FORMAT))
        handlers.append(console)
    with _loggers_to(handlers):
        try:
            if verbose:
                yield RunTerminal(sys.stderr, path, True)
                return
            with _stderr_to(path) as terminal:
                yield RunTerminal(terminal, path, False)
        finally:
            file_handler.close()


#: loggers that keep their own handlers and do not propagate once their library configured them
#: (Ray Data writes to its own handlers): routed to the run's log like the root logger
OWN_HANDLER_LOGGERS = ("ray", "ray.data")


@contextmanager
def _loggers_to(handlers: list[logging.Handler]) -> Iterator[None]:
    """The root logger (at INFO) and :data:`OWN_HANDLER_LOGGERS` that do not propagate write to
    ``handlers`` only, until the block ends; then each gets its handlers and level back."""
    root = logging.getLogger()
    own = [logging.getLogger(name) for name in OWN_HANDLER_LOGGERS if not logging.getLogger(name).propagate]
    saved = [(lg, lg.handlers[:], lg.level) for lg in (root, *own)]
    root.handlers = list(handlers)
    root.setLevel(logging.INFO)  # setLevel, not .level =: loggers cache isEnabledFor per level
    for lg in own:
        lg.handlers = list(handlers)
    try:
        yield
    finally:
        for lg, old_handlers, level in saved:
            lg.handlers = old_handlers
            lg.setLevel(level)


@contextmanager
def _stderr_to(path: str) -> Iterator[TextIO]:
    """Point fd 2 (and so ``sys.stderr``) at ``path``; yield a stream on the real stderr."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(path, "ab", buffering=0) as log_file:
        os.dup2(log_file.fileno(), 2)
    terminal = os.fdopen(os.dup(saved), "w", buffering=1, encoding="utf-8", errors="replace")
    try:
        yield terminal
    finally:
        sys.stderr.flush()
        terminal.flush()
        os.dup2(saved, 2)
        os.close(saved)
        terminal.close()
