"""An emulated calculation worker: plain kombu, no Celery — what a worker in any language does.

It consumes the task queue (docs/balance.md), reads the input files at `commitHash`, computes a
deterministic result, commits `output_file` to `branch` and replies on the message's `reply_to`.

The result: `{"calculation": <type>, "value": <sum of every number in the inputs>,
"inputs": [...], "input_digest": <sha256 of the inputs>}`. An input holding
`"emulator_fail": "<reason>"` makes the calculation fail with that reason.

It is idempotent by correlationId: its output commit carries the marker
`calculation:<correlationId>`, so a redelivered task replies with the same commit.

It reaches the repository through the orchestrator's facade (GITLAB_URL or GIT_REPOS_DIR); a
real worker clones `repoUrl` instead.

    python -m emulators.calculator [--seconds 1.0]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import signal
import threading
import time
from typing import Any

from kombu import Connection, Exchange, Producer
from kombu.mixins import ConsumerMixin

from emulators import effects
from orchestrator.config import Settings, load_settings
from orchestrator.errors import InvalidInput, UpstreamError
from orchestrator.logs import shorten_retry_tracebacks
from sagas.balance.calculations import (CONTRACT_VERSION, prepare_embedded_calculation_queues, results_queue,
                                        task_queue)
from sagas.balance.settings import BalanceSettings
from sagas.balance.repository import FileMissing, commit_once, open_repository, project_from_repo_url

log = logging.getLogger("calculator")

REQUIRED = ("correlationId", "repoUrl", "branch", "commitHash", "input_files", "output_file")


def numbers(value: Any) -> float:
    if isinstance(value, bool):
        return 0.0
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, dict):
        return sum(numbers(v) for _, v in sorted(value.items()))
    if isinstance(value, list):
        return sum(numbers(v) for v in value)
    return 0.0


def failure_reason(value: Any) -> str | None:
    if isinstance(value, dict):
        if isinstance(value.get("emulator_fail"), str):
            return value["emulator_fail"]
        return next((r for v in value.values() if (r := failure_reason(v))), None)
    return None


def compute(calculation: str, inputs: dict[str, Any]) -> dict[str, Any]:
    canonical = json.dumps(inputs, sort_keys=True, separators=(",", ":"))
    return {"calculation": calculation, "value": round(sum(numbers(inputs[p]) for p in sorted(inputs)), 6),
            "inputs": sorted(inputs), "input_digest": hashlib.sha256(canonical.encode()).hexdigest()}


class Calculator(ConsumerMixin):  # type: ignore[misc]
    def __init__(self, connection: Connection, settings: Settings, seconds: float = 0.0) -> None:
        self.connection = connection
        self.settings = settings
        self.seconds = seconds
        self.handled = 0

    def get_consumers(self, Consumer: Any, channel: Any) -> list[Any]:
        return [Consumer(queues=[task_queue(self.settings)], on_message=self.on_message, prefetch_count=1)]

    def reply(self, message: Any, body: dict[str, Any]) -> None:
        reply_to = message.properties.get("reply_to") or BalanceSettings.from_settings(self.settings).calculation_results_queue
        replies = results_queue(self.settings)
        with Connection(self.settings.broker_url) as conn:
            Producer(conn).publish(
                json.dumps(body), exchange=Exchange(reply_to, type="direct", durable=True), routing_key=reply_to,
                declare=[replies], serializer=None, content_type="application/json", content_encoding="utf-8",
                delivery_mode=2, correlation_id=body.get("correlationId"), retry=True)

    def on_message(self, message: Any) -> None:
        try:
            task = json.loads(message.body)
        except ValueError:
            log.error("task is not JSON; dropped")
            message.ack()
            return
        missing = [k for k in REQUIRED if k not in task] if isinstance(task, dict) else list(REQUIRED)
        cid = task.get("correlationId") if isinstance(task, dict) else None
        if missing:
            log.error("task %s lacks %s; answered failed", cid, missing)
            if cid:
                self.reply(message, {"version": CONTRACT_VERSION, "correlationId": cid, "status": "failed",
                                     "outputCommit": None, "error": f"task lacks {', '.join(missing)}"})
            message.ack()
            return
        calculation = (message.delivery_info.get("routing_key") or "calculation.generic").split(".", 1)[-1]
        try:
            result = self.calculate(task, calculation)
        except Exception as exc:  # the repository is down: leave the task for a later delivery
            log.warning("task %s not done (%s); requeued", cid, exc)
            time.sleep(1.0)
            message.requeue()
            return
        self.reply(message, result)
        self.handled += 1
        message.ack()

    def calculate(self, task: dict[str, Any], calculation: str) -> dict[str, Any]:
        cid = task["correlationId"]
        repo = open_repository(self.settings)
        project = project_from_repo_url(task["repoUrl"], self.settings)
        key = f"calculation:{cid}"

        def answer(status: str, commit: str | None = None, error: str | None = None) -> dict[str, Any]:
            return {"version": CONTRACT_VERSION, "correlationId": cid, "status": status, "outputCommit": commit,
                    "error": error}

        done = repo.find_commit(project, task["branch"], key)
        if done is not None:
            return answer("succeeded", done)  # a redelivered task: the same answer
        if self.seconds:
            time.sleep(self.seconds)
        inputs: dict[str, Any] = {}
        for path in task["input_files"]:
            found = repo.read_file(project, path, task["commitHash"])
            if isinstance(found, FileMissing):
                return answer("failed", error=f"{path} not found at {task['commitHash']}")
            try:
                inputs[path] = json.loads(found.text)
            except ValueError:
                return answer("failed", error=f"{path} is not JSON")
        reason = failure_reason(inputs)
        if reason:
            return answer("failed", error=reason)
        output = json.dumps(compute(calculation, inputs), indent=2, sort_keys=True) + "\n"
        try:
            commit = commit_once(repo, project, task["branch"], {task["output_file"]: output},
                                 f"{calculation} calculation: {task['output_file']}", key)
        except InvalidInput as exc:  # the repository refuses the output's name (a file in its way)
            return answer("failed", error=f"output not committed: {exc.problem}")
        except UpstreamError as exc:
            if exc.retryable:
                raise  # GitLab is down: requeued
            return answer("failed", error=f"output not committed: {exc}")
        effects.record("calculation", cid, commit.sha)
        return answer("succeeded", commit.sha)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m emulators.calculator", description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=1.0, help="time one calculation takes")
    args = parser.parse_args(argv)
    settings = load_settings()
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s calculator: %(message)s")
    shorten_retry_tracebacks()
    prepare_embedded_calculation_queues(settings)  # `make run` starts this beside the product's processes
    with Connection(settings.broker_url, heartbeat=10) as conn:
        worker = Calculator(conn, settings, args.seconds)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: setattr(worker, "should_stop", True))
        log.info("calculation worker on queue %s", BalanceSettings.from_settings(settings).calculation_exchange)
        worker.run()
    return 0


if __name__ == "__main__":
    threading.current_thread().name = "calculator"
    raise SystemExit(main())
