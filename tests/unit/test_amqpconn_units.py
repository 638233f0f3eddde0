"""The worker's lean AMQP connection (:mod:`aio_celery.amqp.connection`) with no broker.

Pinned here:

* ``Endpoint.from_url``: vhost spellings, quoted credentials, ``amqps`` (port 5671, TLS and
  aio-pika's TLS query options), ``?heartbeat=``, other schemes refused, no password in reprs;
* a connection not yet open says so, and a refused TCP connection fails quickly with the
  socket's error;
* the connection around its frame reader, on a fake broker that sends the test's bytes: a
  bad frame end or an unreadable method frame ends the connection (what came before is
  handed over, a pending request fails), held deliveries pause reading until released, a
  reply gets through held deliveries, a return fails the publish it belongs to.

The same connection against the real RabbitMQ: ``tests/integration/test_amqpconn.py``; the
reader itself (any split, holding at a boundary, control frames): ``test_amqp_reader.py``.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import pytest
from helpers import Collector, FakeBroker, eventually, stays
from pamqp import body as pamqp_body
from pamqp import commands, frame
from pamqp import header as pamqp_header

from aio_celery.amqp import wire as amqpwire
from aio_celery.amqp.connection import (
    PAUSE_READING_AT,
    AMQPConnection,
    ConnectionClosed,
    Delivery,
    Endpoint,
    Returned,
    aio_pika_url,
)

TIMEOUT = 5.0  # an upper bound for anything awaited; every step takes far less


async def connected(url: str) -> AMQPConnection:
    connection = AMQPConnection(url, connection_name="aio-celery test_amqpconn_units")
    await asyncio.wait_for(connection.connect(), TIMEOUT)
    return connection


# --- Endpoint.from_url ------------------------------------------------------------------------


@pytest.mark.parametrize(("url", "expected"), [
    ("amqp://h", ("h", 5672, "guest", "guest", "/", False, None)),
    ("amqp://h/", ("h", 5672, "guest", "guest", "/", False, None)),
    ("amqp://h//", ("h", 5672, "guest", "guest", "/", False, None)),
    ("amqp://h/%2F", ("h", 5672, "guest", "guest", "/", False, None)),
    ("amqp://h/myvhost", ("h", 5672, "guest", "guest", "myvhost", False, None)),
    ("amqp://h/a%2Fb", ("h", 5672, "guest", "guest", "a/b", False, None)),
    ("amqp://u%40x:p%3Aw%2F%40@h:5673/v", ("h", 5673, "u@x", "p:w/@", "v", False, None)),
    ("amqps://h", ("h", 5671, "guest", "guest", "/", True, None)),
    ("amqps://user:pw@h:1234/", ("h", 1234, "user", "pw", "/", True, None)),
    ("amqp://h/?heartbeat=5", ("h", 5672, "guest", "guest", "/", False, 5)),
    ("amqp://h?heartbeat=0", ("h", 5672, "guest", "guest", "/", False, 0)),
    ("pyamqp://guest:guest@127.0.0.1:5672//", ("127.0.0.1", 5672, "guest", "guest", "/",
                                               False, None)),
])
def test_endpoint_from_url(url: str, expected: tuple[Any, ...]) -> None:
    endpoint = Endpoint.from_url(url)
    assert (endpoint.host, endpoint.port, endpoint.username, endpoint.password, endpoint.vhost,
            endpoint.tls, endpoint.heartbeat) == expected


@pytest.mark.parametrize("url", ["redis://h", "http://h/", "h:5672", ""])
def test_endpoint_refuses_other_schemes(url: str) -> None:
    with pytest.raises(ValueError, match="must start with amqp://"):
        Endpoint.from_url(url)


def test_endpoint_tls_options_and_repr() -> None:
    endpoint = Endpoint.from_url("amqps://u:s3cret@h/?cafile=/ca.pem&certfile=/c.pem"
                                 "&keyfile=/k.pem&no_verify_ssl=1&heartbeat=9&other=x")
    assert endpoint.tls_options == (("cafile", "/ca.pem"), ("certfile", "/c.pem"),
                                    ("keyfile", "/k.pem"))
    assert not endpoint.verify
    assert endpoint.heartbeat == 9
    assert "s3cret" not in repr(endpoint) and endpoint.password == "s3cret"
    assert "s3cret" not in repr(AMQPConnection("amqp://u:s3cret@h/").endpoint)

    assert Endpoint.from_url("amqp://h/?no_verify_ssl=1").ssl_context() is None
    verified = Endpoint.from_url("amqps://h/").ssl_context()
    assert verified is not None
    assert verified.verify_mode == ssl.CERT_REQUIRED and verified.check_hostname
    unverified = Endpoint.from_url("amqps://h/?no_verify_ssl=1").ssl_context()
    assert unverified is not None
    assert unverified.verify_mode == ssl.CERT_NONE and not unverified.check_hostname
    still_verified = Endpoint.from_url("amqps://h/?no_verify_ssl=0").ssl_context()
    assert still_verified is not None and still_verified.verify_mode == ssl.CERT_REQUIRED


@pytest.mark.parametrize(("value", "verify"), [
    ("1", False), ("true", False), ("TRUE", False), ("yes", False), ("on", False),
    ("0", True), ("false", True), ("False", True), ("no", True), ("off", True), ("", True),
])
def test_no_verify_ssl_turns_verification_off_only_when_explicitly_true(
        value: str, verify: bool) -> None:
    endpoint = Endpoint.from_url(f"amqps://h/?no_verify_ssl={value}")
    assert endpoint.verify is verify
    context = endpoint.ssl_context()
    assert context is not None
    assert context.check_hostname is verify
    assert (context.verify_mode == ssl.CERT_REQUIRED) is verify
    # aio-pika (the publisher) reads any value but "0" as "off": it gets 1 or nothing
    pika_query = urlsplit(aio_pika_url(f"amqps://h/?no_verify_ssl={value}&cafile=/x")).query
    assert pika_query == ("cafile=%2Fx" if verify else "cafile=%2Fx&no_verify_ssl=1")


@pytest.mark.parametrize("value", ["2", "maybe", "ture"])
def test_an_unclear_no_verify_ssl_is_refused(value: str) -> None:
    with pytest.raises(ValueError, match="no_verify_ssl= must be 1/true/yes/on"):
        Endpoint.from_url(f"amqps://u:pw9@h/?no_verify_ssl={value}")


def test_amqps_verifies_by_default() -> None:
    endpoint = Endpoint.from_url("amqps://h/")
    assert endpoint.verify
    assert aio_pika_url("amqps://u:p%2F@h:5671/v?heartbeat=5") == \
        "amqps://u:p%2F@h:5671/v?heartbeat=5"


@pytest.mark.parametrize(("query", "mechanism", "response"), [
    ("", "PLAIN", "\0u\0pw"),
    ("?auth=plain", "PLAIN", "\0u\0pw"),
    ("?auth=external", "EXTERNAL", ""),
    ("?auth=EXTERNAL", "EXTERNAL", ""),
    ("?auth_mechanism=EXTERNAL", "EXTERNAL", ""),
    ("?auth_mechanism=external&auth=external", "EXTERNAL", ""),
])
def test_login_mechanisms(query: str, mechanism: str, response: str) -> None:
    endpoint = Endpoint.from_url(f"amqps://u:pw@h/{query}")
    assert endpoint.login() == (mechanism, response)
    # the publisher (aiormq) reads ``auth``
    expected = "auth=external" if mechanism == "EXTERNAL" else ""
    assert urlsplit(aio_pika_url(f"amqps://u:pw@h/{query}")).query == expected


@pytest.mark.parametrize(("query", "says"), [
    ("?auth=amqplain", "auth='amqplain' is not one of plain, external"),
    ("?auth=plain&auth_mechanism=external", "auth= and auth_mechanism= disagree"),
])
def test_unknown_login_mechanisms_are_refused(query: str, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        Endpoint.from_url(f"amqps://u:pw@h/{query}")


def test_heartbeat_from_url_overrides_the_argument() -> None:
    assert AMQPConnection("amqp://h/?heartbeat=5", heartbeat=60).heartbeat == 5
    assert AMQPConnection("amqp://h/", heartbeat=7).heartbeat == 7
    assert AMQPConnection("amqp://h/").heartbeat == 60


# --- connecting, with no broker ----------------------------------------------------------------


async def test_closed_before_connect_is_an_error() -> None:
    connection = AMQPConnection("amqp://127.0.0.1/")
    assert not connection.is_open
    with pytest.raises(RuntimeError, match="not open"):
        await connection.closed()


async def test_closed_port_raises_oserror() -> None:
    connection = AMQPConnection("amqp://guest:guest@127.0.0.1:1//", connect_timeout=2.0)
    started = time.monotonic()
    with pytest.raises(OSError) as refused:  # which OSError depends on the platform
        await connection.connect()
    assert not isinstance(refused.value, ConnectionClosed)  # the socket, not the broker
    assert time.monotonic() - started < 2.0
    assert not connection.is_open
    assert await asyncio.wait_for(connection.closed(), 1) == "connection attempt failed"
    with pytest.raises(ConnectionClosed, match="connection attempt failed"):
        connection.ack(1)


# --- the connection around its reader, on a fake broker ---------------------------------------
# (the reader itself, fed bytes: tests/unit/test_amqp_reader.py)


@pytest.fixture
async def fake() -> AsyncIterator[FakeBroker]:
    broker = FakeBroker()
    await broker.start()
    try:
        yield broker
    finally:
        await broker.close()


@pytest.fixture
async def fake_conn(fake: FakeBroker) -> AsyncIterator[AMQPConnection]:
    connection = await connected(f"amqp://guest:guest@127.0.0.1:{fake.port}/")
    try:
        yield connection
    finally:
        await asyncio.wait_for(connection.close(), TIMEOUT)


def message_frames(delivery_tag: int, body: bytes, properties: commands.Basic.Properties, *,
                   consumer_tag: str, body_frame: int = 131064) -> bytes:
    frames = [
        frame.marshal(commands.Basic.Deliver(consumer_tag=consumer_tag,
                                             delivery_tag=delivery_tag, routing_key="q"), 1),
        frame.marshal(pamqp_header.ContentHeader(0, len(body), properties), 1),
    ]
    frames += [frame.marshal(pamqp_body.ContentBody(body[i:i + body_frame]), 1)
               for i in range(0, len(body), body_frame)]
    return b"".join(frames)


HEARTBEAT = amqpwire.HEARTBEAT


async def test_a_bad_frame_end_ends_the_connection(fake: FakeBroker,
                                                   fake_conn: AMQPConnection) -> None:
    collector = Collector()
    tag = await asyncio.wait_for(fake_conn.consume("q", collector), TIMEOUT)
    good = message_frames(1, b"fine", commands.Basic.Properties(), consumer_tag=tag)
    fake.write(good + b"\x08\x00\x00\x00\x00\x00\x00\x00" + good)
    reason = await asyncio.wait_for(fake_conn.closed(), TIMEOUT)
    assert reason == "unreadable frame from the broker: frame of type 8 does not end with 0xCE"
    assert [d.body for d in collector.deliveries] == [b"fine"]  # what came before counts
    assert not fake_conn.is_open and fake_conn.buffered == 0
    with pytest.raises(ConnectionClosed, match="0xCE"):
        fake_conn.ack(1)


@pytest.mark.parametrize("payload", [
    pytest.param(b"\x00\x63\x00\x63", id="unknown-method"),  # 99.99: pamqp knows no such method
    pytest.param(b"\x00\x3c", id="too-short"),  # a class id and no method id
])
async def test_an_unreadable_method_ends_the_connection(
        fake: FakeBroker, fake_conn: AMQPConnection, payload: bytes) -> None:
    collector = Collector()
    tag = await asyncio.wait_for(fake_conn.consume("q", collector), TIMEOUT)
    request = asyncio.ensure_future(fake_conn.exchange_bind("a", "b", "k"))  # not answered
    await eventually(lambda: fake.methods(commands.Exchange.Bind), TIMEOUT)
    good = message_frames(1, b"fine", commands.Basic.Properties(), consumer_tag=tag)
    bad = amqpwire.FRAME_HEAD.pack(amqpwire.FRAME_METHOD, 1, len(payload)) + payload + b"\xce"
    fake.write(good + bad + good)  # ends the connection, raises nothing
    reason = await asyncio.wait_for(fake_conn.closed(), TIMEOUT)
    assert reason.startswith("unreadable frame from the broker")
    assert [d.body for d in collector.deliveries] == [b"fine"]  # what came before counts
    assert not fake_conn.is_open and fake_conn.buffered == 0
    with pytest.raises(ConnectionClosed, match="unreadable frame"):
        await asyncio.wait_for(request, TIMEOUT)  # a request waiting for its reply fails
    with pytest.raises(ConnectionClosed, match="unreadable frame"):
        fake_conn.ack(1)


async def test_held_deliveries_pause_reading_until_released(
        fake: FakeBroker, fake_conn: AMQPConnection) -> None:
    count = 100
    received: list[Delivery] = []
    holding = True

    def callback(delivery: Delivery) -> None:
        received.append(delivery)
        if holding:
            fake_conn.hold()

    tag = await asyncio.wait_for(fake_conn.consume("q", callback), TIMEOUT)
    stream = b"".join(message_frames(n, n.to_bytes(2, "big") * 500,
                                     commands.Basic.Properties(), consumer_tag=tag)
                      for n in range(1, count + 1))
    assert len(stream) > PAUSE_READING_AT
    fake.write(stream)
    await eventually(lambda: fake_conn.reading_paused, TIMEOUT)
    assert fake_conn.held and fake_conn.buffered > PAUSE_READING_AT
    await stays(lambda: len(received) == 1, duration=0.2)

    holding = False
    fake_conn.release()
    assert not fake_conn.reading_paused and not fake_conn.held
    assert len(received) == 1  # handed over from the event loop, not re-entrantly
    await eventually(lambda: len(received) == count, TIMEOUT)
    assert [d.deliver.delivery_tag for d in received] == list(range(1, count + 1))
    assert all(d.body == d.deliver.delivery_tag.to_bytes(2, "big") * 500 for d in received)
    assert fake_conn.buffered == 0 and fake_conn.is_open


async def test_a_reply_gets_through_held_deliveries(fake: FakeBroker,
                                                    fake_conn: AMQPConnection) -> None:
    collector = Collector()
    tag = await asyncio.wait_for(fake_conn.consume("q", collector), TIMEOUT)

    def message(delivery_tag: int) -> bytes:
        return message_frames(delivery_tag, b"m%d" % delivery_tag, commands.Basic.Properties(),
                              consumer_tag=tag)

    fake_conn.hold()
    fake.write(message(1))
    await eventually(lambda: fake_conn.buffered == len(message(1)), TIMEOUT)
    assert collector.deliveries == []  # held, and no reply awaited
    request = asyncio.ensure_future(fake_conn.qos(3))
    await eventually(lambda: fake.methods(commands.Basic.Qos), TIMEOUT)
    fake.write(message(2) + frame.marshal(commands.Basic.QosOk(), 1) + message(3))
    assert await asyncio.wait_for(request, TIMEOUT) is None
    # what came before the reply was handed over; after it, holding resumes
    assert [d.body for d in collector.deliveries] == [b"m1", b"m2"]
    await eventually(lambda: fake_conn.buffered == len(message(3)), TIMEOUT)
    await stays(lambda: len(collector) == 2, duration=0.2)


async def test_a_return_fails_the_publish_it_belongs_to_whatever_confirm_comes_first(
        fake: FakeBroker, fake_conn: AMQPConnection) -> None:
    """RabbitMQ returns an unroutable mandatory message at once, while the confirm of an
    earlier one waits for its queue: the return still belongs to the later one."""
    connection = fake_conn
    routed = asyncio.ensure_future(connection.publish(b"1", b"\x00\x00", "q", mandatory=True))
    lost = asyncio.ensure_future(connection.publish(b"2", b"\x00\x00", "gone", mandatory=True))
    other = asyncio.ensure_future(connection.publish(b"3", b"\x00\x00", "gone", mandatory=True))
    await eventually(lambda: len(fake.methods(commands.Basic.Publish)) == 3, TIMEOUT)
    assert connection.unconfirmed == 3
    returned = (frame.marshal(commands.Basic.Return(reply_code=312, reply_text="NO_ROUTE",
                                                    exchange="", routing_key="gone"), 1)
                + frame.marshal(pamqp_header.ContentHeader(0, 1, commands.Basic.Properties()),
                                1)
                + frame.marshal(pamqp_body.ContentBody(b"2"), 1))
    fake.write(returned + frame.marshal(commands.Basic.Ack(delivery_tag=1), 1))
    fake.write(frame.marshal(commands.Basic.Ack(delivery_tag=3, multiple=True), 1))
    assert await asyncio.wait_for(routed, TIMEOUT) is None
    with pytest.raises(Returned, match=r"312 NO_ROUTE .*'gone'"):
        await asyncio.wait_for(lost, TIMEOUT)
    assert await asyncio.wait_for(other, TIMEOUT) is None  # one return came, not two
    assert connection.unconfirmed == 0 and connection.is_open
