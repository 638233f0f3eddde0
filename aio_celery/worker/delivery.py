"""One consumer session: the deliveries of one AMQP channel, from arrival to settlement.

A delivery is decoded as it arrives (a message that cannot be decoded is rejected at once,
without requeue); only the decoded message is kept, not the wire bytes. Then:

* an ``eta`` in the future waits in a task of its own without taking a concurrency slot,
  but it takes a place in the prefetch window, which is static (per-consumer QoS: global
  QoS is refused by quorum queues and by RabbitMQ 4.3). So at most ``prefetch -
  concurrency`` etas wait in memory, and ``concurrency`` places always stay for ready
  messages. Any other eta is *parked* (republished, then acked): through native delayed
  delivery when the queue is bound to it (quorum mode, a non-direct exchange), else to a
  holding queue whose TTL dead-letters it back here: the eta horizon's for an eta beyond
  ``eta_horizon`` (so RabbitMQ's ``consumer_timeout`` never sees it unacked), else the
  largest power of two seconds not past its eta (it comes back no later than due, and
  waits here or is parked again; one that is due within a second may run up to a second
  late when the window has no room for it);
* a message of a rate-limited task (:mod:`aio_celery.worker.rates`) that cannot take its
  token at once waits for it without a slot, in its task type's line, unacknowledged, in
  the same part of the prefetch window as the etas. When that part is full (or its token
  is beyond the eta horizon) and its wait is a second or more, it is parked like an eta
  due then: it comes back to the queue's tail, and the messages behind it get through (a
  flood of one rate-limited task never takes the ``concurrency`` places kept for ready
  messages). An eta that falls due takes its token in the same way, in the place it
  already takes;
* a message that is due joins the ready queue; whenever one of the ``concurrency`` slots is
  free the next one starts in an asyncio task of its own, runs, its result is stored, then
  the delivery is acknowledged: finished prefixes with one ``multiple`` ack per loop turn.

Rejects are written at once; acks are gathered and written once per loop turn. A rejected
tag leaves the tracker with its reject already on the wire, so no later ``multiple`` ack can
cover it, and each tag is settled once (RabbitMQ closes the channel on an unknown tag).

Unacknowledged deliveries age (RabbitMQ's ``consumer_timeout``): each is stamped as it
arrives and a periodic sweep gives back those that waited unstarted too long and warns
about long runs (:mod:`aio_celery.worker.aging`).

Every task the session starts has a done callback that frees its slot and, if it was
cancelled before it ever ran (a cold stop in the same loop turn), gives its message back.

A redelivered message first meets the poison guard (:mod:`aio_celery.poison`): it may wait
until a dead sibling's death is counted, run isolated (alone in this process), or be
retired without running. Fresh messages skip it.

A finished task that waits for the result backend or the broker (see
:mod:`aio_celery.worker.execution`) gives its slot up early, keeping its message
unacknowledged; while ``worker_max_pending_results`` of them wait, no new task starts.

A session's lifecycle is one :class:`State`, moved forward in one place
(:meth:`Session._enter`): RUNNING -> DRAINING (a stop was requested: nothing starts) ->
STOPPING (deliveries are given back, once the consumers are cancelled) -> DETACHED (the
consumers are cancelled) -> CLOSED. A cold stop or a lost connection goes to STOPPING
from RUNNING or DRAINING; a session that failed to start goes to CLOSED from RUNNING.

Words: *pausing deliveries* is back-pressure (the decoded ready line is long: the rest of
the window stays as wire bytes, :meth:`ConsumerChannel.pause_deliveries`); an *eta place*
is one of the ``prefetch - concurrency`` places of the window that etas and rate waits
take in memory; a *holding queue* is where a parked message waits on the broker.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import enum
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

from aio_celery import defaults, metrics, protocol, signals
from aio_celery import events as wire_events
from aio_celery.amqp.connection import Delivery
from aio_celery.broker import (
    DelayedDeliveryRefused,
    HoldingQueueRefused,
    describe_error,
)
from aio_celery.config import Settings
from aio_celery.exceptions import MessageDecodeError
from aio_celery.poison import Guard, Verdict
from aio_celery.quorum import FIRST_DELAY_EXCHANGE, delayed_routing_key, park_countdown
from aio_celery.transport import Consuming, WorkerPublishing
from aio_celery.worker import aging
from aio_celery.worker.acks import Acks
from aio_celery.worker.backoff import Backoff
from aio_celery.worker.events import EventDispatcher
from aio_celery.worker.execution import Settle, TaskRunner
from aio_celery.worker.options import WorkerOptions
from aio_celery.worker.rates import Limiter, Line
from aio_celery.worker.stats import Stats

logger = logging.getLogger("aio_celery.worker")

_CHANNEL_GONE = (ConnectionError,)


#: Decoded messages cost about twice their wire size in memory: with this many waiting for a
#: slot, deliveries are paused (the rest of the prefetch window stays undecoded) until the
#: line is down to _RESUME_AT (it matters at high concurrency: 1000 slots prefetch 4000
#: messages).
_PAUSE_AT = 64
_RESUME_AT = 16

#: a redelivered message whose id a sibling still shows as running waits this long at most
#: for the supervisor to count that sibling's death (it takes milliseconds; a sibling that
#: only lost its broker connection clears the slot itself as it cancels the task)
_COUNT_WAIT = 10.0
_COUNT_POLL = 0.02


#: a park that failed is tried again after this many seconds, doubling up to PARK_MAX_RETRY
PARK_FIRST_RETRY = 1.0
PARK_MAX_RETRY = 60.0

#: a rate-limited message that finds no room in the window waits in memory anyway if its
#: token is due sooner than this: a holding queue could not bring it back any sooner
RATE_PARK_MIN = 1.0


def horizon_ms(horizon: float) -> int:
    """The holding queue's message TTL for an eta horizon in seconds."""
    return int(horizon * 1000)


def wait_queue_name(queue: str, horizon: float) -> str:
    """The holding queue of ``queue`` whose TTL is ``horizon`` seconds. The TTL is part of
    the name: a queue cannot be declared again with another TTL, so a worker started with
    another ``--eta-horizon`` gets a queue of its own (the old one still hands its messages
    back) instead of a channel error at every park. (Earlier builds named them
    ``.aio-celery-eta-<ms>ms``, without ``x-expires``: those are left alone.)"""
    return f"{queue}.aio-celery-hold-{horizon_ms(horizon)}ms"


def holding_ttl(remaining: float, horizon: float) -> float:
    """The TTL of the holding queue an eta ``remaining`` seconds away is parked in: the
    horizon beyond it, else the largest power of two seconds not past the eta (1 s for
    one due within a second), so it never comes back late by more than that."""
    if remaining > horizon:
        return horizon
    level = 1.0
    while level * 2 <= remaining:
        level *= 2
    return min(level, horizon)


@dataclasses.dataclass(frozen=True, slots=True)
class _Parking:
    """Where a park sends the copy: ``exchange`` and ``routing_key``; ``ttl`` (seconds) of
    the holding queue ``routing_key`` names, None for native delayed delivery."""

    exchange: str
    routing_key: str
    ttl: float | None
    where: str


class State(enum.IntEnum):
    """A session's lifecycle; it only moves forward (:meth:`Session._enter`)."""

    #: taking deliveries and starting tasks
    RUNNING = 1
    #: a stop was requested: no task starts (running ones carry on); deliveries are still
    #: taken, and wait, or they would bounce straight back while the consumers are attached
    DRAINING = 2
    #: stopping (a stop, a cold stop, a lost connection): no task starts, new deliveries
    #: are given back, but only once the consumers are cancelled (given back before, the
    #: broker would hand them straight back)
    STOPPING = 3
    #: the consumers are cancelled: what is given back stays in the queue
    DETACHED = 4
    #: the channel is closed
    CLOSED = 5


#: the transitions :meth:`Session._enter` allows
_TRANSITIONS: dict[State, frozenset[State]] = {
    State.RUNNING: frozenset({State.DRAINING, State.STOPPING, State.CLOSED}),
    State.DRAINING: frozenset({State.STOPPING, State.CLOSED}),
    State.STOPPING: frozenset({State.DETACHED, State.CLOSED}),
    State.DETACHED: frozenset({State.CLOSED}),
    State.CLOSED: frozenset(),
}
_RUNNING = State.RUNNING  # the hot path's check, without an attribute lookup on State
_STOPPING = State.STOPPING


@dataclasses.dataclass(slots=True)
class _Job:
    """A decoded delivery, waiting for its turn or running."""

    queue: str
    message: protocol.TaskMessage
    tag: int
    delivery_info: dict[str, Any]
    arrived: float  # time.monotonic() at delivery (see aging)
    acked: bool = False  # acked as it started (acks_late=False)
    verdict: Verdict = Verdict.RUN  # the poison guard's, for a redelivered message
    deaths: int = 0  # of its worker processes while it ran (redelivered messages only)
    pending: bool = False  # over, its slot given up: waits for the backend or broker
    board_slot: int = -1  # where the poison guard's running board shows it running
    aged: bool = False  # the aging sweep gave it back (while waiting) or warned (running)
    eta_place: bool = False  # takes an eta place (an eta or rate wait here, a park retried)
    rate_until: float = 0.0  # time.monotonic() before which its token will not come (parks)


@dataclasses.dataclass
class StopOutcome:
    returned: int = 0
    cancelled: int = 0


class Session:
    """Consumes ``queues`` on one channel and settles every delivery exactly once."""

    def __init__(self, channel: Consuming, runner: TaskRunner, options: WorkerOptions,
                 stats: Stats, on_task_done: Callable[[], None], *,
                 publisher: WorkerPublishing, guard: Guard | None = None,
                 max_pending_results: int = Settings.worker_max_pending_results,
                 unacked_max_age: float | None = None, limiter: Limiter | None = None,
                 events: EventDispatcher | None = None) -> None:
        """``max_pending_results``: no task starts while this many finished ones wait for
        the backend or the broker (the runner reports them: wire its ``on_waiting`` to
        :meth:`task_pending`). ``unacked_max_age``: see :mod:`aio_celery.worker.aging`
        (None: no sweep). ``publisher``: where parks go, and the declarations they need
        (a connection other than ``channel``'s). ``limiter``: the rate limits (None: off,
        ``worker_disable_rate_limits``). ``events``: where task-received and task-rejected
        go (none: a dispatcher that is off)."""
        self.channel = channel
        self.publisher = publisher
        guard = guard or Guard(defaults.MAX_TASK_DEATHS)
        self._guard = guard
        self._limiter = limiter
        self._seat = guard.seat
        self.runner = runner
        self.events = events if events is not None else EventDispatcher(
            options.hostname, None, stats)
        self.options = options
        self.stats = stats
        self._on_task_done = on_task_done
        self.prefetch_count = channel.prefetch_count
        self._free_slots = options.concurrency
        #: every delivery's ack, reject or return, written in order (see acks.Acks)
        self.acks = Acks(channel)
        self._ready: collections.deque[_Job] = collections.deque()
        self._waiting: dict[asyncio.Task[None], _Job] = {}  # etas not due yet, or parking
        self._running: dict[asyncio.Task[None], _Job] = {}
        self._alone: asyncio.Task[None] | None = None  # an isolated task is running
        self._state = State.RUNNING
        #: etas and rate waits in memory (and parks being retried): each takes a place in
        #: the prefetch window, so at most _eta_room of them, leaving ``concurrency`` places
        self._eta_places_taken = 0
        self._eta_room = max(0, self.prefetch_count - options.concurrency)
        #: queues bound to native delayed delivery: parked there, not in holding queues
        self._native_queues: set[str] = set()
        self._outcome = StopOutcome()
        #: given back while the consumers are still attached (STOPPING), the broker would
        #: hand these straight back: kept until stop() has cancelled the consumers
        self._give_back_when_detached: list[int] = []
        #: holding queues the broker refused to declare: their etas wait in memory
        self._refused_holding_queues: set[str] = set()
        #: finished tasks waiting for the backend or broker, and how many may wait
        self._pending = 0
        self._max_pending = max(1, max_pending_results)
        self._max_age = unacked_max_age
        self._sweeper: asyncio.Task[None] | None = None
        #: when deliveries were paused, kept undecoded (None: they are not paused)
        self._paused_since: float | None = None
        #: the stamp of deliveries handed over since a resume, until the next sweep: they
        #: may have waited undecoded since then
        self._stamp_floor: float | None = None
        #: the sweep resumed deliveries paused too long: none is paused until the next
        #: sweep (see _sweep)
        self._pausing_suspended = False
        #: task_rejected signals being sent (only while someone listens)
        self._announcing: set[asyncio.Task[None]] = set()

    @property
    def state(self) -> State:
        return self._state

    def _enter(self, state: State) -> None:
        """The one place the lifecycle moves (forward only; see :class:`State`)."""
        if state not in _TRANSITIONS[self._state]:
            raise RuntimeError(f"session: no transition from {self._state.name} to "
                               f"{state.name}")
        self._state = state

    def _advance(self, state: State) -> None:
        """Enter ``state`` unless the session is already there or beyond (a drain after a
        cold stop, a stop after a lost connection)."""
        if self._state < state:
            self._enter(state)

    # --- start and state -----------------------------------------------------------------

    async def start(self, queues: tuple[str, ...],
                    before_consume: Callable[[], None] = lambda: None) -> None:
        """Connect, declare, consume. ``before_consume`` is called just before the first
        basic.consume: from then on a delivery (a task that may block the loop) can come."""
        await self.channel.open()
        for queue in queues:
            await self.channel.declare(queue)
        if self.channel.plan.quorum_mode:
            await self._bind_delayed_delivery(queues)
        before_consume()
        for queue in queues:
            await self.channel.consume(queue, self._receiver(queue))
        if self._max_age is not None:
            self._sweeper = asyncio.create_task(self._sweep_forever(self._max_age),
                                                name="unacked max age sweep")

    async def add_queue(self, queue: str) -> None:
        """Declare and consume one more queue (remote control's ``add_consumer``)."""
        await self.channel.declare(queue)
        if self.channel.plan.quorum_mode:
            await self._bind_delayed_delivery((queue,))
        await self.channel.consume(queue, self._receiver(queue))

    async def cancel_queue(self, queue: str) -> None:
        await self.channel.cancel_queue(queue)

    async def _bind_delayed_delivery(self, queues: tuple[str, ...]) -> None:
        """Quorum mode: declare Celery's ``celery_delayed_*`` topology and bind each queue
        whose exchange is not direct, as a Celery worker does at every start (else a Celery
        client's countdown tasks for it would be dropped, unroutable). Declared again by
        every session: one deleted meanwhile would make every park a channel error. A
        refusal is logged: etas then wait here or in holding queues (any other
        BrokerConnectionError fails the session, which is retried)."""
        broker = self.publisher
        native = tuple(queue for queue in queues if broker.delays_natively(queue))
        for queue in set(queues) - set(native):
            logger.warning("Queue %s has a direct exchange: native delayed delivery cannot "
                           "reach it (Celery's clients then send countdown/eta tasks to it "
                           "directly; this worker keeps them in memory or in a holding "
                           "queue). Set task_default_exchange_type (or "
                           "task_create_missing_queue_exchange_type) to 'topic'.", queue)
        if not native:
            return
        try:
            await broker.declare_delayed_delivery(native)
        except DelayedDeliveryRefused as exc:
            logger.error("%s. Countdown/eta tasks that Celery clients send to %s through "
                         "native delayed delivery may be dropped; this worker parks its etas "
                         "in holding queues instead.", exc, ", ".join(native))
            return
        self._native_queues.update(native)

    @property
    def consumer_count(self) -> int:
        return self.channel.consumer_count

    @property
    def in_flight(self) -> int:
        return len(self._ready) + len(self._waiting) + len(self._running)

    @property
    def running(self) -> int:
        """Tasks started and not settled (finished ones waiting for the backend too)."""
        return len(self._running)

    @property
    def prefetched(self) -> int:
        """Deliveries not started: waiting for a slot, their eta or their rate limit, or
        being parked."""
        return len(self._ready) + len(self._waiting)

    @property
    def ready(self) -> int:
        """Deliveries ready to run, waiting for a free slot."""
        return len(self._ready)

    @property
    def free_slots(self) -> int:
        """Slots of ``concurrency`` free now (a task whose result waits gives its up)."""
        return self._free_slots

    @property
    def pending_results(self) -> int:
        """Finished tasks waiting for the result backend or the broker (their follow-ups);
        none starts while ``worker_max_pending_results`` wait."""
        return self._pending

    @property
    def outcome(self) -> StopOutcome:
        """How many deliveries were given back unstarted and tasks cancelled, so far."""
        return dataclasses.replace(self._outcome)

    @property
    def active(self) -> int:
        """Tasks running (not counting finished ones that wait for the backend)."""
        return len(self._running) - self._pending

    @property
    def busy(self) -> bool:
        return bool(self._ready or self._waiting or self._running or len(self.acks))

    async def message_count(self, queue: str) -> int:
        return await self.channel.message_count(queue)

    async def lost(self) -> str:
        """Return why, once the connection or channel closes (for whatever reason)."""
        try:
            return await self.channel.closed()
        except Exception as exc:
            return describe_error(exc)

    def running_tasks(self) -> set[asyncio.Task[None]]:
        return set(self._running)

    def reserved(self) -> list[tuple[protocol.TaskMessage, dict[str, Any]]]:
        """Messages received and due, waiting for a slot (``inspect reserved``)."""
        return [(job.message, job.delivery_info) for job in self._ready]

    def scheduled(self) -> list[tuple[protocol.TaskMessage, dict[str, Any]]]:
        """Messages whose eta is still to come, waiting here (``inspect scheduled``)."""
        return [(job.message, job.delivery_info) for job in self._waiting.values()
                if job.eta_place and job.message.eta is not None]

    # --- deliveries ----------------------------------------------------------------------

    def _receiver(self, queue: str) -> Callable[[Delivery], None]:
        def on_message(raw: Delivery) -> None:
            self._receive(queue, raw)

        return on_message

    def _receive(self, queue: str, raw: Delivery) -> None:
        deliver = raw.deliver
        tag = deliver.delivery_tag
        self.acks.delivered(tag)
        if self._state >= _STOPPING:
            self._outcome.returned += 1
            self._give_back_when_stopped(tag)
            return
        props = raw.properties
        try:
            if props is None:
                raise MessageDecodeError(f"unreadable AMQP properties: {raw.problem}", raw.body)
            message = protocol.decode(raw.body, props.headers, props.content_type,
                                      props.content_encoding, props.priority, props.reply_to)
        except Exception as exc:  # MessageDecodeError, or a decoder bug: never leave it unsettled
            if not isinstance(exc, MessageDecodeError):
                exc = MessageDecodeError(f"undecodable: {exc!r}", raw.body)
            self.stats.rejected += 1
            self.runner.metrics.task_done(metrics.UNKNOWN_TASK, metrics.REJECTED, None)
            logger.error("Rejected a message from queue %s without requeue: %s. It is not a "
                         "Celery protocol v2 JSON task; a dead-letter exchange on the queue "
                         "would keep it for inspection.", queue, exc.summary())
            self.acks.settle(tag, Settle.REJECT)
            self._announce_rejected(raw, exc)
            return
        # Celery's keys, plus the queue it was consumed from (a retry goes back there).
        delivery_info = {"exchange": deliver.exchange, "routing_key": deliver.routing_key,
                         "priority": message.priority, "redelivered": deliver.redelivered,
                         "queue": queue}
        floor = self._stamp_floor
        job = _Job(queue, message, tag, delivery_info,
                   time.monotonic() if floor is None else floor)
        if self.events.tasks_on:
            self.events.task("task-received", wire_events.received_fields(message))
        if deliver.redelivered and self._judge(job, props.headers):
            self._wait(job, self._await_count(job, raw, props.headers), "suspect")
            return
        self._admit(job, raw)

    def _announce_rejected(self, raw: Delivery, exc: MessageDecodeError) -> None:
        """Celery's ``task_rejected`` signal, which its consumer sends for a message it
        cannot read: ``message`` is the delivery, ``exc`` why it was refused. Nothing is
        scheduled while nobody listens, the usual case."""
        if not signals.task_rejected.receivers:
            return
        task = asyncio.create_task(
            signals.task_rejected.send(sender=self, message=raw, exc=exc))
        self._announcing.add(task)
        task.add_done_callback(self._announcing.discard)

    def _admit(self, job: _Job, raw: Delivery) -> None:
        """A decoded message joins the ready queue, or waits for its eta; a revoked one is
        acknowledged (it is checked again when it comes to run)."""
        message = job.message
        if self.runner.is_revoked(message.id):
            self._wait(job, self._discard_revoked(job), "revoked")
            return
        delay = 0.0 if message.eta is None else \
            (message.eta - self.runner.app.now()).total_seconds()
        if delay <= 0:
            line = self._rate_line(job)
            if line is not None and not line.try_now():
                self._wait_for_rate(job, raw, line)
                return
            self._ready.append(job)
            self._start_ready()
            if len(self._ready) >= _PAUSE_AT:
                self._pause_deliveries()
        elif delay > self.options.eta_horizon or self._eta_places_taken >= self._eta_room:
            self._wait(job, self._park(job, raw), "park")
        else:  # the wire bytes are not kept while it waits: only parking needs them
            self._take_eta_place(job)  # now: the next delivery of this read must see it
            self._wait(job, self._wait_until_due(job, delay), "eta")

    def _rate_line(self, job: _Job) -> Line | None:
        """The line of a rate-limited task (None: it is not; nor is a message the poison
        guard retires: it does not run)."""
        if self._limiter is None or job.verdict is Verdict.RETIRE:
            return None
        return self._limiter.line(job.message.task)

    def _wait_for_rate(self, job: _Job, raw: Delivery, line: Line) -> None:
        """Wait here (counted with the etas) if the window has room and the token comes
        within the eta horizon (so the aging sweep does not give it back), or if it comes
        too soon for a park to help; else park it until about then."""
        expected = line.expected_wait()
        if expected < RATE_PARK_MIN or (self._eta_places_taken < self._eta_room
                                        and expected <= self.options.eta_horizon):
            self._take_eta_place(job)  # now: the next delivery of this read must see it
            self._wait(job, self._wait_for_token(job, line), "rate")
        else:
            job.rate_until = time.monotonic() + expected
            self._wait(job, self._park(job, raw), "park")

    async def _wait_for_token(self, job: _Job, line: Line) -> None:
        """Wait for the token without a slot, then join the ready queue."""
        self._take_eta_place(job)
        await line.wait_turn()
        self._free_eta_place(job)
        self._ready.append(job)
        self._start_ready()

    def _judge(self, job: _Job, headers: dict[str, Any] | None,
               count_pending: bool = True) -> bool:
        """The poison guard's verdict on a redelivered message; True if it must wait for
        a dead sibling's death to be counted first."""
        verdict = self._guard.verdict(job.message.id, headers, count_pending)
        if verdict is Verdict.WAIT:
            return True
        job.verdict = verdict
        if verdict is not Verdict.RUN:
            job.deaths = self._guard.deaths(job.message.id, headers)
        return False

    async def _await_count(self, job: _Job, raw: Delivery,
                           headers: dict[str, Any] | None) -> None:
        deadline = asyncio.get_running_loop().time() + _COUNT_WAIT
        while self._judge(job, headers):
            if asyncio.get_running_loop().time() > deadline:
                logger.warning("Task %s[%s] was redelivered while another worker process "
                               "still shows it running: running it anyway",
                               job.message.task, job.message.id)
                self._judge(job, headers, count_pending=False)
                break
            await asyncio.sleep(_COUNT_POLL)
        self._admit(job, raw)

    def _wait(self, job: _Job, coro: Coroutine[Any, Any, None], what: str) -> None:
        task = asyncio.create_task(coro, name=f"{what} {job.message.task}[{job.message.id}]")
        self._waiting[task] = job
        task.add_done_callback(self._wait_done)

    def _wait_done(self, task: asyncio.Task[None]) -> None:
        job = self._waiting.pop(task)
        self._free_eta_place(job)  # (a task cancelled before it started ran no finally)
        if task.cancelled():  # a stop, a lost connection or its age: the message goes back
            if not job.aged:
                self._outcome.returned += 1
            self._give_back_when_stopped(job.tag)

    def _start_ready(self) -> None:
        """Start ready jobs while there are free slots (none once a stop was requested, nor
        while ``worker_max_pending_results`` finished tasks wait)."""
        ready = self._ready
        while (ready and self._free_slots and self._pending < self._max_pending
               and self._state is _RUNNING and self._alone is None):
            job = ready.popleft()
            isolated = job.verdict is Verdict.ISOLATE
            if isolated and len(self._running) > self._pending:
                ready.appendleft(job)  # it starts once the running tasks are done
                break
            self._free_slots -= 1
            self.stats.started += 1
            task = asyncio.create_task(self._run(job),
                                       name=f"{job.message.task}[{job.message.id}]")
            self._running[task] = job
            task.add_done_callback(self._run_done)
            if isolated:  # nothing else starts while it runs: a death blames it alone
                self._alone = task
        if len(ready) <= _RESUME_AT:
            if self._paused_since is not None:
                self._note_resumed()
            self.channel.resume_deliveries()

    def _return_ready(self) -> None:
        """Give back every message that has not started."""
        while self._ready:
            self._outcome.returned += 1
            self._give_back(self._ready.popleft().tag)

    async def _run(self, job: _Job) -> None:
        message = job.message
        rejected = False  # by us, not by the runner (which announced its own)
        recorder = self.runner.metrics
        if recorder.enabled:  # one test on the hot path while metrics are off
            recorder.task_started(self.runner.label(message.task), job.arrived, message.eta,
                                  self.runner.app.now)
        try:
            if job.verdict is Verdict.RETIRE:
                settle = await self.runner.retire(message, job.delivery_info, job.deaths)
            elif self.runner.acks_early(message):
                self.acks.settle(job.tag, Settle.ACK)
                job.acked = True
                settle = await self.runner.run(message, job.delivery_info)
            else:
                if self._seat is not None:  # the supervisor learns what ran if we die
                    job.board_slot = self._seat.started(message.id)
                settle = await self.runner.run(message, job.delivery_info)
        except Exception:
            # A bug of ours (task errors are handled by the runner). Requeue once; a
            # message that fails like this again is rejected rather than looped.
            settle = Settle.REJECT if job.delivery_info["redelivered"] else Settle.REQUEUE
            rejected = True
            recorder.task_done(self.runner.label(message.task), metrics.INTERNAL_ERROR, None)
            logger.exception("Internal error while handling task %s[%s]: message %s",
                             message.task, message.id,
                             "rejected" if settle is Settle.REJECT else "requeued once")
        finally:
            self._off_the_board(job)
        if not job.acked:
            self.acks.settle(job.tag, settle)
            if rejected and self.events.tasks_on:
                self.events.task("task-rejected", wire_events.rejected_fields(
                    message.id, requeue=settle is Settle.REQUEUE))
        self.stats.finished += 1
        self._on_task_done()  # may request a stop (max tasks): before the next one starts

    def _run_done(self, task: asyncio.Task[None]) -> None:
        job = self._running.pop(task)
        if job.pending:
            self._pending -= 1
        else:
            self._free_slots += 1
        if task is self._alone:
            self._alone = None
        if task.cancelled():  # a stop or a lost connection: the message goes back
            self._outcome.cancelled += 1
            if not job.acked:
                self._give_back_when_stopped(job.tag)
        self._start_ready()  # nothing starts once a stop was requested

    def _off_the_board(self, job: _Job) -> None:
        if job.board_slot >= 0 and self._seat is not None:
            self._seat.finished(job.board_slot)
            job.board_slot = -1

    def task_pending(self) -> None:
        """The running task is over but waits for the backend or the broker: its slot is
        free for the next one, unless too many wait already."""
        job = self._running.get(asyncio.current_task())  # type: ignore[arg-type]
        if job is None or job.pending:
            return
        job.pending = True
        self._off_the_board(job)  # its body is over: a death from now on is not its fault
        if self._alone is asyncio.current_task():
            self._alone = None  # an isolated task that only waits keeps nothing back
        self._pending += 1
        self._free_slots += 1
        if self._pending == self._max_pending:
            logger.warning("%d finished tasks wait for the result backend or the broker "
                           "(worker_max_pending_results): no new task starts until they are "
                           "recorded", self._pending)
        self._start_ready()

    async def _discard_revoked(self, job: _Job) -> None:
        settle = await self.runner.skip_revoked(job.message)
        self.acks.settle(job.tag, settle)

    async def _wait_until_due(self, job: _Job, delay: float) -> None:
        """An eta with room in the prefetch window: wait without a slot, then join the
        ready queue."""
        self._take_eta_place(job)
        await asyncio.sleep(delay)
        line = self._rate_line(job)
        if line is not None and not line.try_now():
            await line.wait_turn()  # in the place it takes in the window
        self._free_eta_place(job)
        self._ready.append(job)
        self._start_ready()

    async def _park(self, job: _Job, raw: Delivery) -> None:
        """An eta that does not wait here: republish it (see :meth:`_parking`), then ack it.

        A park that fails (nacked, returned, no connection) keeps the message unacked here
        (taking an eta place, like an eta waiting in memory) and is tried again with backoff,
        never given back to the queue at once (the broker would hand it straight back, to
        be parked again, in a loop); one due before the next try waits here instead. A
        holding queue the broker refuses to declare is reported once; its messages then
        wait here, in memory, like nearer etas.
        """
        backoff = Backoff(PARK_FIRST_RETRY, PARK_MAX_RETRY)
        try:
            while True:
                parking = self._parking(job)
                if parking.routing_key in self._refused_holding_queues:
                    await self._wait_in_memory(job, parking.routing_key)
                    return
                try:
                    await self._park_once(job, raw, parking)
                except HoldingQueueRefused as exc:
                    self._holding_queue_refused(parking.routing_key, exc)
                    continue
                except Exception as exc:
                    remaining = self._until_due(job)
                    retry_in = backoff.next()
                    if remaining <= retry_in:
                        await self._wait_until_due(job, remaining)
                        return
                    self._take_eta_place(job)
                    logger.warning("Task %s[%s] could not be parked in %s (%s): it stays "
                                   "here, unacknowledged, and parking is tried again in %.0fs",
                                   job.message.task, job.message.id, parking.where,
                                   describe_error(exc), retry_in)
                    await asyncio.sleep(retry_in)
                    continue
                logger.info("Task %s[%s] %s %.0fs: parked in %s", job.message.task,
                            job.message.id, "waits for its rate limit for about"
                            if job.rate_until else "is due in", self._until_due(job),
                            parking.where)
                return
        finally:
            self._free_eta_place(job)

    def _take_eta_place(self, job: _Job) -> None:
        if not job.eta_place:
            job.eta_place = True
            self._eta_places_taken += 1

    def _free_eta_place(self, job: _Job) -> None:
        if job.eta_place:
            job.eta_place = False
            self._eta_places_taken -= 1

    def _parking(self, job: _Job) -> _Parking:
        """Native delayed delivery for a queue bound to it (rounded up to whole seconds),
        else the holding queue of :func:`holding_ttl`."""
        remaining = self._until_due(job)
        if job.queue in self._native_queues:
            countdown = park_countdown(remaining)
            return _Parking(FIRST_DELAY_EXCHANGE, delayed_routing_key(countdown, job.queue),
                            None, f"native delayed delivery for {countdown}s")
        ttl = holding_ttl(remaining, self.options.eta_horizon)
        name = wait_queue_name(job.queue, ttl)
        return _Parking("", name, ttl, f"{name} (handed back every {ttl:.0f}s until due)")

    async def _park_once(self, job: _Job, raw: Delivery, parking: _Parking) -> None:
        """Publish the copy and, once the broker confirmed it, ack the original."""
        # Declared every time (parking is rare): a holding queue deleted meanwhile would
        # otherwise swallow the copy, unroutable, while the original is acked.
        publish = asyncio.ensure_future(self._publish_parked(raw, job.queue, parking))
        try:
            await publish
        except asyncio.CancelledError:
            if not publish.cancelled() and publish.exception() is None:
                self.acks.settle(job.tag, Settle.ACK)  # confirmed just before the cancel
                return
            raise
        self.acks.settle(job.tag, Settle.ACK)  # the copy in the holding queue counts now

    async def _publish_parked(self, raw: Delivery, queue: str, parking: _Parking) -> None:
        if raw.properties is None:  # _receive rejects such a delivery: it is never parked
            raise RuntimeError("parking a delivery whose properties could not be read")
        if parking.ttl is not None:
            # Declared on the publishing connection: a refusal closes that one, never the
            # connection these deliveries came on (that would be a reconnect, a
            # redelivery, a park, a refusal... a loop). The refusal is remembered
            # (_holding_queue_refused), so it is not declared again.
            await self.publisher.declare_holding_queue(
                parking.routing_key, queue, horizon_ms(parking.ttl))
        # mandatory: a copy that no queue took (Returned) is not parked
        await self.publisher.publish_raw(raw.body, raw.properties.encoded,
                                         parking.routing_key, parking.exchange)

    def _holding_queue_refused(self, name: str, exc: Exception) -> None:
        if name in self._refused_holding_queues:  # two parks were under way at once
            return
        self._refused_holding_queues.add(name)
        logger.error("%s. Tasks parked there now wait in this worker's memory instead, "
                     "unacknowledged (ready tasks may wait behind them): they go back to the "
                     "queue and come again every worker_unacked_max_age until due, so that "
                     "RabbitMQ's consumer_timeout does not close the channel. Let the "
                     "worker's user configure queues named like %r.", exc, name)

    async def _wait_in_memory(self, job: _Job, name: str) -> None:
        remaining = self._until_due(job)
        logger.warning("Task %s[%s] is due in %.0fs: it waits in memory (the holding queue %s "
                       "was refused, see above)", job.message.task, job.message.id,
                       remaining, name)
        await self._wait_until_due(job, remaining)

    def _until_due(self, job: _Job) -> float:
        """Seconds until its eta, or until its token (a rate-limited message parked)."""
        rate = job.rate_until - time.monotonic()
        eta = job.message.eta
        if eta is None:
            return max(0.0, rate)
        return max(0.0, rate, (eta - self.runner.app.now()).total_seconds())

    # --- aging: RabbitMQ's consumer_timeout (see aging) ----------------------------------

    def _pause_deliveries(self) -> None:
        """Keep deliveries back (undecoded, unstamped) from now on: they arrive after this
        moment (the socket is read without pause until then)."""
        if self._pausing_suspended:
            return
        if self._paused_since is None:
            self._paused_since = time.monotonic()
        self.channel.pause_deliveries()

    def _note_resumed(self) -> None:
        """Paused deliveries are handed over from now on: stamped with the pause's start
        until the next sweep (they arrived after it, they may be that old)."""
        self._stamp_floor = self._paused_since
        self._paused_since = None

    async def _sweep_forever(self, max_age: float) -> None:
        period = aging.sweep_period(max_age)
        while True:
            await asyncio.sleep(period)
            try:
                self._sweep(max_age, period)
            except Exception:  # a bug of ours: the next sweep must still come
                logger.exception("The unacked max age sweep failed")

    def _sweep(self, max_age: float, period: float) -> None:
        """Give back what waited unstarted for ``max_age - period`` or longer (the next
        sweep would come too late); warn once about each task running that long."""
        now = time.monotonic()
        cutoff = now - (max_age - period)
        self._stamp_floor = None  # stamps are exact again, unless released below
        self._pausing_suspended = False
        if self._state is not _RUNNING:
            return  # stop() gives back everything that has not started
        returned, etas = self._give_back_aged(cutoff)
        for job in self._running.values():
            if job.arrived <= cutoff and not job.aged and not job.acked:
                job.aged = True
                warn = aging.warn_pending if job.pending else aging.warn_running
                warn(job.message.task, job.message.id, job.queue, now - job.arrived, max_age)
        paused = self._paused_since
        if paused is not None and paused <= cutoff + period:
            # What is kept back would be past the cut-off at the next sweep: all of it is
            # decoded now, stamped with the pause's start, and given back then. Not paused
            # again until then: what is still in the socket is as old.
            self._note_resumed()
            self._pausing_suspended = True
            self.channel.resume_deliveries()
        if returned:
            aging.log_returned(returned, etas, max_age, len(self._running),
                               self.options.concurrency)

    def _give_back_aged(self, cutoff: float) -> tuple[int, int]:
        """Give back the jobs that arrived by ``cutoff`` and have not started; returns how
        many, and how many of them were waiting (for their eta)."""
        aged = aging.take_aged(self._ready, cutoff)
        for job in aged:
            self._give_back(job.tag)
        waiting = [task for task, job in self._waiting.items()
                   if job.arrived <= cutoff and not job.aged]
        for task in waiting:  # its done callback gives it back
            self._waiting[task].aged = True
            task.cancel()
        return len(aged) + len(waiting), len(waiting)

    # --- settlement ----------------------------------------------------------------------

    def _give_back(self, tag: int) -> None:
        self.acks.settle(tag, Settle.REQUEUE)

    def _give_back_when_stopped(self, tag: int) -> None:
        """Give back now, or once stop() has cancelled the consumers if they may still be
        attached: given back before, the broker would hand the message straight back."""
        if self._state is _STOPPING:
            self._give_back_when_detached.append(tag)
        else:
            self._give_back(tag)

    # --- stopping ------------------------------------------------------------------------

    def drain(self) -> None:
        """A stop was requested: start no more tasks (running ones carry on). New
        deliveries are still taken (and wait) until the consumers are cancelled, or they
        would bounce straight back."""
        self._advance(State.DRAINING)

    def go_cold(self) -> None:
        """Cancel everything now (from a signal handler: no awaiting here). Messages are
        given back by :meth:`stop`, once the consumers are cancelled: given back now, the
        broker would hand them straight back."""
        self._advance(State.STOPPING)
        for task in (*self._waiting, *self._running):
            task.cancel()

    async def stop(self, timeout: float, cold: bool) -> StopOutcome:
        """Stop consuming, give back what has not started, let running tasks finish for up to
        ``timeout`` seconds (none when cold), cancel the rest, settle all, close."""
        self._advance(State.STOPPING)
        with contextlib.suppress(*_CHANNEL_GONE):
            await self.channel.cancel_consumers()
        self._advance(State.DETACHED)
        for tag in self._give_back_when_detached:
            self._give_back(tag)
        self._give_back_when_detached.clear()
        # paused deliveries are handed over, and given back at once
        self.channel.resume_deliveries()
        self._return_ready()
        for task in list(self._waiting):
            task.cancel()
        if self._running and not cold:
            logger.info("Waiting up to %.0fs for %d running task(s) to finish (%d of them "
                        "finished, waiting for the result backend or the broker)", timeout,
                        len(self._running), self._pending)
            await asyncio.wait(set(self._running), timeout=timeout)
        if self._running:
            logger.warning("Cancelling %d task(s) still running: their messages go back to "
                           "the queue", len(self._running))
        for task in list(self._running):
            task.cancel()
        pending = {*self._waiting, *self._running}
        if pending:
            await asyncio.wait(pending)
        self._return_ready()  # an eta that fell due while we waited
        await self.acks.settle_everything()
        await self.close()
        return self._outcome

    async def abandon(self) -> None:
        """The connection is gone: cancel every task (RabbitMQ requeues their messages)."""
        self._advance(State.STOPPING)
        self._ready.clear()
        pending = {*self._waiting, *self._running}
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)
        await self.close()

    async def close(self) -> None:
        self._advance(State.CLOSED)
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._announcing:
            await asyncio.wait(set(self._announcing))
        await self.channel.close()


