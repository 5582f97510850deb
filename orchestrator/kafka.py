"""Kafka clients (confluent-kafka): settings that hold on a real Kafka and on the bundled broker,
and the outbox publisher for channel "kafka".

Workflows produce with `self.emit("kafka", topic, payload, key=business_key)`; the row is written
in the transition's transaction and this publisher sends it keyed by that business key, so one
instance's messages land on one partition in order. A row is marked sent only after the broker
acknowledged it from every in-sync replica (`acks=all`, idempotent producer).
"""
from __future__ import annotations

import json
import logging
import threading
from collections import Counter as Tally
from typing import Any, Callable, Iterable

from prometheus_client import Counter

from . import tracing
from .logs import HEADER
from .models import OutboxMessage
from .outbox_relay import PermanentPublishError

log = logging.getLogger(__name__)

KAFKA_PRODUCED = Counter("orchestrator_kafka_produced_total", "Messages produced to Kafka by the outbox relay",
                         ["topic"])


#: librdkafka's own log lines go through Python logging, not straight to stderr.
CLIENT_LOG = logging.getLogger("orchestrator.kafka.client")


def producer_config(brokers: str, **extra: Any) -> dict[str, Any]:
    return {"bootstrap.servers": brokers, "acks": "all", "enable.idempotence": True, "linger.ms": 5,
            "message.timeout.ms": 30000, "logger": CLIENT_LOG, **extra}


def consumer_config(brokers: str, group: str, **extra: Any) -> dict[str, Any]:
    return {"bootstrap.servers": brokers, "group.id": group, "session.timeout.ms": 6000,
            "heartbeat.interval.ms": 1000, "auto.offset.reset": "earliest", "enable.auto.commit": False,
            "logger": CLIENT_LOG, **extra}


#: Error codes no retry of the same message can fix: the row is failed instead of blocking the relay.
PERMANENT_CODES = ("MSG_SIZE_TOO_LARGE", "_MSG_SIZE_TOO_LARGE", "INVALID_MSG", "INVALID_MSG_SIZE",
                   "RECORD_LIST_TOO_LARGE", "INVALID_RECORD", "INVALID_TOPIC_EXCEPTION", "_INVALID_ARG",
                   "TOPIC_AUTHORIZATION_FAILED", "INVALID_REQUIRED_ACKS")


def is_permanent_error(err: Any) -> bool:
    """Whether a confluent_kafka KafkaError (or a KafkaException holding one) is permanent for
    the message. A fatal error is not: it is the producer's (an idempotent producer whose broker
    restarted without its state), and the message goes with a new producer (`KafkaPublisher._renew`)."""
    from confluent_kafka import KafkaError

    err = err.args[0] if err is not None and not isinstance(err, KafkaError) and err.args else err
    if not isinstance(err, KafkaError):
        return False
    return err.name() in PERMANENT_CODES


def encode(payload: Any) -> bytes:
    """Compact UTF-8 JSON. NaN and infinities are refused (ValueError: a permanent publish
    error): they are not JSON, and a consumer's strict parser would reject the message."""
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


class KafkaPublisher:
    """Outbox publisher: produce one row and wait for its delivery report (raises on failure)."""

    def __init__(self, brokers: str, timeout: float = 30.0) -> None:
        from confluent_kafka import Producer

        self._config = producer_config(brokers)
        self.producer = Producer(self._config)
        self._traced: Any = None  # the producer wrapped by the confluent-kafka instrumentation
        self.timeout = timeout
        self._lock = threading.Lock()  # one flush at a time: the report we wait for is ours

    def publish_many(self, rows: list[OutboxMessage]) -> list[Exception | None]:
        """Produce every row, then wait once for all their delivery reports: for each row None
        (acknowledged) or the error (PermanentPublishError for one Kafka can never take). The
        rows go out in list order; rows of one key land on one partition in that order."""
        from confluent_kafka import KafkaException

        results: list[Exception | None] = [None] * len(rows)
        waiting: set[int] = set()

        def report(i: int) -> Callable[[Any, Any], None]:
            def done(err: Any, _msg: Any) -> None:
                waiting.discard(i)
                if err is not None:
                    results[i] = PermanentPublishError(f"kafka delivery to {rows[i].target} failed: {err}") \
                        if is_permanent_error(err) else RuntimeError(f"kafka delivery to {rows[i].target} failed: {err}")
            return done

        with self._lock:
            for i, row in enumerate(rows):
                try:
                    value = encode(row.payload)
                except (TypeError, ValueError) as exc:  # permanent: it will never serialise
                    results[i] = exc
                    continue
                headers = [("message_id", row.message_id.encode())]
                if row.instance_id:
                    headers.append(("instance_id", row.instance_id.encode()))
                if row.correlation_id:
                    headers.append((HEADER, row.correlation_id.encode()))
                while True:
                    try:
                        self.producer.produce(row.target, value, key=row.key.encode() if row.key else None,
                                              headers=headers, on_delivery=report(i))
                        waiting.add(i)
                        break
                    except BufferError:  # the local queue is full: let reports drain it
                        self.producer.poll(0.05)
                    except KafkaException as exc:
                        results[i] = PermanentPublishError(f"kafka refused the message for {row.target}: {exc}") \
                            if is_permanent_error(exc) else exc
                        break
            left = self.producer.flush(self.timeout)
            transient = any(r is not None and not isinstance(r, (PermanentPublishError, TypeError, ValueError))
                            for r in results)
            if left or transient:
                self._renew()  # see `_renew`: a stale producer would time out on every later round
        for i in waiting:
            results[i] = RuntimeError(f"kafka delivery to {rows[i].target} not confirmed within {self.timeout:g}s")
        # one label lookup per topic, not per message
        for target, n in Tally(row.target for row, r in zip(rows, results) if r is None).items():
            KAFKA_PRODUCED.labels(target).inc(n)
        return results

    def __call__(self, row: OutboxMessage) -> None:
        """Raises PermanentPublishError for a message Kafka can never take, RuntimeError (or
        KafkaException) for one that may go later (broker down, timeout)."""
        headers = [("message_id", row.message_id.encode())]
        if row.instance_id:
            headers.append(("instance_id", row.instance_id.encode()))
        if row.correlation_id:
            headers.append((HEADER, row.correlation_id.encode()))
        value = encode(row.payload)  # a payload that does not serialise raises TypeError: permanent
        # The instrumentation's send span takes no attributes of ours: the workflow's go on the
        # outbox publish span around this call, the send span's parent.
        tracing.annotate(tracing.workflow_attributes(row.instance_id, key=row.key))
        self._produce(row, value, headers)

    def _sender(self) -> Any:
        """The producer to send with: once tracing is on (a process switches it on after building
        its runtime), wrapped by the confluent-kafka instrumentation, whose `<topic> send` span
        puts its W3C `traceparent` in the message's headers."""
        if self._traced is None and tracing.enabled():
            self._traced = tracing.instrument_kafka_producer(self.producer)
        return self._traced or self.producer

    def _renew(self) -> None:
        """A new producer in place of one whose delivery failed: a producer that knew a broker
        which has since restarted without its log (or lost its idempotence state) times out on
        every message for ever. What the old one still holds is purged; the row is sent again
        (consumers de-duplicate by message_id)."""
        from confluent_kafka import Producer

        try:
            self.producer.purge()
        except Exception:  # noqa: BLE001 - the old producer is dropped either way
            pass
        self.producer = Producer(self._config)
        self._traced = None

    def _produce(self, row: OutboxMessage, value: bytes, headers: list[tuple[str, bytes]]) -> None:
        from confluent_kafka import KafkaException

        errors: list[Any] = []

        def report(err: Any, _msg: Any) -> None:
            if err is not None:
                errors.append(err)

        with self._lock:
            try:
                self._sender().produce(row.target, value, key=row.key.encode() if row.key else None,
                                      headers=headers, on_delivery=report)
            except KafkaException as exc:  # refused before sending, e.g. larger than message.max.bytes
                if is_permanent_error(exc):
                    raise PermanentPublishError(f"kafka refused the message for {row.target}: {exc}") from exc
                self._renew()  # a producer in a fatal state refuses every later message too
                raise
            left = self.producer.flush(self.timeout)
            if (errors and not is_permanent_error(errors[0])) or left:
                self._renew()
        if errors:
            if is_permanent_error(errors[0]):
                raise PermanentPublishError(f"kafka delivery to {row.target} failed: {errors[0]}")
            raise RuntimeError(f"kafka delivery to {row.target} failed: {errors[0]}")
        if left:
            raise RuntimeError(f"kafka delivery to {row.target} not confirmed within {self.timeout:g}s")
        KAFKA_PRODUCED.labels(row.target).inc()


def ensure_topics(bootstrap: str, topics: Iterable[str], partitions: int = 4, timeout: float = 15.0) -> None:
    """Create the topics that do not exist yet (an existing topic is left as it is)."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": bootstrap, "logger": CLIENT_LOG})
    existing = set(admin.list_topics(timeout=timeout).topics)
    wanted = [t for t in dict.fromkeys(topics) if t not in existing]
    if not wanted:
        return
    futures = admin.create_topics([NewTopic(t, num_partitions=partitions, replication_factor=1) for t in wanted],
                                  operation_timeout=timeout)
    for topic, future in futures.items():
        try:
            future.result(timeout)
        except KafkaException as exc:
            if "TOPIC_ALREADY_EXISTS" not in str(exc):  # a concurrent creator won the race
                raise
    log.info("created topics: %s", ", ".join(wanted))
