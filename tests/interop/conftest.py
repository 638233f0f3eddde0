"""The interop layer runs the real ``celery`` package against our worker and client, on the
real RabbitMQ and Redis (the Celery side is in ``celery_tasks.py`` and ``workers.py``)."""

from __future__ import annotations

# The real servers: ``_services_up`` fails every test here when one is missing.
from services import *  # noqa: F403  (fixtures: pytest finds them by name in this module)
