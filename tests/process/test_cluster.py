"""A real 3-node RabbitMQ cluster (``scripts/cluster``): a quorum queue keeps its messages
when its leader's node stops, and ``aio_celery worker -c 2`` on quorum queues with a
``;``-separated failover URL runs every task while the node it is connected to is stopped
and started again.

The cluster (node N: ``aio-celery-570N@localhost``, AMQP on 127.0.0.1:570N) is started once
per session by the script, about 30 s on two cores, and always stopped at the end; the main
broker on 5672 is not touched. The tasks and their bookkeeping in Redis are
``tests.process.sup_tasks`` (see ``test_supervisor``).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import threading
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import aio_pika
import pytest
import redis
from test_supervisor import ROOT, Book, Supervised, wait_until

from aio_celery import Celery, exitcodes

if TYPE_CHECKING:
    from pamqp.common import FieldTable

pytestmark = pytest.mark.fault

SCRIPT = ROOT / "scripts" / "cluster"
NODES = (1, 2, 3)
#: node N listens on BASE_PORT + N (the script's default AIO_CELERY_CLUSTER_PORT, 5701)
BASE_PORT = 5700
#: seconds the script may take: three nodes booted one after another, or all stopped
START_TIMEOUT, STOP_TIMEOUT = 420.0, 180.0
#: the worker is consuming again from another node within this many seconds of the stop
RECONNECT_DEADLINE = 15.0
T = TypeVar("T")


class Cluster:
    """``scripts/cluster`` driven from the tests."""

    def script(self, *args: str, timeout: float = 120) -> str:
        done = subprocess.run([str(SCRIPT), *args], capture_output=True, text=True,
                              timeout=timeout, check=False, env=script_env())
        if done.returncode != 0:
            pytest.fail(f"scripts/cluster {' '.join(args)} exited with {done.returncode}\n"
                        f"{done.stdout}\n{done.stderr}", pytrace=False)
        return done.stdout

    @staticmethod
    def url(node: int) -> str:
        return f"amqp://guest:guest@127.0.0.1:{BASE_PORT + node}//"

    def failover_url(self) -> str:
        return ";".join(self.url(node) for node in NODES)

    def stop_node(self, node: int) -> None:
        self.script("stop-node", str(node))

    def stop_node_meanwhile(self, node: int, how: str) -> subprocess.Popen[str]:
        """Start ``scripts/cluster stop-node`` (a clean stop, a few seconds) or ``kill-node``
        (SIGKILL) on ``node`` and return at once."""
        return subprocess.Popen([str(SCRIPT), how, str(node)], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env=script_env())

    def start_node(self, node: int) -> None:
        self.script("start-node", str(node), timeout=START_TIMEOUT)

    def ctl_json(self, node: int, *args: str) -> list[dict[str, Any]]:
        # rabbitmqctl's own timeout (-t) first: a listing that asks a node going down
        # gives up on it rather than hang
        out = self.script("ctl", str(node), "-t", "10", *args, "--formatter", "json",
                          timeout=30)
        return list(json.loads(out or "[]"))

    def nodes_with(self, prefix: str, ask: int) -> dict[int, int]:
        """node -> how many connections whose client-given name starts with ``prefix`` it
        holds, as node ``ask`` sees the cluster (list_connections lists every node's)."""
        counts: dict[int, int] = {}
        for row in self.ctl_json(ask, "list_connections", "port", "client_properties"):
            props = {key: value for key, _, value in row["client_properties"]}
            if str(props.get("connection_name", "")).startswith(prefix):
                node = int(row["port"]) - BASE_PORT
                counts[node] = counts.get(node, 0) + 1
        return counts

    def leader(self, queue: str, node: int) -> str:
        """The node name of ``queue``'s leader, as node ``node`` sees it."""
        rows = self.ctl_json(node, "list_queues", "name", "leader")
        return next(str(row["leader"]) for row in rows if row["name"] == queue)


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    handle = Cluster()
    try:
        handle.script("start", timeout=START_TIMEOUT)
        yield handle
    finally:
        subprocess.run([str(SCRIPT), "stop"], timeout=STOP_TIMEOUT, check=False,
                       env=script_env())


def script_env() -> dict[str, str]:
    return {**os.environ, "AIO_CELERY_CLUSTER_PORT": str(BASE_PORT + 1)}


def node_number(name: str) -> int:
    """``aio-celery-5702@localhost`` -> 2"""
    return int(name.split("@", maxsplit=1)[0].rsplit("-", 1)[1]) - BASE_PORT


# --- the harness: quorum replication on today's code -----------------------------------------

QUORUM: FieldTable = {"x-queue-type": "quorum"}


async def publish_raw(url: str, queue: str, bodies: list[str]) -> None:
    """Declare ``queue`` as a quorum queue and publish ``bodies``, each confirmed."""
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()  # publisher confirms on
        await channel.declare_queue(queue, durable=True, arguments=QUORUM)
        for body in bodies:
            await channel.default_exchange.publish(
                aio_pika.Message(body.encode(), delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                routing_key=queue)


async def drain_raw(url: str, queue: str, count: int, deadline: float) -> list[str]:
    """Consume (and ack) ``count`` messages from ``queue`` through ``url``."""
    bodies: list[str] = []
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, durable=True, arguments=QUORUM)
        async with asyncio.timeout(deadline), declared.iterator() as messages:
            async for message in messages:
                bodies.append(message.body.decode())
                await message.ack()
                if len(bodies) == count:
                    break
        await declared.delete(if_unused=False, if_empty=False)
    return bodies


def test_a_quorum_queue_keeps_its_messages_when_its_leaders_node_stops(
        cluster: Cluster, unique_name: str) -> None:
    bodies = [f"message-{i}" for i in range(200)]
    asyncio.run(publish_raw(cluster.url(1), unique_name, bodies))
    leader = node_number(cluster.leader(unique_name, 1))
    other = next(node for node in NODES if node != leader)

    def new_leader() -> int | None:
        name = cluster.leader(unique_name, other)
        found = node_number(name) if name.startswith("aio-celery-") else leader
        return None if found == leader else found

    cluster.stop_node(leader)
    try:
        # the two nodes left elect a new leader and every confirmed message is still there
        wait_until(new_leader, 30, f"the queue has a leader other than node {leader}")
        got = asyncio.run(drain_raw(cluster.url(other), unique_name, len(bodies), 30))
    finally:
        cluster.start_node(leader)
    assert sorted(got) == sorted(bodies)


# --- the worker: failover over the three nodes under load -------------------------------------

class ClientThread:
    """Our client (``Celery`` with the failover URL) kept open on a loop of its own thread,
    so that the same connection lives through the node's stop."""

    def __init__(self, url: str, queue: str, redis_url: str) -> None:
        self.app = Celery("cluster-client", set_as_current=False)
        # A publish that a quorum queue nacks while it elects a leader is tried again, with
        # room for the election (the README's advice for clusters).
        self.app.conf.update(broker_url=url, result_backend=redis_url,
                             task_default_queue=queue, task_default_queue_type="quorum",
                             task_publish_retry_policy={"max_retries": 10,
                                                        "interval_step": 0.5,
                                                        "interval_max": 2})
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._setup = self.app.setup()
        self._call(self._setup.__aenter__())

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def sleeps(self, count: int, seconds: float) -> list[str]:
        async def send() -> list[str]:
            return [(await self.app.send_task("sup.sleep", (seconds,))).id
                    for _ in range(count)]

        return self._call(send())

    def close(self) -> None:
        try:
            self._call(self._setup.__aexit__(None, None, None))
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop.close()


def stored_statuses(client: redis.Redis, ids: list[str]) -> dict[str, str | None]:
    raws = client.mget([f"celery-task-meta-{task_id}" for task_id in ids])
    return {task_id: None if raw is None else str(json.loads(raw)["status"])
            for task_id, raw in zip(ids, raws, strict=True)}


@pytest.mark.parametrize("how", ["stop-node", "kill-node"])
def test_worker_fails_over_when_its_node_stops_and_loses_no_task(
        cluster: Cluster, tmp_path: Path, unique_name: str, redis_url: str,
        book: Book, how: str) -> None:
    processes, concurrency, multiplier = 2, 10, 4
    env = {"AIO_CELERY_SUP_BROKER": cluster.failover_url(), "AIO_CELERY_SUP_QUEUE_TYPE": "quorum"}
    sup = Supervised(tmp_path, unique_name, redis_url, "--prefetch-multiplier", str(multiplier),
                     processes=processes, concurrency=concurrency, env=env)
    client: ClientThread | None = None
    try:
        sup.wait_ready(processes)
        client = ClientThread(cluster.failover_url(), unique_name, redis_url)
        ids = client.sleeps(1000, 0.2)
        run_through_a_node_stop(cluster, sup, book, client, ids, processes, how)
        done_in_full(sup, book, ids, processes * concurrency * multiplier)
        assert all(status == "SUCCESS" for status in stored_statuses(book.client, ids).values())
        assert sup.stop(30) == exitcodes.OK, sup.diagnostics()
    finally:
        if client is not None:
            client.close()
        sup.kill()


def run_through_a_node_stop(cluster: Cluster, sup: Supervised, book: Book,
                            client: ClientThread, ids: list[str], processes: int,
                            how: str) -> None:
    """Stop (or kill) the node the worker is on while tasks run, publish more, start the
    node again; ``ids`` grows by the tasks published meanwhile."""
    worker = "aio_celery worker"
    wait_until(lambda: len(book.started()) >= 200, 30, "200 tasks have started",
               sup.diagnostics)
    on = cluster.nodes_with(worker, ask=1)
    assert sum(on.values()) >= processes, f"the worker's connections: {on}"
    node = max(on, key=lambda n: on[n])
    other = next(n for n in NODES if n != node)
    stopping = cluster.stop_node_meanwhile(node, how)
    try:
        # every child consumes again, through the next URL of its list
        wait_until(lambda: sum(n for at, n in cluster.nodes_with(worker, ask=other).items()
                               if at != node) >= processes,
                   RECONNECT_DEADLINE, f"the worker reconnects to nodes other than {node}",
                   sup.diagnostics)
    finally:
        output, _ = stopping.communicate(timeout=STOP_TIMEOUT)
    assert stopping.returncode == 0, output
    ids += client.sleeps(1000, 0.2)  # the client's connection moves to another node too
    progress = len(book.done())
    wait_until(lambda: len(book.done()) >= progress + 200, 60,
               "the worker runs tasks again", sup.diagnostics)
    cluster.start_node(node)
    sup.assert_running()


def done_in_full(sup: Supervised, book: Book, ids: list[str], prefetched: int) -> None:
    """Every task completed; more than once only where an ack went down with the node
    (at most what the worker had prefetched), and never more than twice."""
    wait_until(lambda: set(book.done()) >= set(ids), 120,
               f"all {len(ids)} tasks are done", sup.diagnostics)
    counts = book.counts()
    assert set(counts) == set(ids), f"unknown ids: {sorted(set(counts) - set(ids))}"
    twice = {task_id: n for task_id, n in counts.items() if n > 1}
    assert len(twice) <= prefetched, f"{len(twice)} tasks ran twice (prefetch {prefetched})"
    assert max(counts.values()) <= 2, twice
