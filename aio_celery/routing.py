"""``task_routes``: which queue a task goes to, with Celery's router forms.

``task_routes`` may be a dict (task name or glob pattern -> ``{"queue": ...}`` or a queue
name), a callable router ``(name, args, kwargs, options, task=None, **kw)``, or a list of
either; the first router that answers wins.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping
from functools import lru_cache
from typing import Any


def route_queue(routes: Any, name: str, args: list[Any], kwargs: dict[str, Any],
                options: Mapping[str, Any], task: Any = None) -> str | None:
    """The queue the routers pick for ``name``, or None to use the default queue."""
    if not routes:
        return None
    routers = routes if isinstance(routes, (list, tuple)) else [routes]
    for router in routers:
        answer = _ask(router, name, args, kwargs, options, task)
        queue = _queue_of(answer)
        if queue:
            return queue
    return None


def _ask(router: Any, name: str, args: list[Any], kwargs: dict[str, Any],
         options: Mapping[str, Any], task: Any) -> Any:
    if isinstance(router, Mapping):
        if name in router:
            return router[name]
        for pattern, route in router.items():
            if isinstance(pattern, re.Pattern):
                if pattern.match(name):
                    return route
            elif _glob(str(pattern)).match(name):
                return route
        return None
    if callable(router):
        return router(name, args, kwargs, dict(options), task=task)
    raise TypeError(f"task_routes: cannot route with {router!r}")


@lru_cache(maxsize=256)
def _glob(pattern: str) -> re.Pattern[str]:
    return re.compile(fnmatch.translate(pattern))


def _queue_of(route: Any) -> str | None:
    if route is None:
        return None
    if isinstance(route, str):
        return route
    if isinstance(route, Mapping):
        queue = route.get("queue")
        return getattr(queue, "name", queue)
    raise TypeError(f"task_routes: a route must be a queue name or a dict, got {route!r}")
