"""Logging set-up for the command line (the library itself never configures logging)."""

from __future__ import annotations

import logging
import sys

#: one line per record, with the PID so that lines of several processes stay apart
LOG_FORMAT = "[%(asctime)s: %(levelname)s/%(processName)s %(process)d] %(name)s: %(message)s"


def configure(level: str) -> None:
    """Log to stderr at ``level``. Each record is written with one ``write`` call, so lines
    from several processes sharing the stream do not interleave mid-line."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiormq/aio-pika are chatty at INFO about reconnects we already report ourselves.
    for noisy in ("aiormq", "aio_pika"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
