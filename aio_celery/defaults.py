"""The worker's and the supervisor's defaults, written once.

The CLI, the app's settings (:mod:`aio_celery.config`), the worker's options
(:class:`~aio_celery.worker.options.WorkerOptions`) and the supervisor read them from
here; a test holds the README, ``--help`` and the systemd units to them.
Standard library only, and nothing imported: the supervisor imports this module without
the app or aio-pika.
"""

from __future__ import annotations

from typing import Final

#: tasks running at once in each worker process (``--concurrency``)
CONCURRENCY: Final = 100
#: prefetch = this x concurrency (``worker_prefetch_multiplier``, Celery's default)
PREFETCH_MULTIPLIER: Final = 4
#: seconds running tasks get on warm shutdown (``worker_shutdown_timeout``,
#: ``--shutdown-timeout``): fits a 30 s Kubernetes grace period with the supervisor's
#: :data:`WARM_GRACE` after it
SHUTDOWN_TIMEOUT: Final = 25.0
#: seconds the supervisor waits beyond the shutdown timeout before SIGKILL
WARM_GRACE: Final = 5.0
#: an eta further away than this many seconds waits on the broker, not in memory
#: (``--eta-horizon``); below :data:`UNACKED_MAX_AGE`
ETA_HORIZON: Final = 600.0
#: seconds after its delivery a message still waiting to start is given back
#: (``worker_unacked_max_age``): 25 minutes, below RabbitMQ's default consumer_timeout
#: of 30
UNACKED_MAX_AGE: Final = 1500.0
#: deaths of its worker process while a task ran before it is retired
#: (``worker_max_task_deaths``, ``--max-task-deaths``)
MAX_TASK_DEATHS: Final = 3
#: finished tasks per process that may wait for the backend or the broker
#: (``worker_max_pending_results``)
MAX_PENDING_RESULTS: Final = 1000
#: seconds without a beat from a child's event loop before the supervisor replaces it
#: (``--heartbeat-timeout``)
HEARTBEAT_TIMEOUT: Final = 30.0
#: seconds from a child's start to consuming before the supervisor replaces it
#: (``--startup-timeout``)
STARTUP_TIMEOUT: Final = 60.0
#: seconds between ``worker-heartbeat`` events (``--heartbeat-interval``)
HEARTBEAT_INTERVAL: Final = 2.0
#: a dependency that fails (the broker, the result backend) is tried again after this
#: many seconds, then twice as long each time, up to :data:`RETRY_MAX_DELAY`
RETRY_FIRST_DELAY: Final = 0.5
RETRY_MAX_DELAY: Final = 5.0
