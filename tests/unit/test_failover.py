"""``aio_celery.failover``: the order in which the URLs of a ``;``-separated ``broker_url``
are tried, and what logs show of them (no broker)."""

from __future__ import annotations

import random

import pytest

from aio_celery.exceptions import ConfigurationError
from aio_celery.failover import Failover

URLS = "amqp://u:pw1@a//;amqp://u:pw2@b//; amqps://u:pw3@c:5671/v"
A, B, C = "amqp://u:pw1@a//", "amqp://u:pw2@b//", "amqps://u:pw3@c:5671/v"


def test_one_url_is_a_list_of_one() -> None:
    failover = Failover("amqp://u:pw@h//")
    assert failover.urls == ("amqp://u:pw@h//",)
    assert failover.order() == ["amqp://u:pw@h//"]
    failover.using("amqp://u:pw@h//")
    failover.lost()
    assert failover.order() == ["amqp://u:pw@h//"]


def test_round_robin_starts_as_written_and_moves_on_after_a_loss() -> None:
    failover = Failover(URLS)
    assert failover.urls == (A, B, C)
    assert failover.in_use is None
    assert failover.order() == [A, B, C]
    failover.using(A)
    assert failover.order() == [A, B, C]  # still connected: nothing moves
    failover.lost()
    assert failover.order() == [B, C, A]
    failover.using(C)  # B did not answer
    failover.lost()
    assert failover.order() == [A, B, C]


def test_shuffle_puts_the_lost_url_last() -> None:
    failover = Failover(URLS, "shuffle", rng=random.Random(7))
    orders = {tuple(failover.order()) for _ in range(50)}
    assert len(orders) > 1 and all(sorted(order) == sorted((A, B, C)) for order in orders)
    failover.using(B)
    failover.lost()
    for _ in range(20):
        order = failover.order()
        assert order[-1] == B and sorted(order) == sorted((A, B, C))


def test_a_companion_tries_the_url_its_leader_uses_first() -> None:
    for strategy in ("round-robin", "shuffle"):
        leader = Failover(URLS, strategy, rng=random.Random(3))
        companion = leader.companion()  # made before the leader connects, as a publisher is
        leader.using(B)
        for _ in range(10):
            order = companion.order()
            assert order[0] == B and sorted(order) == sorted((A, B, C))
        companion.using(B)
        companion.lost()  # its own loss: it moves on, whatever the leader uses
        assert companion.order()[0] != B
        companion.using(C)
        assert companion.order()[0] == C  # its own URL in use comes first
        assert leader.order()[0] == B


def test_logs_show_the_url_in_use_masked() -> None:
    failover = Failover(URLS)
    assert failover.masked == "amqp://u:***@a//;amqp://u:***@b//;amqps://u:***@c:5671/v"
    failover.using(C)
    assert failover.masked == "amqps://u:***@c:5671/v"
    assert failover.in_use == C


def test_an_unknown_strategy_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="use one of 'round-robin', 'shuffle'"):
        Failover(URLS, "random")
