"""Exit codes of ``aio_celery`` processes, supervisor and children (documented in the README).

Kept free of imports so that the supervisor can use them without loading aio-pika.
"""

from __future__ import annotations

#: clean exit (warm or cold shutdown finished, or burst mode drained the queues)
OK = 0
#: the app could not be loaded (module missing or failed to import, attribute missing)
APP_LOAD_ERROR = 3
#: bad command-line options or settings
USAGE_ERROR = 2
#: start-up failed: a configuration error (e.g. redis-py missing for result_backend), app
#: context raised, the broker refused the login or has no such vhost, a queue cannot be
#: declared as asked (or the broker is unreachable and retrying at start-up is off or used
#: up: ``broker_connection_retry_on_startup``)
STARTUP_ERROR = 4
#: the broker stayed unreachable for all of ``broker_connection_max_retries`` (by default
#: the worker retries for ever and never exits with this)
BROKER_LOST = 5
#: the child finished its tasks and exits to be replaced (max tasks/memory per child)
RECYCLE = 6
#: supervisor: children kept crashing (more than the crash-loop cap within its window)
CRASH_LOOP = 7
#: ``aio_celery health``: the probe failed (not alive, or not ready with --ready)
UNHEALTHY = 1
#: an unexpected error in the worker itself
INTERNAL_ERROR = 70

NAMES = {
    OK: "ok",
    USAGE_ERROR: "usage error",
    APP_LOAD_ERROR: "app load error",
    STARTUP_ERROR: "start-up error",
    BROKER_LOST: "broker connection lost",
    RECYCLE: "recycle",
    CRASH_LOOP: "crash loop",
    INTERNAL_ERROR: "internal error",
}
