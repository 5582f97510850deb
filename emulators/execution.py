"""Stand-in for the execution service of seed 003.

A Celery worker on the `execution` queue runs `execution.chat_task(message)` where `message` is
`{task_id, session_id, message, config, callback_channel, callback_stream, timeout_seconds}`, and
answers with JSON callbacks `{session_id, task_id, seq, type: "chunk"|"result"|"error", result}`:
N chunks, then the result (or an error at the configured failure rate). seq runs 1, 2, ... per task.

By default each callback is added (XADD, field `data`) to the Redis Stream `callback_stream`, which
keeps it until an API process reads and acknowledges it; `EXECUTION_CALLBACK_MODE=pubsub` (or a
message without `callback_stream`) publishes on the pub/sub channel `callback_channel` instead,
where a callback sent while no API process listens is lost.

Settings (environment, overridable per session with `config.emulator`):
    EXECUTION_CHUNKS        chunks per answer (default 3)
    EXECUTION_CHUNK_DELAY   seconds before each chunk (default 0.2)
    EXECUTION_FAILURE_RATE  0..1, share of tasks that end with an error (default 0)
    EXECUTION_CALLBACK_MODE `stream` (default) or `pubsub`
Per session, `config.emulator` may also set `shuffle: true` (send callbacks out of order, with a
duplicate), `silent: true` (never answer, so the task times out) and `callback` (the mode).

Run: `python -m emulators.execution` (the dev runner does). It reads the broker and Redis URLs
from the orchestrator's configuration.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import random
import time
from typing import Any

import redis
from celery import Celery
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from emulators import effects
from orchestrator.config import load_settings
from orchestrator.runtime import configure_celery

log = logging.getLogger("emulators.execution")

app = Celery("execution-emulator")
app.config_from_object("celeryconfig")
_redis: redis.Redis | None = None
STREAM_MAXLEN = 100_000


def options(config: dict[str, Any]) -> dict[str, Any]:
    env = os.environ
    out = {
        "chunks": int(env.get("EXECUTION_CHUNKS", "3")),
        "delay": float(env.get("EXECUTION_CHUNK_DELAY", "0.2")),
        "failure_rate": float(env.get("EXECUTION_FAILURE_RATE", "0")),
        "shuffle": False,
        "silent": False,
        "callback": env.get("EXECUTION_CALLBACK_MODE", "stream"),
    }
    override = config.get("emulator") if isinstance(config, dict) else None
    if isinstance(override, dict):
        out.update({k: v for k, v in override.items() if k in out})
    out["chunks"] = max(0, min(1000, int(out["chunks"])))
    out["delay"] = max(0.0, min(30.0, float(out["delay"])))
    return out


def answer(message: str, chunks: int) -> list[str]:
    """A deterministic answer that names the message, cut into `chunks` pieces."""
    text = f"You said: {message}. This answer was streamed in {chunks} chunks by the execution emulator."
    size = -(-len(text) // max(1, chunks))
    return [text[i * size:(i + 1) * size] for i in range(chunks)]


# Redis away longer than the client's own retries: the task runs again later and sends every
# callback again (the orchestrator stores each (task, seq) once).
@app.task(name="execution.chat_task", acks_late=True, reject_on_worker_lost=True,
          autoretry_for=(redis.RedisError,), retry_backoff=True, retry_backoff_max=30, max_retries=20)
def chat_task(message: dict[str, Any]) -> str:
    opts = options(message.get("config") or {})
    if opts["silent"]:
        return "silent"
    channel = message["callback_channel"]
    base = {"session_id": message["session_id"], "task_id": message["task_id"]}
    pieces = answer(str(message.get("message", "")), opts["chunks"])
    callbacks: list[dict[str, Any]] = [
        {**base, "seq": i + 1, "type": "chunk", "result": {"text": piece, "index": i}}
        for i, piece in enumerate(pieces)]
    final_seq = len(pieces) + 1
    if random.random() < float(opts["failure_rate"]):
        callbacks.append({**base, "seq": final_seq, "type": "error",
                          "result": {"code": "execution_failed", "message": "the emulator failed this task on purpose"}})
    else:
        callbacks.append({**base, "seq": final_seq, "type": "result",
                          "result": {"text": "".join(pieces), "chunks": len(pieces)}})
    if opts["shuffle"]:
        callbacks = list(reversed(callbacks)) + callbacks[:1]  # out of order, and one duplicate
    stream = message.get("callback_stream") if opts["callback"] != "pubsub" else None
    r = _client()
    effects.record("chat_answer", message["task_id"], chat_task.request.id or "?")
    for cb in callbacks:
        if opts["delay"]:
            time.sleep(opts["delay"])
        send_callback(r, cb, stream, channel)
    return "answered"


def send_callback(r: redis.Redis, callback: dict[str, Any], stream: str | None, channel: str) -> None:
    """One callback: an entry `{"data": <JSON>}` on the stream (durable), else a pub/sub message.
    The stream is capped (approximately) at STREAM_MAXLEN entries."""
    if stream:
        r.xadd(stream, {"data": json.dumps(callback)}, maxlen=STREAM_MAXLEN, approximate=True)
    else:
        r.publish(channel, json.dumps(callback))


def _client() -> redis.Redis:
    global _redis
    if _redis is None:
        url = load_settings().redis_url or "redis://127.0.0.1:6379/0"
        # A Redis restart: each command is retried with backoff (about 30 s in all) before failing.
        _redis = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=3,
                                      retry=Retry(ExponentialBackoff(cap=5.0, base=0.1), 10),
                                      retry_on_error=[redis.ConnectionError, redis.TimeoutError])
    return _redis


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="execution service emulator (Celery worker on queue 'execution')")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--name", default="execution@%h")
    args = p.parse_args(argv)
    settings = load_settings()
    configure_celery(app, settings)
    app.conf.worker_send_task_events = False
    app.worker_main(["worker", "--loglevel", settings.log_level.upper(), "-Q", "execution", "-P", "threads",
                     "-c", str(args.concurrency), "-n", args.name, "--without-gossip", "--without-mingle"])


if __name__ == "__main__":
    main()
