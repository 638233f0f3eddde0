"""A lean AMQP 0-9-1 client connection with one channel: the worker's consumer side.

aiormq reads each of the three frames of a delivery through a stream lock, a ``BytesIO``,
pamqp's generic decoder and two queues, then starts a task per message; for a worker that
runs no-op tasks that was more than half of its CPU. Here the bytes read go to the sans-I/O
:class:`~aio_celery.amqp.reader.FrameReader`, which cuts deliveries straight out of its
buffer (:mod:`aio_celery.amqp.wire`) and calls back; each goes to its consumer's plain
callback, and acks are single ``write`` calls. The rare methods (handshake, declarations,
consume, cancel) are encoded and decoded by pamqp. This module is the I/O around the
reader: the socket (paused while held deliveries pile up), heartbeats, requests and their
replies, publisher confirms.

One channel, in confirm mode, so that a republished message is known to be queued before
the original is acked. Lost connections are not repaired here: :meth:`AMQPConnection.closed`
says why it ended, and the owner opens a new connection.

Back-pressure: :meth:`AMQPConnection.hold` stops handing over deliveries at a message
boundary; what arrives meanwhile stays in the buffer as wire bytes, and past 64 KiB in the
socket (reading paused). Replies, confirms and control frames still get through, and the
heartbeat timer reads once per beat, so a broker's close or a dead socket is noticed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import platform
import ssl
import struct
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import parse_qs, parse_qsl, unquote, urlencode, urlsplit, urlunsplit

from pamqp import commands, exceptions, frame

from aio_celery import __version__
from aio_celery.amqp import wire as amqpwire
from aio_celery.amqp.deadline import SharedDeadlines
from aio_celery.amqp.reader import Delivery, FrameReader
from aio_celery.amqp.wire import WireError
from aio_celery.config import BROKER_SCHEMES, url_problem

logger = logging.getLogger(__name__)

CHANNEL = 1
#: the largest frame we accept and send (RabbitMQ's default); the broker may ask for less
FRAME_MAX = 131072
#: the channels we offer (one is used); the broker may ask for fewer
CHANNEL_MAX = 2047
#: seconds the broker gets to answer a request (a declare, consume, cancel, qos) before the
#: connection is dropped as stalled: generous, a quorum queue declaration on a busy cluster
#: takes seconds, but bounded, so that start-up, reconnect and shutdown never hang
RPC_TIMEOUT = 15.0
_PROTOCOL_HEADER = b"AMQP\x00\x00\x09\x01"
#: while deliveries are held, stop reading the socket once this many bytes are buffered
PAUSE_READING_AT = 65536
_CAPABILITIES = {
    "publisher_confirms": True,
    "consumer_cancel_notify": True,
    "basic.nack": True,
    "connection.blocked": True,
    "authentication_failure_close": True,
}

Reply = TypeVar("Reply", bound=Any)


class ConnectionClosed(ConnectionError):
    """The connection is gone, or the broker refused a request (its reason is the text;
    ``reply_code`` is the broker's AMQP code when it closed the connection or channel, e.g.
    403 ACCESS_REFUSED, 530 NOT_ALLOWED for a missing vhost)."""

    def __init__(self, reason: str, reply_code: int | None = None) -> None:
        super().__init__(reason)
        self.reply_code = reply_code


class Nacked(ConnectionClosed):
    """The broker nacked a published message (the connection itself stays open)."""


class Returned(Exception):
    """The broker returned a ``mandatory`` message: no queue took it (the text says why)."""


__all__ = ["CHANNEL", "CHANNEL_MAX", "FRAME_MAX", "MECHANISMS", "PAUSE_READING_AT",
           "RPC_TIMEOUT", "AMQPConnection", "ConnectionClosed", "Delivery", "DeliveryCallback",
           "Endpoint", "Nacked", "Returned", "aio_pika_url"]

DeliveryCallback = Callable[[Delivery], None]


#: ``no_verify_ssl`` values that turn certificate verification off (any other value that
#: is not in :data:`_FALSE` is refused: a typo must not silently disable verification)
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"", "0", "false", "no", "off"})
#: login mechanisms: PLAIN (user and password) and EXTERNAL (the TLS client certificate)
MECHANISMS = ("PLAIN", "EXTERNAL")
#: the query parameters that choose one (aiormq's name, and ours)
_AUTH_PARAMETERS = ("auth", "auth_mechanism")
_TLS_OPTIONS = ("cafile", "capath", "certfile", "keyfile")


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where and how to connect, read from one ``amqp://`` or ``amqps://`` URL. The query
    parameters aio-pika reads mean the same here: ``cafile``, ``capath``, ``certfile``,
    ``keyfile``, ``no_verify_ssl`` (only 1/true/yes/on turn verification off),
    ``heartbeat`` and ``auth`` (``plain`` or ``external``; ``auth_mechanism`` is the same)."""

    host: str
    port: int
    username: str
    password: str = field(repr=False)
    vhost: str
    tls: bool
    heartbeat: int | None  # from ``?heartbeat=``: None when the URL does not say
    tls_options: tuple[tuple[str, str], ...] = ()
    verify: bool = True  # check the broker's certificate and host name (amqps)
    mechanism: str = "PLAIN"

    @classmethod
    def from_url(cls, url: str) -> Endpoint:
        """Read ``url``; ValueError says what is wrong without quoting it (a password)."""
        problem = url_problem(url, BROKER_SCHEMES)
        if problem is not None:
            raise ValueError(f"broker_url cannot be read: {problem}")
        parts = urlsplit(url)
        tls = parts.scheme == "amqps"
        path = unquote(parts.path)
        query = {name: values[0] for name, values
                 in parse_qs(parts.query, keep_blank_values=True).items()}
        heartbeat = query.get("heartbeat")
        if heartbeat and not heartbeat.isdigit():
            raise ValueError("broker_url cannot be read: heartbeat= must be whole seconds")
        return cls(
            host=parts.hostname or "localhost",
            port=parts.port or (5671 if tls else 5672),
            username=unquote(parts.username or "guest"),
            password=unquote(parts.password or "guest"),
            # "amqp://host" and "amqp://host/" mean "/"; "amqp://host//" is "/" spelled out
            vhost=path[1:] if len(path) > 1 else "/",
            tls=tls,
            heartbeat=int(heartbeat) if heartbeat else None,
            tls_options=tuple((name, query[name]) for name in _TLS_OPTIONS if name in query),
            verify=not _true(query.get("no_verify_ssl", "")),
            mechanism=_mechanism(query),
        )

    def ssl_context(self) -> ssl.SSLContext | None:
        if not self.tls:
            return None
        options = dict(self.tls_options)
        context = ssl.create_default_context(cafile=options.get("cafile"),
                                             capath=options.get("capath"))
        if "certfile" in options:
            context.load_cert_chain(options["certfile"], options.get("keyfile"))
        if not self.verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context

    def login(self) -> tuple[str, str]:
        """The SASL mechanism and response of ``connection.start-ok``."""
        if self.mechanism == "EXTERNAL":  # the broker takes the name from the certificate
            return "EXTERNAL", ""
        return "PLAIN", f"\0{self.username}\0{self.password}"


def _true(value: str) -> bool:
    """``no_verify_ssl``'s value, strictly: ValueError for one that is neither."""
    lowered = value.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError("broker_url cannot be read: no_verify_ssl= must be 1/true/yes/on (do "
                     "not verify the broker's certificate) or 0/false/no/off")


def _mechanism(query: dict[str, str]) -> str:
    values = {query[name].strip().upper() for name in _AUTH_PARAMETERS if name in query}
    if len(values) > 1:
        raise ValueError("broker_url cannot be read: auth= and auth_mechanism= disagree")
    mechanism = values.pop() if values else "PLAIN"
    if mechanism not in MECHANISMS:
        raise ValueError(f"broker_url cannot be read: auth={mechanism.lower()!r} is not one "
                         f"of {', '.join(m.lower() for m in MECHANISMS)}")
    return mechanism


def aio_pika_url(url: str) -> str:
    """``url`` (one URL) as aio-pika must read it to mean what :class:`Endpoint` reads:
    aiormq turns verification off for any ``no_verify_ssl`` other than "0" (``false``
    too), so it gets "1" or nothing; ``auth_mechanism`` becomes aiormq's ``auth``.
    ValueError as :meth:`Endpoint.from_url` raises it."""
    endpoint = Endpoint.from_url(url)
    parts = urlsplit(url)
    query = [(name, value) for name, value in parse_qsl(parts.query, keep_blank_values=True)
             if name not in ("no_verify_ssl", *_AUTH_PARAMETERS)]
    if not endpoint.verify:
        query.append(("no_verify_ssl", "1"))
    if endpoint.mechanism != "PLAIN":
        query.append(("auth", endpoint.mechanism.lower()))
    return urlunsplit(parts._replace(query=urlencode(query)))


class AMQPConnection(asyncio.Protocol):
    """An AMQP connection and its one channel. Inert until :meth:`connect`."""

    def __init__(self, url: str, *, heartbeat: int = 60, connection_name: str = "aio_celery",
                 connect_timeout: float = 4.0, rpc_timeout: float = RPC_TIMEOUT,
                 publish_timeout: float | None = None) -> None:
        self.endpoint = Endpoint.from_url(url)
        #: the heartbeat interval asked for; once connected, the one agreed with the broker
        self.heartbeat = self.endpoint.heartbeat if self.endpoint.heartbeat is not None \
            else heartbeat
        self.connection_name = connection_name
        self.connect_timeout = connect_timeout
        self.rpc_timeout = rpc_timeout
        self.publish_timeout = publish_timeout
        #: the limits agreed with the broker (ours until connected)
        self.frame_max = FRAME_MAX
        self.channel_max = CHANNEL_MAX
        #: why the broker blocks publishing on this connection (a resource alarm), or None
        self.blocked: str | None = None
        #: set while publishing is not blocked (made again by each connect)
        self._unblocked = asyncio.Event()
        #: the queue of each consumer, for the log line when the broker cancels one
        self._consumer_queues: dict[str, str] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._transport: asyncio.Transport | None = None
        self._reader = self._new_reader()
        self._reading_paused = False
        self._ended: asyncio.Future[str] | None = None
        self._rpc_lock = asyncio.Lock()
        self._reply: asyncio.Future[Any] | None = None
        #: replies still to come for requests whose callers gave up waiting (cancelled)
        self._abandoned_replies = 0
        self._consumers: dict[str, DeliveryCallback] = {}
        self._published = 0
        #: the tag of the last unconfirmed-kind publish, and the highest tag confirmed
        self._last_blind = 0
        self._confirmed_upto = 0
        self._confirms: dict[int, asyncio.Future[None]] = {}
        self._publish_deadlines = SharedDeadlines()
        #: the exchange and routing key of each mandatory publish not yet confirmed
        self._mandatory: dict[int, tuple[str, str]] = {}
        #: why the broker returned a mandatory publish, until its confirm comes
        self._returned: dict[int, str] = {}
        self._last_received = 0.0
        self._heartbeat_timer: asyncio.TimerHandle | None = None

    # --- lifecycle ---------------------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        return self._transport is not None and self._ended is not None \
            and not self._ended.done()

    @property
    def ended_reason(self) -> str | None:
        """Why the connection ended; None while open or before :meth:`connect`."""
        ended = self._ended
        return ended.result() if ended is not None and ended.done() else None

    @property
    def unconfirmed(self) -> int:
        """Publishes sent whose confirm (or return) has not come yet."""
        return len(self._confirms)

    @property
    def reading_paused(self) -> bool:
        """Held deliveries filled the buffer: the socket is not read for now."""
        return self._reading_paused

    @property
    def buffered(self) -> int:
        """Bytes received and not yet handed over (held deliveries, a partial frame)."""
        return self._reader.buffered

    @property
    def held(self) -> bool:
        """Deliveries are held back (:meth:`hold`, until :meth:`release`)."""
        return self._reader.held

    @property
    def consumers(self) -> dict[str, str]:
        """The queue of each consumer started and not cancelled, by consumer tag."""
        return dict(self._consumer_queues)

    @property
    def _event_loop(self) -> asyncio.AbstractEventLoop:
        """The loop :meth:`connect` ran on (a bug of ours to need it before)."""
        if self._loop is None:
            raise RuntimeError("AMQPConnection used before connect()")
        return self._loop

    async def connect(self) -> None:
        """Connect, log in, open the channel in confirm mode; ConnectionClosed or OSError if
        that cannot be done within ``connect_timeout``."""
        self._loop = asyncio.get_running_loop()
        self._ended = self._loop.create_future()
        self._reader = self._new_reader()
        self._unblocked = asyncio.Event()
        self._unblocked.set()
        try:
            await asyncio.wait_for(self._open(), self.connect_timeout)
        except BaseException:
            self._abort("connection attempt failed")
            raise

    async def _open(self) -> None:
        endpoint = self.endpoint
        await self._event_loop.create_connection(lambda: self, endpoint.host, endpoint.port,
                                           ssl=endpoint.ssl_context())
        start = await self._call(None, commands.Connection.Start, raw=_PROTOCOL_HEADER)
        mechanism, response = endpoint.login()
        if mechanism.encode() not in start.mechanisms.encode().split():
            raise ConnectionClosed(f"the broker offers no {mechanism} login (it offers "
                                   f"{start.mechanisms}); see auth= in broker_url")
        tune = await self._call(commands.Connection.StartOk(
            client_properties=self._client_properties(), mechanism=mechanism,
            response=response, locale="en_US"), commands.Connection.Tune, channel=0)
        self.frame_max = amqpwire.negotiate(FRAME_MAX, tune.frame_max)
        self.channel_max = amqpwire.negotiate(CHANNEL_MAX, tune.channel_max)
        self.heartbeat = amqpwire.negotiate(self.heartbeat, tune.heartbeat)
        self._write(frame.marshal(commands.Connection.TuneOk(
            channel_max=self.channel_max, frame_max=self.frame_max,
            heartbeat=self.heartbeat), 0))
        await self._call(commands.Connection.Open(virtual_host=endpoint.vhost),
                         commands.Connection.OpenOk, channel=0)
        await self._call(commands.Channel.Open(), commands.Channel.OpenOk)
        await self._call(commands.Confirm.Select(), commands.Confirm.SelectOk)
        if self.heartbeat:
            self._schedule_heartbeat()

    def _client_properties(self) -> dict[str, Any]:
        return {"product": "aio-celery", "version": __version__,
                "platform": f"Python {platform.python_version()}",
                "connection_name": self.connection_name, "capabilities": _CAPABILITIES}

    async def closed(self) -> str:
        """Wait until the connection ends (for whatever reason) and return why."""
        if self._ended is None:
            raise RuntimeError("connection is not open")
        return await asyncio.shield(self._ended)

    async def close(self, timeout: float = 5.0) -> None:
        """Close politely (``connection.close``, wait for its ok), then drop the socket. A
        connection the broker blocked is dropped at once: RabbitMQ reads nothing more from
        it until the alarm ends, the close included, so waiting would only cost the
        timeout (a worker's shutdown during an alarm)."""
        if self.is_open and self.blocked is None:
            with contextlib.suppress(ConnectionError, TimeoutError):
                await asyncio.wait_for(self._call(
                    commands.Connection.Close(reply_code=200, reply_text="Normal shutdown",
                                              class_id=0, method_id=0),
                    commands.Connection.CloseOk, channel=0), timeout)
        self._abort("closed")

    # --- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not isinstance(transport, asyncio.Transport):  # create_connection's never is
            raise TypeError(f"AMQPConnection needs a stream transport, got {transport!r}")
        self._transport = transport
        self._last_received = self._event_loop.time()

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._end(f"connection lost: {exc}" if exc else "the broker closed the connection")

    def data_received(self, data: bytes) -> None:
        self._last_received = self._event_loop.time()
        self._parse(data)

    def _new_reader(self) -> FrameReader:
        return FrameReader(self._delivered, self._method, awaiting=self._awaiting_broker)

    def _parse(self, data: bytes = b"") -> None:
        """Feed the reader (it reads nothing once the connection has ended); a stream it
        cannot read, or an answer that cannot be written, ends the connection."""
        try:
            self._reader.feed(data)
        except (ValueError, struct.error, exceptions.PAMQPException) as exc:
            # WireError is a ValueError: the reader's, or a reply nobody asked for. The
            # others would be a bug in an answer to a method, as fatal
            self._abort(f"unreadable frame from the broker: {exc}")
            return
        except ConnectionError as exc:  # an answer could not be written: the socket is gone
            self._abort(str(exc))
            return
        self._pause_if_held()

    def _pause_if_held(self) -> None:
        """Stop reading the socket once enough held bytes are buffered. Only where holding
        stopped the reader (a message boundary, nothing awaited): a paused socket would
        never bring the rest of a frame, a reply or a confirm."""
        reader = self._reader
        if reader.held and not self._reading_paused and reader.buffered > PAUSE_READING_AT \
                and reader.holding and self._transport is not None:
            self._transport.pause_reading()
            self._reading_paused = True

    def _awaiting_broker(self) -> bool:
        """A reply or a publisher confirm is due: it may be behind held deliveries."""
        return (self._reply is not None and not self._reply.done()) \
            or self._abandoned_replies > 0 or bool(self._confirms)

    # --- holding deliveries back --------------------------------------------------------

    def hold(self) -> None:
        """Stop handing over deliveries for now: the owner has enough waiting. What arrives
        stays in the buffer as wire bytes, and past a limit stays in the socket."""
        self._reader.hold()

    def release(self) -> None:
        """Hand over deliveries again, starting with those held back."""
        if self._reader.held:
            self._reader.release()
            self._parse_soon()

    def _resume_reading(self) -> None:
        if self._reading_paused and self._transport is not None:
            self._reading_paused = False
            self._last_received = self._event_loop.time()  # silent by our choice until now
            self._transport.resume_reading()

    def _parse_soon(self) -> None:
        """Resume reading and parse the buffer from the event loop (never re-entrantly from
        inside a delivery callback)."""
        self._resume_reading()
        if self._reader.buffered:
            self._event_loop.call_soon(self._parse)

    # --- incoming frames ----------------------------------------------------------------

    def _delivered(self, delivery: Delivery) -> None:
        deliver = delivery.deliver
        callback = self._consumers.get(deliver.consumer_tag)
        if callback is None:  # cannot happen: tags are registered before consuming starts
            logger.error("Delivery for unknown consumer %s: requeued", deliver.consumer_tag)
            self.reject(deliver.delivery_tag, requeue=True)
            return
        try:
            callback(delivery)
        except Exception:
            logger.exception("Delivery callback of consumer %s failed (delivery tag %d)",
                             deliver.consumer_tag, deliver.delivery_tag)

    def _method(self, channel: int, method: Any) -> None:
        if isinstance(method, commands.Basic.Ack):
            self._confirmed(method.delivery_tag, method.multiple, None)
        elif isinstance(method, commands.Basic.Nack):
            self._confirmed(method.delivery_tag, method.multiple,
                            Nacked("the broker refused (nacked) a published message"))
        elif isinstance(method, commands.Connection.Close | commands.Channel.Close):
            self._closed_by_broker(channel, method)
        elif isinstance(method, commands.Basic.Cancel):
            self._cancelled_by_broker(method)
        elif isinstance(method, commands.Connection.Blocked):
            self._blocked(method.reason or "no reason given")
        elif isinstance(method, commands.Connection.Unblocked):
            self._unblocked_by_broker()
        elif isinstance(method, commands.Channel.Flow):
            self._write(frame.marshal(commands.Channel.FlowOk(active=method.active), channel))
        elif isinstance(method, commands.Basic.Return):  # (the reader drops its content)
            self._returned_by_broker(method)
        else:
            self._replied(method)

    def _returned_by_broker(self, method: commands.Basic.Return) -> None:
        """A mandatory message no queue took; its confirm follows, and fails with Returned.
        A return names no delivery tag, and a confirm of an earlier message (routed to a
        queue, confirmed once that queue has it) may come in between: the returned message
        is the oldest unconfirmed mandatory one to the same exchange and routing key
        (RabbitMQ routes and returns a channel's messages in order)."""
        key = (method.exchange, method.routing_key)
        tag = next((t for t, sent_to in self._mandatory.items() if sent_to == key), None)
        if tag is None:
            logger.warning("The broker returned a message that was not published mandatory "
                           "here (exchange %r, routing key %r)", *key)
            return
        del self._mandatory[tag]
        self._returned[tag] = (f"{method.reply_code} {method.reply_text} (exchange "
                               f"{method.exchange!r}, routing key {method.routing_key!r})")

    def _replied(self, method: Any) -> None:
        if self._abandoned_replies:
            self._abandoned_replies -= 1  # the reply to a request whose caller gave up
        elif self._reply is not None and not self._reply.done():
            self._reply.set_result(method)
        else:
            raise WireError(f"unexpected {method.name} from the broker")

    def _closed_by_broker(self, channel: int,
                          method: commands.Connection.Close | commands.Channel.Close) -> None:
        if isinstance(method, commands.Connection.Close):
            self._write(frame.marshal(commands.Connection.CloseOk(), 0))
            what = "connection"
        else:
            self._write(frame.marshal(commands.Channel.CloseOk(), channel))
            what = "channel"
        # A channel error caused by a request (a declaration) is that request's: the
        # publishes awaiting confirms meanwhile are lost with the channel, not refused.
        # The same for a publish error while a publish of ours that nobody awaits may be
        # the culprit (an event to an exchange deleted meanwhile): the others are lost,
        # to be sent again, not refused for good.
        by_publish = what == "channel" and \
            ((method.class_id or 0) << 16 | (method.method_id or 0)) \
            == commands.Basic.Publish.index and self._last_blind <= self._confirmed_upto
        self._abort(f"the broker closed the {what}: {method.reply_code} {method.reply_text}",
                    method.reply_code, confirms_too=by_publish)

    def _cancelled_by_broker(self, method: commands.Basic.Cancel) -> None:
        """RabbitMQ cancels a consumer whose queue was deleted, whose quorum queue leader
        moved away, or (4.3, quorum queues) whose delivery outlived ``consumer_timeout``.
        The method carries no reason: the log names the candidates. The connection ends, so
        that its owner opens a new one, declares the queue again and consumes it again."""
        tag = method.consumer_tag or ""
        if not method.nowait:
            self._write(frame.marshal(commands.Basic.CancelOk(consumer_tag=tag), CHANNEL))
        self._consumers.pop(tag, None)
        queue = self._consumer_queues.pop(tag, "?")
        logger.warning("The broker cancelled the consumer of queue %r (consumer tag %s): the "
                       "queue was deleted, its quorum leader moved to another node, or a "
                       "delivery stayed unacknowledged past RabbitMQ's consumer_timeout. "
                       "Reconnecting to declare and consume it again", queue, tag)
        self._abort(f"the broker cancelled consumer {tag} of queue {queue!r}")

    def _blocked(self, reason: str) -> None:
        self.blocked = reason
        self._unblocked.clear()
        logger.warning("The broker blocked publishing on this connection (%s: a resource "
                       "alarm, see `rabbitmq-diagnostics alarms`): publishes wait for it to "
                       "clear, each at most its publish timeout", reason)

    def _unblocked_by_broker(self) -> None:
        if self.blocked is not None:
            logger.info("The broker unblocked publishing on this connection (%s cleared)",
                        self.blocked)
        self.blocked = None
        self._unblocked.set()

    def _confirmed(self, tag: int, multiple: bool, error: Exception | None) -> None:
        self._confirmed_upto = max(self._confirmed_upto, tag)
        tags = [t for t in self._confirms if t <= tag] if multiple else [tag]
        for confirmed in tags:
            future = self._confirms.pop(confirmed, None)
            self._mandatory.pop(confirmed, None)
            returned = self._returned.pop(confirmed, None)
            if future is not None and not future.done():
                if returned is not None:
                    future.set_exception(Returned(f"the broker returned it: {returned}"))
                elif error is None:
                    future.set_result(None)
                else:
                    future.set_exception(error)

    # --- ending -------------------------------------------------------------------------

    def _abort(self, reason: str, reply_code: int | None = None, *,
               confirms_too: bool = True) -> None:
        """End now: record ``reason``, drop the socket, fail whatever waits (publishes
        awaiting confirms get ``reply_code`` only if ``confirms_too``)."""
        self._end(reason, reply_code, confirms_too=confirms_too)
        transport, self._transport = self._transport, None
        if transport is not None:
            transport.close()

    def _end(self, reason: str, reply_code: int | None = None, *,
             confirms_too: bool = True) -> None:
        if self._heartbeat_timer is not None:
            self._heartbeat_timer.cancel()
            self._heartbeat_timer = None
        self._consumers.clear()
        self._reader.close()
        self._abandoned_replies = 0
        self._mandatory.clear()
        self._returned.clear()
        self._consumer_queues.clear()
        self._unblocked.set()  # publishes waiting for an unblock fail now
        error = ConnectionClosed(reason, reply_code)
        if self._reply is not None and not self._reply.done():
            self._reply.set_exception(error)
        if not confirms_too:
            error = ConnectionClosed(reason)
        confirms, self._confirms = self._confirms, {}
        for future in confirms.values():
            if not future.done():
                future.set_exception(error)
        if self._ended is not None and not self._ended.done():
            self._ended.set_result(reason)

    # --- heartbeats ---------------------------------------------------------------------

    def _schedule_heartbeat(self) -> None:
        self._heartbeat_timer = self._event_loop.call_later(self.heartbeat / 2, self._beat)

    def _beat(self) -> None:
        """Send a heartbeat every half interval; give up on a broker silent for two. While
        held deliveries keep the socket paused, read once anyway: a closed socket, or a
        close from the broker behind the deliveries, must not wait for the release."""
        self._resume_reading()  # _parse pauses again once more has arrived
        silent = self._event_loop.time() - self._last_received
        if silent > 2 * self.heartbeat:
            self._abort(f"no heartbeat from the broker for {silent:.0f}s")
            return
        try:
            self._write(amqpwire.HEARTBEAT)
        except ConnectionError:
            return  # ending: connection_lost says why
        self._schedule_heartbeat()

    # --- outgoing -----------------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            reason = self._ended.result() if self._ended is not None and self._ended.done() \
                else "not connected"
            raise ConnectionClosed(reason)
        transport.write(data)

    async def _call(self, method: Any, reply: type[Reply], *, channel: int = CHANNEL,
                    raw: bytes | None = None) -> Reply:
        """Send a synchronous method and return the broker's reply (one at a time, as
        AMQP wants). A broker that does not answer within ``rpc_timeout`` is stalled: the
        connection is dropped and ConnectionClosed raised (its owner reconnects)."""
        name = getattr(method, "name", "the protocol header")
        try:
            async with asyncio.timeout(self.rpc_timeout):
                return await self._call_unbounded(method, reply, channel=channel, raw=raw)
        except TimeoutError:
            reason = f"the broker did not answer {name} within {self.rpc_timeout:g}s"
            self._abort(reason)
            raise ConnectionClosed(reason) from None

    async def _call_unbounded(self, method: Any, reply: type[Reply], *, channel: int,
                              raw: bytes | None) -> Reply:
        async with self._rpc_lock:
            self._reply = future = self._event_loop.create_future()
            sent = False
            try:
                self._write(raw if raw is not None else frame.marshal(method, channel))
                sent = True
                if self._reader.held:  # the reply may be queued behind held deliveries
                    self._parse_soon()
                answer = await future
            finally:
                self._reply = None
                if sent and future.cancelled() and self.is_open:
                    self._abandoned_replies += 1  # its reply will still come: skip it
        if not isinstance(answer, reply):
            raise ConnectionClosed(f"the broker answered {answer.name} to "
                                   f"{getattr(method, 'name', 'the protocol header')}")
        return answer

    def ack(self, delivery_tag: int, multiple: bool = False) -> None:
        self._write(amqpwire.encode_ack(CHANNEL, delivery_tag, multiple))

    def reject(self, delivery_tag: int, requeue: bool) -> None:
        self._write(amqpwire.encode_reject(CHANNEL, delivery_tag, requeue))

    def nack(self, delivery_tag: int, requeue: bool = True) -> None:
        self._write(amqpwire.encode_nack(CHANNEL, delivery_tag, requeue))

    async def publish(self, body: bytes, properties: bytes, routing_key: str,
                      exchange: str = "", mandatory: bool = False) -> None:
        """Publish and wait for the broker's confirm. ``properties`` are encoded
        (e.g. :attr:`Properties.encoded` of a received message). A nack raises
        ConnectionClosed; a ``mandatory`` message that no queue took raises Returned.

        While the broker blocks the connection (a resource alarm) the message is not sent:
        RabbitMQ would stop reading the socket, and the acks that share it. TimeoutError
        once ``publish_timeout`` has passed, blocked or waiting for the confirm (the
        message may or may not have been queued then)."""
        try:
            with self._publish_deadlines.bound(self.publish_timeout):
                await self._publish(body, properties, routing_key, exchange, mandatory)
        except TimeoutError:
            state = f"blocked by the broker ({self.blocked})" if self.blocked is not None \
                else "no confirm from the broker"
            raise TimeoutError(f"publish to {routing_key!r} timed out after "
                               f"{self.publish_timeout:g}s: {state}") from None

    async def _publish(self, body: bytes, properties: bytes, routing_key: str,
                       exchange: str, mandatory: bool) -> None:
        loop = self._event_loop
        if self.blocked is not None:
            await self._unblocked.wait()
        self._published += 1
        confirm = self._confirms[self._published] = loop.create_future()
        if mandatory:
            self._mandatory[self._published] = (exchange, routing_key)
        self._write(frame.marshal(commands.Basic.Publish(exchange=exchange,
                                                         routing_key=routing_key,
                                                         mandatory=mandatory), CHANNEL)
                    + amqpwire.content_frames(CHANNEL, body, properties, self.frame_max))
        if self._reader.held:  # the confirm may be queued behind held deliveries
            self._parse_soon()
        await confirm

    def publish_unconfirmed(self, body: bytes, properties: bytes, routing_key: str,
                            exchange: str = "") -> None:
        """Write a publish and return: no confirm is awaited or kept track of (monitoring
        events, which may be lost). The channel numbers it like any other publish, so the
        confirms of the others stay in step. The caller checks :attr:`blocked` and
        :attr:`write_backlog` first: this never waits. ConnectionClosed when not open."""
        self._write(frame.marshal(commands.Basic.Publish(exchange=exchange,
                                                         routing_key=routing_key), CHANNEL)
                    + amqpwire.content_frames(CHANNEL, body, properties, self.frame_max))
        self._published += 1
        self._last_blind = self._published

    @property
    def write_backlog(self) -> int:
        """Bytes written and not yet taken by the socket (a slow broker or network)."""
        transport = self._transport
        return transport.get_write_buffer_size() if transport is not None else 0

    async def qos(self, prefetch_count: int, global_: bool = False) -> None:
        """``global_=False``: a limit for each consumer started afterwards (RabbitMQ refuses
        global QoS on quorum queues, and RabbitMQ 4.3 on every queue by default)."""
        await self._call(commands.Basic.Qos(prefetch_count=prefetch_count, global_=global_),
                         commands.Basic.QosOk)

    async def exchange_declare(self, name: str, kind: str = "direct", *, durable: bool = True,
                               passive: bool = False) -> None:
        await self._call(commands.Exchange.Declare(exchange=name, exchange_type=kind,
                                                   durable=durable, passive=passive),
                         commands.Exchange.DeclareOk)

    async def queue_declare(self, name: str, *, durable: bool = True, passive: bool = False,
                            arguments: dict[str, Any] | None = None, exclusive: bool = False,
                            auto_delete: bool = False) -> commands.Queue.DeclareOk:
        return await self._call(commands.Queue.Declare(queue=name, durable=durable,
                                                       passive=passive, arguments=arguments,
                                                       exclusive=exclusive,
                                                       auto_delete=auto_delete),
                                commands.Queue.DeclareOk)

    async def queue_bind(self, queue: str, exchange: str, routing_key: str) -> None:
        await self._call(commands.Queue.Bind(queue=queue, exchange=exchange,
                                             routing_key=routing_key), commands.Queue.BindOk)

    async def exchange_bind(self, destination: str, source: str, routing_key: str) -> None:
        await self._call(commands.Exchange.Bind(destination=destination, source=source,
                                                routing_key=routing_key),
                         commands.Exchange.BindOk)

    async def consume(self, queue: str, callback: DeliveryCallback, *,
                      no_ack: bool = False) -> str:
        """Start a consumer; its deliveries reach ``callback`` from then on (``no_ack``:
        the broker counts them acknowledged as it sends them)."""
        tag = f"aio-celery-{uuid.uuid4().hex[:12]}"
        # Registered first: deliveries may follow consume-ok in the same read.
        self._consumers[tag] = callback
        self._consumer_queues[tag] = queue
        try:
            await self._call(commands.Basic.Consume(queue=queue, consumer_tag=tag,
                                                    no_ack=no_ack),
                             commands.Basic.ConsumeOk)
        except BaseException:
            self._consumers.pop(tag, None)
            self._consumer_queues.pop(tag, None)
            raise
        return tag

    async def cancel(self, consumer_tag: str) -> None:
        """Stop a consumer (messages already delivered stay ours until settled)."""
        await self._call(commands.Basic.Cancel(consumer_tag=consumer_tag),
                         commands.Basic.CancelOk)
        self._consumers.pop(consumer_tag, None)
        self._consumer_queues.pop(consumer_tag, None)

