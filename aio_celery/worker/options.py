"""The worker's options: one typed object that the CLI, the supervisor and tests fill in."""

from __future__ import annotations

import dataclasses
import socket

from aio_celery import defaults


@dataclasses.dataclass(frozen=True)
class WorkerOptions:
    """How one worker process runs (settings not given here come from ``app.conf``)."""

    #: tasks running at once in this process
    concurrency: int = defaults.CONCURRENCY
    #: queues to consume (default: the app's ``task_default_queue``)
    queues: tuple[str, ...] = ()
    #: node name (remote control, logs, ``request.hostname``): expanded, without ``%``
    #: (see :mod:`aio_celery.control.nodenames`)
    hostname: str = dataclasses.field(default_factory=lambda: f"aio_celery@{socket.gethostname()}")
    #: exit once the queues are empty and no task is running or waiting (for tests, batch jobs)
    burst: bool = False
    #: prefetch = multiplier x concurrency (None: ``worker_prefetch_multiplier``)
    prefetch_multiplier: int | None = None
    #: seconds running tasks get on warm shutdown (None: ``worker_shutdown_timeout``)
    shutdown_timeout: float | None = None
    #: an eta further away than this (seconds) waits on the broker (a holding queue, or
    #: native delayed delivery), not in memory, so that RabbitMQ's consumer_timeout (30 min
    #: by default) never trips; so do nearer etas beyond prefetch - concurrency
    eta_horizon: float = defaults.ETA_HORIZON
    #: a message that waited unstarted this many seconds since it was delivered is given
    #: back to the queue, and a task running this long unacknowledged is warned about:
    #: keep it below RabbitMQ's consumer_timeout (None: ``worker_unacked_max_age``; 0: off)
    unacked_max_age: float | None = None
    #: stop after this many tasks (0: never), then exit with the RECYCLE code
    max_tasks: int = 0
    #: stop when resident memory exceeds this many KiB (0: never), exit with RECYCLE
    max_memory_kib: int = 0
    #: retire a task after this many deaths of its worker process while it ran (None:
    #: ``worker_max_task_deaths``)
    max_task_deaths: int | None = None
    #: print the start-up banner
    banner: bool = True
    #: send task events (``-E``; None: the app's ``worker_send_task_events``)
    task_events: bool | None = None
    #: seconds between ``worker-heartbeat`` events; None: no worker events at all
    #: (``--without-heartbeat``)
    heartbeat_interval: float | None = defaults.HEARTBEAT_INTERVAL
    #: the supervisor's pid when this process is one of its children: remote control's
    #: shutdown and pool_grow/pool_shrink are passed to it (None: run alone)
    supervisor_pid: int | None = None

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {self.concurrency}")
        if self.max_task_deaths is not None and self.max_task_deaths < 1:
            raise ValueError(f"max_task_deaths must be at least 1, got {self.max_task_deaths}")
        if self.heartbeat_interval is not None and self.heartbeat_interval <= 0:
            raise ValueError(f"heartbeat_interval must be positive, got "
                             f"{self.heartbeat_interval}")
        if self.eta_horizon <= 0:
            raise ValueError("eta_horizon must be positive")
        if self.unacked_max_age is not None and self.unacked_max_age < 0:
            raise ValueError(f"unacked_max_age must be 0 (off) or positive, got "
                             f"{self.unacked_max_age}")

    def max_age(self, setting: float | None) -> float | None:
        """The unacked max age in effect: this option, else the app's
        ``worker_unacked_max_age``; None when it is off (0 or None)."""
        value = self.unacked_max_age if self.unacked_max_age is not None else setting
        return float(value) if value else None

    def prefetch_count(self, default_multiplier: int) -> int:
        """Celery's rule: multiplier x concurrency, at most 65535 (AMQP's limit)."""
        multiplier = self.prefetch_multiplier or default_multiplier
        return max(1, min(65535, multiplier * self.concurrency))
