"""`orchestrator bridge`: Kafka events in, engine starts and events out.

A workflow declares the topics it consumes, each with a handler classmethod:

    class RouteContent(Workflow):
        kafka_consumes = {"route.confirmed": "on_route_confirmed"}
        kafka_produces = ("story.generate",)

        @classmethod
        def on_route_confirmed(cls, engine, event: KafkaEvent) -> str: ...

The handler validates the payload with the topic's model from the workflow's `kafka_schemas`
(`orchestrator.schemas.parse`: InvalidInput naming the field's dotted path) and makes exactly one
engine call (start or fire). Delivery is at least once, the effect exactly once:

- the event's id (header `event_id`, else partition:offset@timestamp, see `event_id`) is written to
  `processed_messages` in the same transaction as the effect (a session hook, see `_Delivery`),
  so a redelivered event finds it and does nothing, and two deliveries racing cannot both commit;
- the offset is committed only after that transaction committed (or the event was dead-lettered).

Events are applied in batches (`Bridge.handle_batch`, docs/kafka.md "Batches"): the events of one
poll in one transaction with their processed_messages rows, offsets committed once per batch
after it; an event that cannot be applied cleanly is handled alone after the batch.

Outcomes: `accepted`; `duplicate`; `ignored` (the workflow refused it: a late or repeated report,
logged and counted); `dead_letter` (broken JSON, a missing or mistyped field, an unknown route:
the original bytes go to `<topic>.dlq` with the reason in the headers). A database outage is
waited out with backoff and never dead-letters a good event; a handler that keeps raising
something else on one event dead-letters it after a few attempts, so one event cannot stop the
partition.
"""
from __future__ import annotations

import contextvars
import json
import logging
import threading
import time
from collections import Counter as Tally
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

from prometheus_client import Counter, Gauge, Histogram
from sqlalchemy import event as sa_event
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError, InterfaceError, OperationalError

from . import logs, metrics, tracing
from .errors import Conflict, IllegalTransition, InvalidInput, NotFound
from .jsonutil import loads, unstorable
from .kafka_events import EVENT_ID_MAX, Ignored, KafkaEvent, event_id_problem  # noqa: F401 (EVENT_ID_MAX re-exported)
from .models import ProcessedMessage, utcnow
from .schemas import identifier_problem, is_blank

log = logging.getLogger(__name__)

KAFKA_CONSUMER_LAG = Gauge("kafka_consumer_lag", "Messages behind the high watermark, per partition "
                           "(approximate on brokers whose watermark is approximate)",
                           ["group", "topic", "partition"], multiprocess_mode="livemax")
KAFKA_EVENTS = Counter("orchestrator_kafka_events_total", "Kafka events handled by the bridge",
                       ["topic", "outcome"])
KAFKA_DEAD_LETTERS = Counter("orchestrator_kafka_dead_letters_total",
                             "Events sent to the dead-letter topic", ["topic", "reason"])
KAFKA_HANDLE_SECONDS = Histogram("orchestrator_kafka_handle_seconds", "Time to handle one event", ["topic"])


#: The largest dead letter the bridge produces (the broker may take less: see `dead_letter`).
DLQ_MAX_BYTES = 64 * 1024 * 1024
#: What is kept of an event the dead-letter topic refuses as too large.
DLQ_TRUNCATE = 64 * 1024


class _Waiting(Exception):
    """What the bridge waits for before it can consume (the database, the broker)."""


class _Retry(Exception):
    """The batch must be rolled back and its events handled one by one."""


Handler = Callable[[Any, KafkaEvent], str]


# -- routes ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Route:
    topic: str
    workflow: type
    handler: Handler


def discover(registry: Any) -> dict[str, Route]:
    """Topic -> handler, from the registered workflows' `kafka_consumes` tables."""
    routes: dict[str, Route] = {}
    for name in registry.names():
        cls = registry.get(name)
        for topic, method in (getattr(cls, "kafka_consumes", None) or {}).items():
            if topic in routes:
                raise ValueError(f"topic {topic} is consumed by both {routes[topic].workflow.type} and {cls.type}")
            routes[topic] = Route(topic, cls, getattr(cls, method))
    return routes


def produced_topics(registry: Any) -> list[str]:
    out: list[str] = []
    for name in registry.names():
        out += list(getattr(registry.get(name), "kafka_produces", ()) or ())
    return out


def all_topics(registry: Any) -> list[str]:
    consumed = list(discover(registry))
    return list(dict.fromkeys(consumed + [f"{t}.dlq" for t in consumed] + produced_topics(registry)))


# -- de-duplication in the effect's transaction ------------------------------------------------
@dataclass
class _Delivery:
    consumer: str
    message_id: str
    recorded: bool = False


_current_delivery: contextvars.ContextVar[_Delivery | None] = contextvars.ContextVar("kafka_delivery", default=None)


def install_dedup(sessions: Any) -> None:
    """Every transaction committed while an event is handled also inserts its processed_messages
    row (once): the effect and the de-duplication record commit together or not at all."""

    @sa_event.listens_for(sessions, "before_commit")
    def _record(session: Any) -> None:
        d = _current_delivery.get()
        if d is None or d.recorded or "kafka_delivery" in session.info:
            return
        session.add(ProcessedMessage(consumer=d.consumer, message_id=d.message_id))
        session.flush()
        session.info["kafka_delivery"] = d

    @sa_event.listens_for(sessions, "after_commit")
    def _committed(session: Any) -> None:
        d = session.info.pop("kafka_delivery", None)
        if d is not None:
            d.recorded = True

    @sa_event.listens_for(sessions, "after_rollback")
    def _rolled_back(session: Any) -> None:
        session.info.pop("kafka_delivery", None)


@dataclass
class _Prepared:
    """Events applied in a batch not committed yet (Bridge._prepare); Bridge._finish commits it.

    `msgs` is the prefix of the events given that it covers (the rest go in the next batch);
    `ready` the parsed ones (by position n); `done` their outcomes so far; `later` the events to
    handle alone after the commit; `batch` None when every event is handled alone (the batch
    failed, or the database could not be asked what was already handled); `ids` the (topic,
    event id) of its parsed events."""

    msgs: list[Any]
    batch: Any = None
    ready: list[tuple[Any, KafkaEvent]] = field(default_factory=list)
    done: dict[int, tuple[str, str, float]] = field(default_factory=dict)
    later: list[Any] = field(default_factory=list)
    ids: set[tuple[str, str]] = field(default_factory=set)

    def discard(self) -> None:
        if self.batch is not None:
            self.batch.rollback()


def _ids(ready: list[tuple[Any, KafkaEvent]]) -> set[tuple[str, str]]:
    return {(ev.topic, ev.event_id) for _, ev in ready}


class BadEventId(ValueError):
    """The `event_id` header cannot identify the event (not UTF-8, or too long): dead-lettered."""


def event_id(msg: Any) -> str:
    """The identity an event is de-duplicated by (within its topic), never repeated over time.

    The producer's `event_id` header when present (its promise: one id per event). Otherwise
    `<partition>:<offset>@<timestamp ms>`: an offset alone starts again at 0 in every life of a
    topic (deleted and re-created, a new cluster, the bundled broker restarted on a kept
    database), but the message timestamp (CreateTime from the producer's clock, or the broker's
    LogAppendTime) of a message in a later life is later than that of the message the previous
    life held at the same offset. A redelivery of one message carries the same timestamp. A
    broker too old to keep timestamps gives `@none` (offsets only again; docs/kafka.md).

    The header is taken exactly or not at all: raises BadEventId when it is not UTF-8 or not an
    id (`kafka_events.event_id_problem`: too long, blank, a hidden character inside), since
    replacing bad bytes or cutting it would make different events one."""
    for k, v in msg.headers() or []:
        if k == "event_id" and v:
            try:
                text = v.decode()
            except UnicodeDecodeError:
                raise BadEventId("headers.event_id: is not valid UTF-8") from None
            problem = event_id_problem(text)
            if problem is not None:
                raise BadEventId(f"headers.event_id: {problem}")
            return text
    return position_id(msg)


def position_id(msg: Any) -> str:
    """`<partition>:<offset>@<timestamp ms>`, the identity of an event without an `event_id`."""
    kind, ts = msg.timestamp()
    from confluent_kafka import TIMESTAMP_NOT_AVAILABLE

    return f"{msg.partition()}:{msg.offset()}@{ts if kind != TIMESTAMP_NOT_AVAILABLE else 'none'}"


def _recorded_id(msg: Any) -> str:
    """The id a dead letter is recorded under: its event id, or its position when that is bad."""
    try:
        return event_id(msg)
    except BadEventId:
        return position_id(msg)


def _correlation_problem(msg: Any) -> str | None:
    """Why the event's correlation id header (logs.HEADER, stored with the instances it starts, as
    HTTP's X-Correlation-ID is) cannot be taken: not UTF-8, or a hidden character inside."""
    raw = next((v for k, v in msg.headers() or [] if k == logs.HEADER), None)
    if not raw:
        return None
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        return "is not valid UTF-8"
    return None if is_blank(text) else identifier_problem(text.strip())  # stripped when taken


def _headers(msg: Any) -> dict[str, str]:
    return {k: (v or b"").decode(errors="replace") for k, v in (msg.headers() or [])}


# -- the consumer ------------------------------------------------------------------------------
class Bridge:
    def __init__(self, rt: Any, group: str | None = None, lag_interval: float = 5.0, max_attempts: int = 5,
                 batch_size: int = 500, batch_seconds: float = 0.5, max_wait: float = 10.0,
                 overlap: bool | None = None) -> None:
        from confluent_kafka import Consumer

        from .kafka import consumer_config

        self.rt = rt
        self.engine = rt.engine
        self.brokers = rt.settings.kafka_brokers
        if not self.brokers:
            raise ValueError("KAFKA_BROKERS is not set")
        self.group = group or rt.settings.consumer_group
        self.routes = discover(self.engine.registry)
        self.lag_interval = lag_interval
        self.max_attempts = max_attempts
        self.batch_size = batch_size
        self.batch_seconds = batch_seconds
        self.max_wait = max_wait
        install_dedup(rt.sessions)
        self.consumer = Consumer(consumer_config(self.brokers, self.group,
                                                 **{"statistics.interval.ms": int(lag_interval * 1000),
                                                    "stats_cb": self.export_lag, "error_cb": self._client_error,
                                                    "on_commit": self._committed,
                                                    # a topic re-created after a broker restart is seen soon
                                                    "topic.metadata.refresh.interval.ms": 10000}))
        from confluent_kafka import KafkaError

        self._lost_codes = {KafkaError._ALL_BROKERS_DOWN, KafkaError.UNKNOWN_TOPIC_OR_PART,
                            KafkaError._UNKNOWN_TOPIC}
        # as large as the broker takes: a dead letter carries the original bytes
        self.dlq = self._dlq_producer()
        self.pending: dict[tuple[str, int], int] = {}  # next offset to commit, per partition
        self.handled = 0
        self.assigned: set[tuple[str, int]] = set()
        self._lost = False  # set by the client's error callback: every broker is down
        # Commit a batch in a thread of its own while the next one is filled (PostgreSQL only:
        # on SQLite the next batch's BEGIN IMMEDIATE would wait for this one's write lock, and
        # this one's events handled alone for the next one's).
        self.overlap = self.engine.reads.dialect.name == "postgresql" if overlap is None else overlap
        self._committer = ThreadPoolExecutor(1, thread_name_prefix="bridge-commit") if self.overlap else None
        self._inflight: tuple[Future[int | None], _Prepared] | None = None
        self._stopped = False  # a committing batch was stopped before every event was handled
        self._recent_ids: set[tuple[str, str]] = set()  # of the batch that committed last
        self._error: BaseException | None = None  # raised in the committer thread

    def _client_error(self, err: Any) -> None:
        """librdkafka's client-level errors (not tied to a message): every broker down."""
        if err.code() in self._lost_codes:
            self._lost = True
            log.warning("kafka client error: %s", err)
        else:  # e.g. one failed connection attempt, which librdkafka retries by itself
            log.debug("kafka client error: %s", err)

    @staticmethod
    def _committed(err: Any, partitions: list[Any]) -> None:
        """The broker's answer to an offset commit sent without waiting (`commit`): a failure
        only means the events after the last committed offset are redelivered and de-duplicated."""
        failed = [p for p in partitions if p.error is not None]
        if err is not None or failed:
            log.warning("offset commit failed: %s", err or "; ".join(f"{p.topic}/{p.partition}: {p.error}"
                                                                   for p in failed))

    # partitions come and go when bridges join or leave the group
    def _on_assign(self, consumer: Any, partitions: list[Any]) -> None:
        self.assigned |= {(p.topic, p.partition) for p in partitions}
        log.info("assigned %s", sorted(self.assigned))

    def _on_revoke(self, consumer: Any, partitions: list[Any]) -> None:
        self._drain()
        self.commit(wait=True)  # hand over at the exact point we reached
        for p in partitions:
            self.assigned.discard((p.topic, p.partition))
            if metrics.multiprocess():  # prometheus_client cannot remove a shared sample: not behind any more
                KAFKA_CONSUMER_LAG.labels(self.group, p.topic, str(p.partition)).set(0)
                continue
            try:
                KAFKA_CONSUMER_LAG.remove(self.group, p.topic, str(p.partition))
            except KeyError:
                pass
        log.info("revoked %s", [(p.topic, p.partition) for p in partitions])

    def wait_until_ready(self, stop: threading.Event, what: str = "start") -> bool:
        """Wait until the database answers and the broker has every topic the bridge uses
        (created if missing), retrying with exponential backoff up to `max_wait` seconds
        between tries (tenacity) and logging what it waits for. False if stopped meanwhile."""
        import tenacity
        from sqlalchemy import text

        from .kafka import ensure_topics

        def check() -> None:
            try:
                with self.rt.db.connect() as conn:
                    conn.execute(text("SELECT 1"))
            except Exception as exc:
                raise _Waiting(f"the database ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from exc
            try:
                ensure_topics(self.brokers, all_topics(self.engine.registry), timeout=5.0)
            except Exception as exc:
                raise _Waiting(f"the Kafka broker at {self.brokers} ({exc})") from exc

        def waiting(state: Any) -> None:
            exc = state.outcome.exception()
            log.warning("bridge %s: waiting for %s; next try in %.1fs", what, exc, state.next_action.sleep)

        try:
            tenacity.Retrying(retry=tenacity.retry_if_exception_type(_Waiting),
                              wait=tenacity.wait_exponential(multiplier=0.5, max=self.max_wait),
                              stop=tenacity.stop_when_event_set(stop), sleep=stop.wait,
                              before_sleep=waiting, reraise=True)(check)
        except _Waiting:
            return False  # stopped while waiting
        if what != "start":
            log.info("bridge %s: the database and the Kafka broker answer again", what)
        return not stop.is_set()

    def run(self, stop: threading.Event) -> None:
        if not self.wait_until_ready(stop):
            self.consumer.close()
            log.info("bridge stopped before it started")
            return
        self.consumer.subscribe(sorted(self.routes), on_assign=self._on_assign, on_revoke=self._on_revoke)
        log.info("bridge in group %s consuming %s", self.group, ", ".join(sorted(self.routes)))
        try:
            while not stop.is_set():
                msgs = []
                lost = False
                # with a batch committing, take only what has arrived: when nothing has, its
                # offsets are committed as soon as it has (a topic deleted meanwhile must not get
                # them in its next life)
                for msg in self.consumer.consume(self.batch_size, 0 if self._inflight else 0.2):
                    if msg.error():
                        log.warning("consumer error: %s", msg.error())
                        lost = lost or msg.error().code() in self._lost_codes
                    else:
                        msgs.append(msg)
                lost, self._lost = lost or self._lost, False
                if not msgs and not self._drain():  # nothing new: the batch committing finishes first
                    break
                if lost and not msgs:  # the broker went away (or came back without our topics)
                    if not self.wait_until_ready(stop, "resume"):
                        break
                    continue
                if msgs and not self.handle_batch(msgs, stop):
                    break  # stopping: this batch's offsets stay uncommitted (redelivered, de-duplicated)
                self.commit()  # once per batch, after its transaction committed
        finally:
            self._drain()
            if self._committer is not None:
                self._committer.shutdown()
            self._leave()
            self.dlq.flush(10)
            log.info("bridge stopped after %d events", self.handled)
        if self._error is not None:
            raise self._error

    def _leave(self, timeout: float = 10.0) -> None:
        """Commit the last offsets and leave the group (the partitions go to the others at
        once), for at most `timeout` seconds: with no broker answering, librdkafka's close waits
        up to its socket timeout (a bridge waiting for a broker gone for an hour took 60 s to
        stop after SIGTERM). Past it, the offsets stay uncommitted: the events are redelivered
        and de-duplicated, and the group drops this member after its session timeout."""
        done = threading.Event()

        def leave() -> None:
            try:
                self.commit(wait=True)
                self.consumer.close()
            except Exception as exc:  # noqa: BLE001 - stopping either way
                log.warning("leaving the consumer group failed: %s", exc)
            finally:
                done.set()

        threading.Thread(target=leave, daemon=True, name="kafka-leave").start()
        if not done.wait(timeout):
            log.warning("the Kafka broker did not answer within %gs: stopping without committing the last "
                        "offsets (their events are redelivered and de-duplicated)", timeout)

    def commit(self, wait: bool = False) -> None:
        """Commit the offsets after the handled events: after every batch, on revoke and at
        stop. Events are handled (committed in the database) before their offset is, so a crash
        in between only means redelivery.

        `wait=False` (after a batch) sends the commit without waiting for the broker's answer
        (librdkafka sends a partition's commits in order; a failure is logged by `_committed`):
        the next batch's work overlaps the round trip. On revoke and stop the commit waits, so
        the next owner starts exactly where this one stopped."""
        if not self.pending:
            return
        from confluent_kafka import KafkaException, TopicPartition

        offsets = [TopicPartition(t, p, o) for (t, p), o in self.pending.items()]
        try:
            self.consumer.commit(offsets=offsets, asynchronous=not wait)
        except KafkaException as exc:  # e.g. mid-rebalance: the next owner re-reads and de-duplicates
            log.warning("offset commit failed: %s", exc)
        self.pending.clear()

    def _dlq_producer(self) -> Any:
        from confluent_kafka import Producer

        from .kafka import producer_config

        return Producer(producer_config(self.brokers, **{"message.max.bytes": DLQ_MAX_BYTES}))

    def export_lag(self, stats_json: str) -> None:
        """librdkafka's statistics (every `lag_interval`): lag per assigned partition, taken from
        its own fetch responses, so measuring never blocks the consumer."""
        try:
            stats = json.loads(stats_json)
            for topic, t in (stats.get("topics") or {}).items():
                for pid, p in (t.get("partitions") or {}).items():
                    if pid == "-1" or (topic, int(pid)) not in self.assigned:
                        continue
                    high, position = p.get("hi_offset", -1), p.get("committed_offset", -1)
                    if position < 0:
                        position = p.get("app_offset", -1)
                    if high >= 0:
                        lag = max(0, high - max(position, 0))
                        KAFKA_CONSUMER_LAG.labels(self.group, topic, pid).set(lag)
        except Exception as exc:  # a gauge is never a reason to stop consuming
            log.debug("lag not measured: %s", exc)

    def handle_with_retry(self, msg: Any, stop: threading.Event) -> str | None:
        """A database that cannot be reached is waited for, however long (the event is fine);
        any other error is retried `max_attempts` times, then the event is dead-lettered."""
        delay, attempt = 0.2, 0
        while True:
            attempt += 1
            try:
                return self.handle(msg)
            except (OperationalError, InterfaceError) as exc:
                log.warning("database unavailable handling %s/%s@%s (attempt %d): %s", msg.topic(),
                            msg.partition(), msg.offset(), attempt, str(exc).splitlines()[0])
            except Exception as exc:
                log.exception("event %s/%s@%s failed (attempt %d)", msg.topic(), msg.partition(), msg.offset(),
                              attempt)
                if attempt >= self.max_attempts:
                    return self.dead_letter(msg, f"handler error after {attempt} attempts: "
                                                 f"{type(exc).__name__}: {exc}"[:500], "handler_error")
            if stop.wait(delay):
                return None  # stopping: not committed, so it is redelivered to whoever owns it next
            delay = min(delay * 2, 5.0)

    # -- a batch of events -------------------------------------------------------------------
    def handle_batch(self, msgs: list[Any], stop: threading.Event) -> bool:
        """Apply a batch of events in one transaction (Engine.batch), with their
        processed_messages rows; False when stopping before every event was handled. The
        offsets of the events handled are committed after their transaction (`_handled`).

        An event that cannot be applied cleanly in the batch (bad bytes, a refused or unknown
        instance, anything raised) is set aside, with every later event of the same partition
        and key, and handled alone after the batch committed (dead-lettered alone, say): it
        never holds back or poisons the others. A database error, or a refusal raised after its
        handler had written, rolls the batch back and every event is handled alone.

        A transaction takes events for at most `batch_seconds`; the rest go in the next one, so
        its outbox rows are not older than the sweeper's grace period when it commits (else the
        sweeper would send them too).

        With `overlap` (PostgreSQL), a batch commits in the committer thread while the next one
        is filled, which mostly runs handlers that only add rows (starts) and so sends no
        statement. The next batch waits for the one committing to finish (its events handled
        alone included) before its first statement goes out, and is filled again when it
        repeats one of that batch's events, which it could not yet see as handled."""
        i = 0
        while i < len(msgs):
            rest = msgs[i:]
            if not self.overlap or len(rest) == 1:
                if not self._drain():
                    return False
                n = self._finish(self._prepare(rest), stop)
                if n is None:
                    return False
                self._handled(rest[:n])
                i += n
                continue
            overlapped = self._inflight is not None
            p = self._prepare(rest)
            if not self._drain():
                p.discard()
                return False
            repeats = len(p.ids & self._recent_ids) if overlapped else 0
            if repeats:  # filled again now that the database shows them handled
                log.info("batch of %d events filled again after the batch before committed: %d of its events "
                         "came again", len(p.msgs), repeats)
                p.discard()
                p = self._prepare(rest)
            self._inflight = (self._committer.submit(self._finish, p, stop), p)  # type: ignore[union-attr]
            i += len(p.msgs)
        return True

    def _drain(self) -> bool:
        """Wait for the batch committing in the committer thread (if any) and record its offsets
        as handled; False if it was stopped before every event was handled (and ever after)."""
        if self._inflight is not None:
            future, p = self._inflight
            self._inflight = None
            self._recent_ids = p.ids
            try:
                handled = future.result()
            except BaseException as exc:  # a fault of ours: raised from `run`, offsets uncommitted
                self._error, handled = exc, None
            if handled is None:
                self._stopped = True
            else:
                self._handled(p.msgs)
        return not self._stopped

    def _handled(self, msgs: list[Any]) -> None:
        for msg in msgs:
            self.pending[(msg.topic(), msg.partition())] = msg.offset() + 1
        self.handled += len(msgs)

    def _prepare(self, msgs: list[Any]) -> _Prepared:
        """Apply a prefix of `msgs` in a batch left open for `_finish` to commit."""
        if len(msgs) == 1:
            return _Prepared(msgs, later=list(msgs))
        ready, later, ids = [], [], {}
        for msg in msgs:
            ev = self._parse(msg)
            if isinstance(ev, tuple):
                later.append(msg)  # handled alone: dead-lettered with its reason
            else:
                ready.append((msg, ev))
                ids.setdefault(ev.topic, set()).add(ev.event_id)
        try:
            seen = self.processed_many(ids)
        except (OperationalError, InterfaceError):
            return _Prepared(msgs, later=list(msgs), ids=_ids(ready))
        done: dict[int, tuple[str, str, float]] = {}  # by position in `ready`
        held: set[tuple[str, int, str | None]] = set()  # set aside: their later events go after them
        cut, taken = len(msgs), len(ready)  # from here on (of msgs, of ready) in the next transaction
        deadline = time.monotonic() + self.batch_seconds
        batch = None
        try:
            batch = self.engine.open_batch()
            if self._inflight is not None:  # the batch committing goes first
                batch.before_first_statement = self._drain
            with batch.joined():
                for n, (msg, ev) in enumerate(ready):
                    if n and time.monotonic() > deadline:
                        cut, taken = next(i for i, m in enumerate(msgs) if m is msg), n
                        break
                    batch.tag = n
                    if (ev.topic, ev.event_id) in seen:
                        done[n] = (ev.topic, "duplicate", 0.0)
                        log.warning("duplicate %s/%s@%s (event id %s, first handled %s): skipped", ev.topic,
                                    ev.partition, ev.offset, ev.event_id, seen[(ev.topic, ev.event_id)])
                        continue
                    if (ev.topic, ev.partition, ev.key) in held:
                        later.append(msg)
                        continue
                    seen[(ev.topic, ev.event_id)] = "earlier in this batch"
                    started, writes = time.perf_counter(), batch.writes
                    try:
                        outcome = self._run_handler(msg, ev)
                    except (InvalidInput, NotFound, Ignored, IllegalTransition, Conflict):
                        if batch.writes != writes:
                            raise _Retry("a refused event had written") from None
                        del seen[(ev.topic, ev.event_id)]
                        held.add((ev.topic, ev.partition, ev.key))
                        later.append(msg)
                        continue
                    batch.extra.append((n, ProcessedMessage.__table__, {
                        "consumer": f"kafka:{ev.topic}", "message_id": ev.event_id, "created_at": utcnow()}))
                    done[n] = (ev.topic, outcome, time.perf_counter() - started)
        except Exception as exc:  # rolled back: nothing of the batch was written
            if batch is not None:
                batch.rollback()
            log.warning("batch of %d events rolled back (%s: %s); handling them one by one", cut,
                        type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
            return _Prepared(msgs[:cut], later=list(msgs[:cut]), ids=_ids(ready[:taken]))
        if cut < len(msgs):
            kept = {id(m) for m in msgs[:cut]}
            later = [m for m in later if id(m) in kept]
        return _Prepared(msgs[:cut], batch, ready, done, later, _ids(ready[:taken]))

    def _finish(self, p: _Prepared, stop: threading.Event) -> int | None:
        """Commit a prepared batch, then handle its set-aside events alone: how many events it
        covered, None when stopping."""
        later, done = p.later, p.done
        if p.batch is not None:
            try:
                p.batch.commit()
            except Exception as exc:  # rolled back: nothing of the batch was written
                log.warning("batch of %d events rolled back (%s: %s); handling them one by one", len(p.msgs),
                            type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
                return len(p.msgs) if self._one_by_one(p.msgs, stop) else None
            alone = len(later) + len(p.batch.refused)
            log.log(logging.INFO if alone else logging.DEBUG, "batch of %d events: %d applied together, %d alone",
                    len(p.msgs), len(done) - len(p.batch.refused), alone)
            for n in p.batch.refused:  # a start whose key exists: handled alone, it finds the instance
                done.pop(n, None)
                later.append(p.ready[n][0])
            self._count_outcomes(done)
        later.sort(key=lambda m: (m.topic(), m.partition(), m.offset()))
        return len(p.msgs) if self._one_by_one(later, stop) else None

    @staticmethod
    def _count_outcomes(done: dict[int, tuple[str, str, float]]) -> None:
        # one label lookup per topic and outcome, not per event (`labels` costs more than `inc`)
        timers: dict[str, Any] = {}
        for topic, outcome, seconds in done.values():
            timer = timers.get(topic)
            if timer is None:
                timer = timers[topic] = KAFKA_HANDLE_SECONDS.labels(topic)
            timer.observe(seconds)
        for (topic, outcome), n in Tally((topic, outcome) for topic, outcome, _ in done.values()).items():
            KAFKA_EVENTS.labels(topic, outcome).inc(n)

    def _one_by_one(self, msgs: list[Any], stop: threading.Event) -> bool:
        for msg in msgs:
            if self.handle_with_retry(msg, stop) is None:
                return False
        return True

    def processed_many(self, ids: dict[str, set[str]]) -> dict[tuple[str, str], Any]:
        """{(topic, event id): when it was handled (its row's created_at)} of the events already
        handled, one query per topic."""
        found: dict[tuple[str, str], Any] = {}
        with self.rt.sessions() as s:
            for topic, wanted in ids.items():
                rows = s.execute(select(ProcessedMessage.message_id, ProcessedMessage.created_at).where(
                    ProcessedMessage.consumer == f"kafka:{topic}", ProcessedMessage.message_id.in_(wanted)))
                found.update(((topic, m), at) for m, at in rows)
        return found

    def _parse(self, msg: Any) -> "KafkaEvent | tuple[str, str]":
        """The event, or why it cannot be applied: (reason, dead-letter kind)."""
        topic = msg.topic()
        if topic not in self.routes:
            return f"no workflow consumes topic {topic}", "unroutable"
        try:
            msg_id = event_id(msg)
        except BadEventId as exc:
            return str(exc), "invalid_field"
        raw = msg.value()
        if raw is None:
            return "empty value: a tombstone (null value) is not an event", "invalid_json"
        if not raw:
            return "empty value: zero bytes are not an event", "invalid_json"
        try:
            payload = loads(raw)
        except ValueError as exc:
            return f"invalid JSON: {exc}", "invalid_json"
        if not isinstance(payload, dict):
            return f"payload must be a JSON object, got {type(payload).__name__}", "invalid_json"
        try:  # taken exactly or not at all, like the event id: a replaced byte would alter it
            key = msg.key().decode() if msg.key() else None
        except UnicodeDecodeError:
            return "key: is not valid UTF-8", "invalid_field"
        ev = KafkaEvent(topic, msg.partition(), msg.offset(), key, payload, msg_id, _headers(msg))
        # Text the database refuses (NUL, a lone surrogate) would fail every attempt: dead-letter
        # it at once, naming the field (a payload field bare, else `key` or `headers.<name>`).
        bad = unstorable(payload) or unstorable({"key": key, "headers": ev.headers})
        if bad is not None:
            return f"{bad[0]}: {bad[1]}", "invalid_field"
        bad = _correlation_problem(msg)
        if bad is not None:
            return f"headers.{logs.HEADER}: {bad}", "invalid_field"
        return ev

    def _run_handler(self, msg: Any, ev: KafkaEvent) -> str:
        # An event without the header continues the correlation stored with its instance; its
        # trace (W3C headers) goes on through the engine's spans and the outbox rows it writes.
        # This span is by hand: the confluent-kafka instrumentation's consumer makes its process
        # span the child of a fresh `recv` span, the producer's trace only linked, so the event's
        # trace would stop at the broker.
        topic, key = ev.topic, ev.key
        if not tracing.enabled():  # no span: its attributes are not even built
            with logs.context(correlation_id=logs.given_correlation_id(ev.headers.get(logs.HEADER))):
                return self.routes[topic].handler(self.engine, ev) or "accepted"
        with logs.context(correlation_id=logs.given_correlation_id(ev.headers.get(logs.HEADER))), tracing.span(
                f"{topic} process", {"messaging.system": "kafka", "messaging.destination.name": topic,
                                     "messaging.kafka.message.offset": msg.offset(),
                                     "messaging.destination.partition.id": str(msg.partition()),
                                     "messaging.message.id": ev.event_id, **({"workflow.key": key} if key else {})},
                parent=ev.headers, kind="consumer"):
            return self.routes[topic].handler(self.engine, ev) or "accepted"

    # -- one event ------------------------------------------------------------------------------
    def handle(self, msg: Any) -> str:
        topic = msg.topic()
        started = time.perf_counter()
        if topic not in self.routes:
            return self.dead_letter(msg, f"no workflow consumes topic {topic}", "unroutable")
        consumer = f"kafka:{topic}"
        msg_id = _recorded_id(msg)  # a bad event id: dead-lettered by _parse below, recorded by position
        seen_at = self.processed(consumer, msg_id)
        if seen_at is not None:
            # logged, never silent: a new event taken for a duplicate would otherwise vanish
            log.warning("duplicate %s/%s@%s (event id %s, first handled %s): skipped", topic, msg.partition(),
                        msg.offset(), msg_id, seen_at)
            return self._outcome(topic, "duplicate", started)
        ev = self._parse(msg)
        if isinstance(ev, tuple):
            return self.dead_letter(msg, *ev)
        token = _current_delivery.set(_Delivery(consumer, msg_id))
        try:
            outcome = self._run_handler(msg, ev)
        except InvalidInput as exc:
            return self.dead_letter(msg, f"{exc.field}: {exc.problem}", "invalid_field")
        except NotFound as exc:
            return self.dead_letter(msg, f"unroutable: {exc.message}", "unroutable")
        except (Ignored, IllegalTransition, Conflict) as exc:
            log.info("ignored %s/%s@%s: %s", topic, msg.partition(), msg.offset(), exc)
            outcome = "ignored"
        except IntegrityError:  # another delivery of the same event committed first
            log.warning("duplicate %s/%s@%s (event id %s, handled concurrently): skipped", topic,
                        msg.partition(), msg.offset(), msg_id)
            outcome = "duplicate"
        finally:
            _current_delivery.reset(token)
        return self._outcome(topic, outcome, started)

    def _outcome(self, topic: str, outcome: str, started: float) -> str:
        KAFKA_EVENTS.labels(topic, outcome).inc()
        KAFKA_HANDLE_SECONDS.labels(topic).observe(time.perf_counter() - started)
        return outcome

    def processed(self, consumer: str, msg_id: str) -> Any:
        """When this event id was handled (its processed_messages row's created_at), else None."""
        with self.rt.sessions() as s:
            return s.execute(select(ProcessedMessage.created_at).where(
                ProcessedMessage.consumer == consumer, ProcessedMessage.message_id == msg_id)).scalar()

    def dead_letter(self, msg: Any, reason: str, kind: str) -> str:
        """The original bytes to `<topic>.dlq`, the reason in the headers; wait for the ack."""
        topic = msg.topic()
        headers = list(msg.headers() or []) + [
            ("dlq_reason", reason.encode()), ("dlq_original_topic", topic.encode()),
            ("dlq_original_partition", str(msg.partition()).encode()),
            ("dlq_original_offset", str(msg.offset()).encode())]
        from confluent_kafka import KafkaException

        from .kafka import is_permanent_error

        value = msg.value()
        for attempt in range(2):
            errors: list[Any] = []
            try:
                self.dlq.produce(f"{topic}.dlq", value, key=msg.key(), headers=headers,
                                 on_delivery=lambda err, _m: errors.append(err) if err else None)
            except KafkaException as exc:
                errors.append(exc)
            left = 0 if errors else self.dlq.flush(30)
            if not errors and not left:
                break
            if attempt == 0 and value and errors and is_permanent_error(errors[0]):
                # too large for the dead-letter topic: its head, and the size it had
                headers = headers + [("dlq_truncated_from", str(len(value)).encode())]
                value = value[:DLQ_TRUNCATE]
                continue
            # a producer that knew a broker since restarted empty would fail every later one too
            self.dlq = self._dlq_producer()
            raise RuntimeError(f"dead-letter to {topic}.dlq failed: {errors[:1]}")
        KAFKA_DEAD_LETTERS.labels(topic, kind).inc()
        log.warning("dead-lettered %s/%s@%s: %s", topic, msg.partition(), msg.offset(), reason)
        token = _current_delivery.set(None)  # recorded here, explicitly, not by the session hook
        try:  # a redelivery of this event is then a duplicate, not a second dead letter
            with self.rt.sessions() as s, s.begin():
                s.add(ProcessedMessage(consumer=f"kafka:{topic}", message_id=_recorded_id(msg)))
        except Exception as exc:  # the dead letter is durable already; at worst it is repeated
            log.info("dead letter of %s/%s@%s not recorded: %s", topic, msg.partition(), msg.offset(), exc)
        finally:
            _current_delivery.reset(token)
        return self._outcome(topic, "dead_letter", time.perf_counter())
