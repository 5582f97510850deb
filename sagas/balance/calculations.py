"""The calculation task contract on RabbitMQ, and the consumer that turns results into engine events.

A calculation step publishes one task message (docs/balance.md has the exact AMQP properties):

    exchange  orchestrator.calculations (topic, durable)   routing key  calculation.<type>
    queue     orchestrator.calculations (durable, bound to calculation.#)
    body      {"version": 1, "correlationId", "repoUrl", "branch", "commitHash",
               "input_files": [...], "output_file"}
    reply_to  orchestrator.calculation-results

and stays active until a result with its correlationId comes back on the reply queue:

    {"version": 1, "correlationId", "status": "succeeded" | "failed", "outputCommit", "error"}

The result consumer finds the active step whose saved data holds that correlationId and reports
the outcome to the engine (`step_succeeded` / `step_failed`). The engine's (instance, step,
attempt) keys make a duplicated result a no-op: the step is no longer active the second time.
"""
from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from typing import Any, Literal

from kombu import Connection, Exchange, Queue
from kombu.mixins import ConsumerMixin

from orchestrator import logs
from orchestrator.engine import ACCEPTED, Engine
from orchestrator.errors import InvalidInput, UpstreamError
from orchestrator.jsonutil import NotJSON, check_storable, loads
from orchestrator.schemas import Event, NonBlank, parse
from orchestrator.config import Settings

from .settings import BalanceSettings

log = logging.getLogger(__name__)

CONTRACT_VERSION = 1
_NAMESPACE = uuid.UUID("6f1c1d2e-7b55-4c1e-9a43-5b1f2d7c0a11")


# -- schemas: the AMQP contract (docs/balance.md; /asyncapi.json is generated from these) ----------
class CalculationTask(Event):
    """The task message on exchange `orchestrator.calculations`, routing key `calculation.<type>`."""

    version: Literal[1] = CONTRACT_VERSION
    correlationId: str
    repoUrl: str
    branch: str
    commitHash: str
    input_files: list[str]
    output_file: str


class CalculationResult(Event):
    """The result message on the reply queue `orchestrator.calculation-results`. `outputCommit`
    is required when `status` is `succeeded`; `error` is read only when it is `failed`."""

    version: int = CONTRACT_VERSION
    correlationId: NonBlank
    status: Literal["succeeded", "failed"]
    outputCommit: str | None = None
    error: Any = None


def correlation_id(idempotency_key: str) -> str:
    """A UUID derived from the step's idempotency key: the same for a redelivered step."""
    return str(uuid.uuid5(_NAMESPACE, idempotency_key))


def task_exchange(settings: Settings) -> Exchange:
    return Exchange(BalanceSettings.from_settings(settings).calculation_exchange, type="topic", durable=True)


def task_queue(settings: Settings) -> Queue:
    return Queue(BalanceSettings.from_settings(settings).calculation_exchange, task_exchange(settings), routing_key="calculation.#",
                 durable=True)


def results_queue(settings: Settings) -> Queue:
    name = BalanceSettings.from_settings(settings).calculation_results_queue
    return Queue(name, Exchange(name, type="direct", durable=True), routing_key=name, durable=True)


def prepare_embedded_calculation_queues(settings: Settings) -> None:
    """On the embedded broker (`sqla+sqlite:`), kombu's tables and every queue, the calculation
    queues included, made under SQLite's write lock (`runtime.prepare_embedded_broker`) before
    the processes that use them start together; nothing on another broker. Only plain kombu
    clients use the calculation queues (the calculation worker, the results consumer, the step
    that sends a task), so no Celery app names them; kombu made them lazily in each, and the
    loser of that race logged a lost connection."""
    if not settings.broker_url.startswith("sqla+sqlite:"):
        return
    from orchestrator.runtime import make_celery, prepare_embedded_broker

    app = make_celery(settings)
    try:
        prepare_embedded_broker(app, [task_queue(settings).name, results_queue(settings).name])
    finally:
        app.close()


def task_message(correlation: str, repo_url: str, branch: str, commit: str, input_files: list[str],
                 output_file: str) -> dict[str, Any]:
    return CalculationTask(correlationId=correlation, repoUrl=repo_url, branch=branch, commitHash=commit,
                           input_files=list(input_files), output_file=output_file).model_dump()


def publish_task(celery_app: Any, settings: Settings, calculation_type: str, body: dict[str, Any]) -> None:
    """Publish one task message with publisher confirms (on AMQP), declaring the queues first so
    a message sent before any worker started is kept."""
    exchange, queue, replies = task_exchange(settings), task_queue(settings), results_queue(settings)
    try:
        _publish(celery_app, exchange, queue, replies, settings, calculation_type, body)
    except Exception as exc:  # the broker is away: a retryable failure, the step's policy retries
        raise UpstreamError("rabbitmq", f"publishing calculation {body['correlationId']} failed: "
                            f"{type(exc).__name__}: {exc}") from None


def _publish(celery_app: Any, exchange: Exchange, queue: Queue, replies: Queue, settings: Settings,
             calculation_type: str, body: dict[str, Any]) -> None:
    with celery_app.producer_or_acquire() as producer:
        producer.publish(
            json.dumps(body), exchange=exchange, routing_key=f"calculation.{calculation_type}",
            declare=[exchange, queue, replies], serializer=None, content_type="application/json",
            content_encoding="utf-8", delivery_mode=2, correlation_id=body["correlationId"],
            message_id=body["correlationId"], reply_to=BalanceSettings.from_settings(settings).calculation_results_queue,
            headers={"contract-version": CONTRACT_VERSION, "calculation-type": calculation_type},
            retry=True, retry_policy={"max_retries": 3},
        )


#: The largest result body accepted (bytes); a result is a commit id and a short error.
MAX_RESULT_BYTES = 1024 * 1024


def parse_result(raw: Any) -> dict[str, Any]:
    """Validate a result message; InvalidInput naming the field if it breaks the contract, is
    larger than MAX_RESULT_BYTES, nested deeper than the parser goes, or holds text the database
    cannot store (see `jsonutil.unstorable`)."""
    if isinstance(raw, (bytes, bytearray, str)):
        size = len(raw) if not isinstance(raw, str) else len(raw.encode("utf-8", "surrogatepass"))
        if size > MAX_RESULT_BYTES:
            raise InvalidInput("body", f"is {size} bytes, more than the {MAX_RESULT_BYTES} a result may hold", 413)
    if isinstance(raw, (bytes, bytearray)):
        try:
            raw = bytes(raw).decode()
        except UnicodeDecodeError:
            raise InvalidInput("body", "is not UTF-8 text") from None
    try:
        if isinstance(raw, str):
            try:
                raw = loads(raw)
            except NotJSON as exc:
                raise InvalidInput("body", "is JSON nested too deeply" if "nested" in str(exc) else "is not JSON") from None
        result = parse(CalculationResult, check_storable(raw))
    except RecursionError:
        raise InvalidInput("body", "is JSON nested too deeply") from None
    if result.status == "succeeded" and not result.outputCommit:  # a rule across two fields
        raise InvalidInput("outputCommit", "is required when status is 'succeeded'")
    return {"correlationId": result.correlationId, "status": result.status, "outputCommit": result.outputCommit,
            "error": result.error if result.status == "failed" else None}


def apply_result(engine: Engine, result: dict[str, Any]) -> bool:
    """Report a result to the engine: the calculation step waits for it as an external step
    whose token is the correlationId. False when no step waits for it (a duplicate or stale one)."""
    cid = result["correlationId"]
    if result["status"] == "succeeded":
        outcome = engine.complete_external(cid, True, {"correlation_id": cid, "commit": result["outputCommit"]},
                                           actor="calculation")
    else:
        outcome = engine.complete_external(cid, False, error=f"calculation {cid} failed: "
                                           f"{result['error'] or 'no reason given'}", actor="calculation")
    if outcome != ACCEPTED:
        log.warning("result %s dropped: it matches no waiting step (%s: an unknown id, a duplicate or too late)",
                    cid, outcome)
        return False
    return True


class ResultConsumer(ConsumerMixin):  # type: ignore[misc]
    """Consumes the reply queue; acks a message only after the engine committed its effect."""

    def __init__(self, connection: Connection, engine: Engine, settings: Settings) -> None:
        self.connection = connection
        self.engine = engine
        self.settings = settings

    def get_consumers(self, Consumer: Any, channel: Any) -> list[Any]:
        # on_message gets the raw message: a worker in any language may send any content type.
        return [Consumer(queues=[results_queue(self.settings)], on_message=self.on_message,
                         prefetch_count=10)]

    def on_message(self, message: Any) -> None:
        # A body that does not parse never will: it is acknowledged (dropped) with its reason,
        # never requeued, so it cannot come back forever nor hold up the results behind it.
        try:
            result = parse_result(message.body)
        except InvalidInput as exc:
            log.error("malformed calculation result dropped: %s; correlation_id %.80r, body %.200r",
                      exc.message, message.properties.get("correlation_id"), message.body)
            message.ack()
            return
        except Exception as exc:  # a parser failure of its own: the same body fails every time
            log.error("malformed calculation result dropped: body: %s: %s; body %.200r",
                      type(exc).__name__, exc, message.body)
            message.ack()
            return
        with logs.context(correlation_id=result["correlationId"]):
            try:
                apply_result(self.engine, result)
            except Exception:  # the database is away: keep the result for a later delivery
                log.exception("result %s not applied; requeued", result["correlationId"])
                time.sleep(1.0)
                message.requeue()
                return
        message.ack()


def run_consumer(rt: Any, stop: threading.Event) -> None:
    with Connection(rt.settings.broker_url, heartbeat=10) as conn:
        consumer = ResultConsumer(conn, rt.engine, rt.settings)
        threading.Thread(target=lambda: (stop.wait(), setattr(consumer, "should_stop", True)),
                         daemon=True).start()
        log.info("calculation results consumer on %s", BalanceSettings.from_settings(rt.settings).calculation_results_queue)
        consumer.run()
