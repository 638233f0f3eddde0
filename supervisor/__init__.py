"""The parent process of ``aio_celery worker -c N``: forks, watches and replaces children.

Small and synchronous: no asyncio, and it never imports aio-pika (nor the user's app: a
short-lived child validates the app, and every child imports it after the fork, so that a
rolling restart picks up new code).
"""

from __future__ import annotations

from supervisor.arbiter import Supervisor, SupervisorOptions
from supervisor.child import ChildSpec

__all__ = ["ChildSpec", "Supervisor", "SupervisorOptions"]
