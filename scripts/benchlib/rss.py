"""Peak RSS, shared by the measurement children and the scale processes (bench_tasks.py):
stdlib only and nothing else, so that importing it costs the plain consumer no memory."""

from __future__ import annotations

import resource
import sys
from contextlib import suppress


def peak_rss_mib() -> float:
    """This process's peak resident set size.

    On Linux it is ``VmHWM`` from /proc/self/status, not ``ru_maxrss``: Linux keeps
    ``ru_maxrss`` across fork and execve, so a measurement child would report at least the
    parent's own peak at the time it was started (the parent that pre-fills queues grows
    to ~60 MiB). Elsewhere ``ru_maxrss`` (macOS reports bytes, others KiB).
    """
    with suppress(OSError, ValueError, IndexError), open("/proc/self/status",
                                                         encoding="ascii") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024
