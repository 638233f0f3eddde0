"""Logging set-up for the command line (the library itself never configures logging)."""

from __future__ import annotations

import logging
import os

#: one line per record, with the PID and the process's role (supervisor, child 2/4, ...)
LOG_FORMAT = "[%(asctime)s: %(levelname)s/{label} %(process)d] %(name)s: %(message)s"


class AtomicStderrHandler(logging.Handler):
    """Writes each record to fd 2 with a single ``write()``: records of processes that share
    stderr (the supervisor and its children) never interleave mid-line."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            data = (self.format(record) + "\n").encode("utf-8", "backslashreplace")
            while data:
                written = os.write(2, data)
                data = data[written:]
        except Exception:
            self.handleError(record)


def configure(level: str, label: str = "MainProcess") -> None:
    """Log to stderr at ``level``, tagging every line with ``label`` and the PID."""
    handler = AtomicStderrHandler()
    handler.setFormatter(logging.Formatter(LOG_FORMAT.format(label=label)))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiormq/aio-pika are chatty about reconnects that the worker reports itself.
    for noisy in ("aiormq", "aio_pika"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
