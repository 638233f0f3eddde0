"""``aio_celery.preflight``: settings a worker cannot use, found before it starts."""

from __future__ import annotations

import sys
from typing import Any

import pytest

from aio_celery import preflight
from aio_celery.config import Settings
from aio_celery.exceptions import ConfigurationError


@pytest.mark.parametrize(("settings", "says"), [
    ({"broker_url": "redis://:pw9@h:6379/0"}, "broker_url redis://:***@h:6379/0: it must "
                                               "start with amqp://"),
    ({"broker_url": "amqp://u:pw9/x@h//"}, "percent-encoded"),
    ({"broker_url": "amqp://u:pw9@a//;amqp://u:pw9/x@b//"}, "URL 2 of 2: its port is not"),
    ({"broker_url": "amqp://u:pw9@a//;redis://u:pw9@b//"}, "URL 2 of 2: it must start with"),
    ({"broker_failover_strategy": "random"}, "broker_failover_strategy='random': use one of "
                                             "'round-robin', 'shuffle'"),
    ({"broker_url": None}, "broker_url must be a URL string, not NoneType"),
    ({"result_backend": "memcached://u:pw9@h"}, "result_backend memcached://u:***@h: it must "
                                                 "start with redis://"),
    ({"result_backend": "redis://:pw9/x@h/0"}, "percent-encoded"),
    ({"task_default_rate_limit": "10/day"}, "task_default_rate_limit: rate limit '10/day': "
                                            "the unit after '/' must be s, m or h"),
])
def test_settings_the_worker_cannot_use(settings: dict[str, Any], says: str) -> None:
    with pytest.raises(ConfigurationError) as raised:
        preflight.check(Settings(**settings))
    assert says in str(raised.value)
    assert "pw9" not in str(raised.value)
    assert "\n" not in str(raised.value)


def test_a_result_backend_without_redis_py_names_the_fix(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "redis", None)  # what an import sees when it is missing
    with pytest.raises(ConfigurationError, match=r"pip install 'aio-celery\[redis\]'"):
        preflight.check(Settings(result_backend="redis://127.0.0.1:6379/0"))
    preflight.check(Settings())  # without a result backend redis-py is not needed


@pytest.mark.parametrize("settings", [
    {},
    {"broker_url": "amqps://u:p%2Fw@rabbit:5671/vh?heartbeat=10",
     "result_backend": "rediss://:p%40w@cache:6380/1?ssl_cert_reqs=none"},
    {"broker_url": "pyamqp://guest@localhost//", "result_backend": "unix:///run/redis.sock"},
    {"broker_url": "amqp://u:pw@a//;amqp://u:pw@b:5673//; amqps://u:pw@c//",
     "broker_failover_strategy": "shuffle"},
    {"task_default_rate_limit": "100/m"},
    {"task_default_rate_limit": 2.5},
])
def test_usable_settings_pass(settings: dict[str, Any]) -> None:
    preflight.check(Settings(**settings))
