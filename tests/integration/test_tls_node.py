"""``amqps://`` against a real RabbitMQ node with a TLS listener (#8).

An extra node (``scripts/rabbitnode``: AMQP on 5711, AMQPS on 5712, see ``rabbit_node``)
is started once for this module with certificates made for the run: a throwaway CA, a
server certificate for ``localhost``/``127.0.0.1`` it signed, a client certificate for
EXTERNAL login, and a second CA that signed nothing here. The main broker on 5672 is not
touched. What is shown, with the URL options the README documents:

* a task goes client (aio-pika) -> worker (our client, consumer and publisher connections,
  a follow-up published by the task) -> result, every AMQP connection over TLS verified
  against the test CA, with PLAIN and with EXTERNAL (the client certificate's name);
* the wrong CA is refused at once with the certificate error, by each side; the worker
  stops at start-up (exit 4), its one line naming the certificate and the fix;
* ``no_verify_ssl=1`` connects whatever the CA; ``no_verify_ssl=false`` keeps verifying
  (aiormq alone would turn it off for any value but ``0``).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Iterator

import pytest
from rabbit_node import TLS_PORT, Certificates, RabbitNode, certificates, running_node

from aio_celery import Celery, exitcodes
from aio_celery.amqp.connection import AMQPConnection
from aio_celery.broker import Broker, BrokerRefused, connect_first
from aio_celery.exceptions import BrokerConnectionError
from aio_celery.failover import Failover

pytestmark = pytest.mark.fault

TIMEOUT = 15.0
#: a refused certificate is known after one TLS handshake: well under the connect timeout
REFUSED_WITHIN = 3.0
CLIENT_USER = "aio-celery-tls-client"


class TlsNode:
    def __init__(self, node: RabbitNode, certs: Certificates) -> None:
        self.node = node
        self.certs = certs

    def url(self, *, ca: str = "ca", login: str = "guest:guest@", host: str = "localhost",
            **options: str) -> str:
        query = {"cafile": str(self.certs.directory / f"{ca}.pem"), **options}
        return (f"amqps://{login}{host}:{TLS_PORT}//?"
                + "&".join(f"{name}={value}" for name, value in query.items()))

    def external_url(self) -> str:
        """EXTERNAL login: the broker takes the user from the client certificate."""
        return self.url(login="", certfile=str(self.certs.cert("client")),
                        keyfile=str(self.certs.key("client")), auth="external")


def tls_conf(certs: Certificates) -> str:
    return "\n".join([
        f"listeners.ssl.local = 127.0.0.1:{TLS_PORT}",
        f"ssl_options.cacertfile = {certs.ca}",
        f"ssl_options.certfile = {certs.cert('server')}",
        f"ssl_options.keyfile = {certs.key('server')}",
        # a client certificate is asked for and checked, but PLAIN logins need none
        "ssl_options.verify = verify_peer",
        "ssl_options.fail_if_no_peer_cert = false",
        "auth_mechanisms.1 = PLAIN",
        "auth_mechanisms.2 = AMQPLAIN",
        "auth_mechanisms.3 = EXTERNAL",
        "ssl_cert_login_from = common_name",
        "",
    ])


@pytest.fixture(scope="module")
def tls() -> Iterator[TlsNode]:
    with certificates(CLIENT_USER) as certs, \
            running_node(tls_conf(certs), plugins=("rabbitmq_auth_mechanism_ssl",)) as node:
        # EXTERNAL logs in the user named by the certificate; it needs no usable password
        node.ctl("add_user", CLIENT_USER, "unused-" + CLIENT_USER)
        node.ctl("set_permissions", "-p", "/", CLIENT_USER, ".*", ".*", ".*")
        yield TlsNode(node, certs)


@pytest.fixture
def tls_app(unique_name: str, redis_url: str) -> Iterator[Celery]:
    application = Celery(unique_name)
    application.conf.update(result_backend=redis_url, task_default_queue=unique_name)
    yield application


def define_tasks(app: Celery) -> tuple[object, object]:
    @app.task(name="tls.double")
    async def double(value: int) -> int:
        return 2 * value

    @app.task(name="tls.relay")
    async def relay(value: int) -> str:
        # sent on the worker's own publishing connection
        return (await double.delay(value)).id

    return relay, double


@pytest.mark.parametrize("login", ["plain", "external"])
async def test_a_task_goes_client_worker_result_over_tls(
        tls: TlsNode, tls_app: Celery, start_worker, login: str) -> None:
    url = tls.url() if login == "plain" else tls.external_url()
    tls_app.conf.update(broker_url=url)
    relay, _ = define_tasks(tls_app)
    async with tls_app.setup():
        handle = await start_worker(tls_app, concurrency=2)
        try:
            follow_up = await (await relay.delay(21)).get(timeout=TIMEOUT)  # type: ignore[attr-defined]
            assert await tls_app.AsyncResult(follow_up).get(timeout=TIMEOUT) == 42

            # the node's only clients: this app's, the worker's consumer, publisher and
            # remote control mailbox
            rows = await asyncio.to_thread(
                tls.node.connections, "client_properties", "ssl", "ssl_protocol",
                "peer_cert_subject", "user", "auth_mechanism")
            names = sorted(row["client_properties"]["connection_name"] for row in rows)
            assert len(names) == 4 and names[0].startswith(f"aio_celery {tls_app.main}"), names
            assert names[1].startswith("aio_celery worker"), names
            assert names[2].endswith("publisher"), names
            assert names[3].endswith("remote control"), names
            user = "guest" if login == "plain" else CLIENT_USER
            for row in rows:
                assert row["ssl"] is True, row
                assert str(row["ssl_protocol"]).startswith("tlsv1."), row
                assert row["user"] == user, row
                assert row["auth_mechanism"] == login.upper(), row
                if login == "external":
                    assert f"CN={CLIENT_USER}" in str(row["peer_cert_subject"]), row
        finally:
            assert await handle.stop() == 0


async def test_the_wrong_ca_is_refused_at_once_by_each_side(
        tls: TlsNode, tls_app: Celery, start_worker,
        caplog: pytest.LogCaptureFixture) -> None:
    wrong = tls.url(ca="other-ca")

    started = time.monotonic()
    with pytest.raises(BrokerRefused, match="certificate verify failed") as refused:
        await connect_first(Failover(wrong), heartbeat=60, connection_name="tls-test",
                            connection_timeout=TIMEOUT, rpc_timeout=TIMEOUT,
                            publish_timeout=TIMEOUT)
    assert "TLS certificate is not trusted" in str(refused.value)
    assert "Check cafile/capath in broker_url" in str(refused.value)
    assert "guest:guest" not in str(refused.value)

    client = Broker(wrong, connection_timeout=TIMEOUT)
    with pytest.raises(BrokerConnectionError, match="certificate verify failed"):
        await client.connect()
    await client.close()
    assert time.monotonic() - started < 2 * REFUSED_WITHIN

    # the worker stops at start-up: retrying cannot fix a certificate that is not trusted
    tls_app.conf.update(broker_url=wrong, broker_connection_timeout=TIMEOUT)
    caplog.set_level(logging.INFO)
    started = time.monotonic()
    worker = start_worker(tls_app, concurrency=1)
    with pytest.raises(RuntimeError, match=f"exited during start-up with "
                                           f"{exitcodes.STARTUP_ERROR}"):
        await asyncio.wait_for(worker, TIMEOUT)
    assert time.monotonic() - started < REFUSED_WITHIN
    assert re.search(r"Worker start-up failed: .*its TLS certificate is not trusted "
                     r"\(\[SSL: CERTIFICATE_VERIFY_FAILED\] certificate verify failed", caplog.text)
    assert "guest:guest" not in caplog.text


async def test_no_verify_ssl_turns_verification_off_only_when_it_says_so(
        tls: TlsNode) -> None:
    unverified = tls.url(ca="other-ca", no_verify_ssl="1")
    connection = AMQPConnection(unverified, connect_timeout=TIMEOUT)
    await connection.connect()
    await connection.close()
    client = Broker(unverified, connection_timeout=TIMEOUT)
    await client.connect()
    await client.close()

    # "false" keeps verification on here and for aio-pika, which reads only "0" as off
    for value in ("false", "0"):
        verified = tls.url(ca="other-ca", no_verify_ssl=value)
        with pytest.raises(OSError, match="certificate verify failed"):
            await AMQPConnection(verified, connect_timeout=TIMEOUT).connect()
        client = Broker(verified, connection_timeout=TIMEOUT)
        with pytest.raises(BrokerConnectionError, match="certificate verify failed"):
            await client.connect()
        await client.close()
