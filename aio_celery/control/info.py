"""The dicts ``inspect`` commands answer with, in Celery's shapes (pure)."""

from __future__ import annotations

import resource
from typing import Any

from aio_celery.amqp.connection import Endpoint
from aio_celery.protocol import REPR_MAXSIZE, TaskMessage
from aio_celery.quorum import QueueDeclaration
from aio_celery.saferepr import saferepr


def request_info(message: TaskMessage, delivery_info: dict[str, Any], *, hostname: str,
                 worker_pid: int | None, time_start: float | None, acknowledged: bool,
                 safe: bool) -> dict[str, Any]:
    """Celery's ``Request.info()``: real args and kwargs, or with ``safe`` the message's
    ``argsrepr``/``kwargsrepr`` strings (``repr`` of the values, at most ``REPR_MAXSIZE``
    characters, if the sender gave none)."""
    if safe:
        args: Any = (message.argsrepr if message.argsrepr is not None
                     else saferepr(message.args, REPR_MAXSIZE))
        kwargs: Any = (message.kwargsrepr if message.kwargsrepr is not None
                       else saferepr(message.kwargs, REPR_MAXSIZE))
    else:
        args, kwargs = message.args, message.kwargs
    return {
        "id": message.id, "name": message.task, "args": args, "kwargs": kwargs,
        "type": message.task, "hostname": hostname, "time_start": time_start,
        "acknowledged": acknowledged,
        "delivery_info": {key: delivery_info.get(key) for key in
                          ("exchange", "routing_key", "priority", "redelivered")},
        "worker_pid": worker_pid,
    }


def scheduled_info(message: TaskMessage, info: dict[str, Any]) -> dict[str, Any]:
    """An entry of ``inspect scheduled``."""
    return {"eta": message.eta.isoformat() if message.eta else None,
            "priority": message.priority or 0, "request": info}


def broker_info(url: str, *, connect_timeout: float, heartbeat: float,
                failover_strategy: str, alternates: list[str]) -> dict[str, Any]:
    """kombu's ``Connection.info()`` keys (``inspect stats``' ``broker``), without the
    password, as Celery's stats drop it."""
    endpoint = Endpoint.from_url(url)
    return {
        "hostname": endpoint.host, "userid": endpoint.username,
        "virtual_host": endpoint.vhost, "port": endpoint.port, "insist": False,
        "ssl": endpoint.tls, "transport": "amqp", "connect_timeout": connect_timeout,
        "transport_options": {}, "login_method": endpoint.mechanism, "uri_prefix": None,
        "heartbeat": heartbeat, "failover_strategy": failover_strategy,
        "alternates": alternates, "credential_provider": None,
    }


def rusage() -> dict[str, Any]:
    """Celery's ``rusage`` block of ``inspect stats``."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {name: getattr(usage, f"ru_{name}") for name in (
        "utime", "stime", "maxrss", "ixrss", "idrss", "isrss", "minflt", "majflt", "nswap",
        "inblock", "oublock", "msgsnd", "msgrcv", "nsignals", "nvcsw", "nivcsw")}


def queue_info(name: str, declaration: QueueDeclaration) -> dict[str, Any]:
    """kombu's ``Queue.as_dict(recurse=True)`` for a queue we consume."""
    arguments = declaration.arguments or None
    return {
        "name": name,
        "exchange": {"name": declaration.exchange, "type": declaration.exchange_type,
                     "arguments": None, "durable": True, "passive": False,
                     "auto_delete": False, "delivery_mode": None, "no_declare": False},
        "routing_key": declaration.routing_key, "queue_arguments": arguments,
        "binding_arguments": None, "consumer_arguments": None, "durable": True,
        "exclusive": False, "auto_delete": False, "no_ack": False, "alias": None,
        "bindings": [], "no_declare": None, "expires": None, "message_ttl": None,
        "max_length": None, "max_length_bytes": None,
        "max_priority": (arguments or {}).get("x-max-priority"),
    }
