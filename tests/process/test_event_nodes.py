"""Under the supervisor every child is a node of its own for monitors (#10 §1).

``aio_celery worker -c 2 -E -n <name>@proc`` : each child sends its worker events as
``<name>-<index>@proc`` from its own pid, and ``worker-offline`` when the supervisor's warm
shutdown stops it. Events are read from a queue of the test's own bound to ``celeryev``
with ``#`` (py-amqp, polled), keeping only this supervisor's nodes.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import amqp
import pytest
from helpers import amqp_connection
from test_supervisor import Supervised, wait_until


class Tap:
    def __init__(self, channel: amqp.Channel, queue: str, prefix: str) -> None:
        self.channel = channel
        self.queue = queue
        self.prefix = prefix
        self.events: list[dict[str, Any]] = []

    def poll(self) -> list[dict[str, Any]]:
        while (message := self.channel.basic_get(self.queue, no_ack=True)) is not None:
            hostname = str((message.headers or {}).get("hostname", ""))
            if hostname.startswith(self.prefix):
                body = json.loads(message.body)
                self.events.extend(body if isinstance(body, list) else [body])
        return self.events

    def nodes(self, type_: str) -> dict[str, int]:
        """hostname -> pid of the events of ``type_`` seen so far."""
        return {e["hostname"]: e["pid"] for e in self.poll() if e["type"] == type_}


@pytest.fixture
def tap(unique_name: str) -> Iterator[Tap]:
    with amqp_connection() as connection:
        channel = connection.channel()
        channel.exchange_declare("celeryev", "topic", durable=True, auto_delete=False)
        queue = f"{unique_name}.celeryev"
        channel.queue_declare(queue, exclusive=True, auto_delete=True)
        channel.queue_bind(queue, "celeryev", "#")
        yield Tap(channel, queue, f"{unique_name}-")


def test_each_child_is_a_node_with_its_own_events(
        supervise: Callable[..., Supervised], tap: Tap, unique_name: str) -> None:
    sup = supervise("-E", "--heartbeat-interval", "0.5", "-n", f"{unique_name}@proc",
                    processes=2)
    pids = sup.wait_ready(2)
    expected = {f"{unique_name}-{index}@proc": pid for index, pid in pids.items()}
    wait_until(lambda: tap.nodes("worker-online") == expected, 20.0,
               "both children online under their own names", sup.diagnostics)
    wait_until(lambda: tap.nodes("worker-heartbeat") == expected, 20.0,
               "heartbeats from both children", sup.diagnostics)
    assert sup.stop() == 0
    assert tap.nodes("worker-offline") == expected
