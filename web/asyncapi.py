"""/asyncapi.json (AsyncAPI 3.0), generated from the message models: every Kafka topic the
registered workflows consume or produce (with its key, headers and dead-letter topic), the AMQP
calculation task and result queues, and the Redis chat callback stream and channel."""
from __future__ import annotations

from typing import Any

from flask import Blueprint, current_app
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from orchestrator import logs
from sagas.balance import calculations
from orchestrator.kafka_bridge import discover
from sagas.chat.settings import CALLBACK_GROUP
from sagas.chat.store import ChatCallback

from . import runtime
from .openapi import doc

bp = Blueprint("asyncapi", __name__)
REF = "#/components/schemas/{model}"

#: Headers of a consumed event (all optional) and of a produced one (always set).
CONSUMED_HEADERS = {"type": "object", "properties": {
    "event_id": {"type": "string", "maxLength": 200, "description": "de-duplication id; topic:partition:offset when absent"},
    logs.HEADER: {"type": "string", "description": "correlation id carried into the logs"}}}
PRODUCED_HEADERS = {"type": "object", "required": ["message_id", "instance_id"], "properties": {
    "message_id": {"type": "string", "description": "the outbox row's id, stable across re-sends: de-duplicate by it"},
    "instance_id": {"type": "string", "description": "the workflow instance that produced it"},
    logs.HEADER: {"type": "string"}}}
DLQ_HEADERS = {"type": "object", "required": ["dlq_reason", "dlq_original_topic", "dlq_original_partition",
                                              "dlq_original_offset"], "properties": {
    "dlq_reason": {"type": "string", "description": "why, e.g. `mode: is required` (the field's dotted path first), "
                                                    "`invalid JSON: ...`, `unroutable: unknown route_id 'r-9'`"},
    "dlq_original_topic": {"type": "string"}, "dlq_original_partition": {"type": "string"},
    "dlq_original_offset": {"type": "string"}}}


def _ident(name: str) -> str:
    return name.replace(":", "_").replace("<", "").replace(">", "")


def build(registry: Any) -> dict[str, Any]:
    """The AsyncAPI document for the workflows in `registry` (see the module's docstring)."""
    consumed = discover(registry)
    topics: dict[str, tuple[str, type[BaseModel], str | None]] = {}  # topic -> (direction, model, key)
    for name in registry.names():
        cls = registry.get(name)
        schemas = getattr(cls, "kafka_schemas", None) or {}
        for topic in [*(getattr(cls, "kafka_consumes", None) or {}), *(getattr(cls, "kafka_produces", None) or ())]:
            if topic not in schemas:
                raise ValueError(f"workflow {cls.type}: topic {topic} has no model in kafka_schemas")
            topics[topic] = ("receive" if topic in consumed else "send", schemas[topic],
                             getattr(cls, "kafka_key", None))
    models = [m for _, m, _ in topics.values()] + [calculations.CalculationTask, calculations.CalculationResult,
                                                  ChatCallback]
    _, defs = models_json_schema([(m, "validation") for m in dict.fromkeys(models)], ref_template=REF)
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    messages: dict[str, Any] = {}

    def add(channel: str, address: str, server: str, action: str, message: str, spec: dict[str, Any],
            description: str, **extra: Any) -> None:
        messages[message] = spec
        channels[channel] = {"address": address, "description": description,
                             "servers": [{"$ref": f"#/servers/{server}"}],
                             "messages": {message: {"$ref": f"#/components/messages/{message}"}}, **extra}
        operations[f"{action}_{channel}"] = {
            "action": action, "channel": {"$ref": f"#/channels/{channel}"},
            "messages": [{"$ref": f"#/channels/{channel}/messages/{message}"}]}

    for topic, (action, model, key) in sorted(topics.items()):
        key_schema = {"type": "string", "description": f"the {key}" if key else "any"}
        add(topic, topic, "kafka", action, model.__name__, {
            "name": model.__name__, "contentType": "application/json", "summary": (model.__doc__ or "").strip(),
            "payload": {"$ref": REF.format(model=model.__name__)},
            "headers": CONSUMED_HEADERS if action == "receive" else PRODUCED_HEADERS,
            "bindings": {"kafka": {"key": key_schema, "bindingVersion": "0.5.0"}}},
            f"Kafka topic {topic} ({'consumed' if action == 'receive' else 'produced'})")
        if action == "receive":
            dlq = f"{topic}.dlq"
            add(dlq, dlq, "kafka", "send", f"{_ident(topic).replace('.', '_')}_dead_letter", {
                "name": "DeadLetter", "summary": f"an event of {topic} that cannot be applied: its original bytes "
                                                 "and key unchanged, the reason in the headers",
                "payload": {"description": "the original bytes, unchanged (any content)"},
                "headers": DLQ_HEADERS,
                "bindings": {"kafka": {"key": {"type": "string", "description": "the original key"},
                                       "bindingVersion": "0.5.0"}}},
                f"dead-letter topic of {topic}")
    add("calculation_tasks", "orchestrator.calculations", "rabbitmq", "send", "CalculationTask", {
        "name": "CalculationTask", "contentType": "application/json",
        "summary": (calculations.CalculationTask.__doc__ or "").strip(),
        "payload": {"$ref": REF.format(model="CalculationTask")},
        "headers": {"type": "object", "properties": {"contract-version": {"type": "integer", "const": 1},
                                                     "calculation-type": {"type": "string"}}},
        "correlationId": {"location": "$message.payload#/correlationId"},
        "bindings": {"amqp": {"contentEncoding": "utf-8", "messageType": "calculation",
                              "bindingVersion": "0.3.0"}}},
        "exchange orchestrator.calculations (topic, durable), routing key calculation.<type>; the durable "
        "queue orchestrator.calculations is bound with calculation.#; persistent (delivery_mode 2), "
        "correlation_id and message_id = correlationId, reply_to orchestrator.calculation-results",
        bindings={"amqp": {"is": "routingKey", "exchange": {"name": "orchestrator.calculations", "type": "topic",
                                                             "durable": True, "autoDelete": False},
                           "bindingVersion": "0.3.0"}})
    add("calculation_results", "orchestrator.calculation-results", "rabbitmq", "receive", "CalculationResult", {
        "name": "CalculationResult", "contentType": "application/json",
        "summary": (calculations.CalculationResult.__doc__ or "").strip(),
        "payload": {"$ref": REF.format(model="CalculationResult")},
        "correlationId": {"location": "$message.payload#/correlationId"},
        "bindings": {"amqp": {"contentEncoding": "utf-8", "bindingVersion": "0.3.0"}}},
        "the reply queue (durable; exchange orchestrator.calculation-results, direct, routing key = queue name)",
        bindings={"amqp": {"is": "queue", "queue": {"name": "orchestrator.calculation-results", "durable": True,
                                                    "exclusive": False, "autoDelete": False},
                           "bindingVersion": "0.3.0"}})
    add("chat_callbacks", "callback:{consumer_id}", "redis", "receive", "ChatCallback", {
        "name": "ChatCallback", "contentType": "application/json", "summary": (ChatCallback.__doc__ or "").strip(),
        "payload": {"$ref": REF.format(model="ChatCallback")}},
        "Redis pub/sub channel the execution service may publish a task's callbacks on (the seed's path): "
        "Redis keeps nothing for absent subscribers, so a callback published while no API process "
        "listens is lost; use the stream chat:callbacks:{consumer_id}",
        parameters={"consumer_id": {"description": "CHAT_CONSUMER_ID (default orchestrator)",
                                    "default": "orchestrator"}})
    add("chat_callback_stream", "chat:callbacks:{consumer_id}", "redis", "receive", "ChatCallbackEntry", {
        "name": "ChatCallbackEntry", "summary": "one Redis Stream entry (XADD) holding one callback",
        "payload": {"type": "object", "required": ["data"], "properties": {"data": {
            "type": "string", "contentMediaType": "application/json",
            "description": "the callback's JSON, the ChatCallback schema (the same as on callback:{consumer_id})",
            "x-schema": {"$ref": REF.format(model="ChatCallback")}}}}},
        "Redis Stream the execution service adds a task's callbacks to (the durable path, the emulator's "
        "default): `XADD chat:callbacks:<consumer_id> MAXLEN ~ 100000 * data <callback JSON>`. The API "
        f"processes read it as the consumer group {CALLBACK_GROUP} (XREADGROUP), acknowledge an entry (XACK) "
        "once it is stored or rejected for good, and claim entries left pending by a dead consumer "
        "(XAUTOCLAIM after CHAT_CALLBACK_CLAIM_IDLE_SECONDS); an entry that fails to store "
        "CHAT_CALLBACK_MAX_DELIVERIES times moves to chat:callbacks:<consumer_id>:dead with fields data, entry "
        "and reason. Entries added while no API process runs are delivered when one starts.",
        parameters={"consumer_id": {"description": "CHAT_CONSUMER_ID (default orchestrator)",
                                    "default": "orchestrator"}},
        **{"x-consumer-group": CALLBACK_GROUP, "x-dead-letter-stream": "chat:callbacks:{consumer_id}:dead"})
    return {
        "asyncapi": "3.0.0",
        "info": {"title": "orchestrator messages", "version": "0.1.0",
                 "description": "The Kafka topics, RabbitMQ queues and Redis streams and channels the orchestrator owns, "
                                "generated from the models that validate them. Guarantees: docs/kafka.md, "
                                "docs/balance.md, docs/chat.md."},
        "defaultContentType": "application/json",
        "servers": {"kafka": {"host": "localhost:9092", "protocol": "kafka", "description": "KAFKA_BROKERS"},
                    "rabbitmq": {"host": "localhost:5672", "protocol": "amqp", "description": "BROKER_URL"},
                    "redis": {"host": "localhost:6379", "protocol": "redis", "description": "REDIS_URL"}},
        "channels": channels,
        "operations": operations,
        "components": {"messages": messages, "schemas": defs.get("$defs", {})},
    }


@bp.get("/asyncapi.json")
@doc(None, errors=(), tags=("operations",))
def asyncapi() -> Any:
    return current_app.json.response(build(runtime().engine.registry))
