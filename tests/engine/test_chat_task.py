"""A chat task's lifecycle on the in-process engine: its execution is one external step keyed by
the task id, declared on queued, running and streaming, so the callbacks move the task between
them while the step waits; the final callback completes the step."""
from __future__ import annotations

from orchestrator.engine import ACCEPTED, DUPLICATE
from sagas.chat import TASK_TYPE


def start(inproc):
    snap, _ = inproc.engine.start(TASK_TYPE, {"session_id": "s-1", "message": "hi", "config": {}})
    return snap["id"]


def test_the_request_carries_the_task_id_and_the_callbacks_drive_one_step(inproc):
    task_id = start(inproc)
    [row] = [r for r in inproc.outbox.rows if r.target == "execution.chat_task"]
    assert row.key == "s-1" and row.payload["task"][1][0]["task_id"] == task_id
    inproc.engine.fire(task_id, "start")
    inproc.engine.fire(task_id, "stream")
    step = inproc.step(task_id, "execute")
    assert step["status"] == "waiting" and step["restarts"] == 0  # moved with the states, not re-entered
    assert len([r for r in inproc.outbox.rows if r.target == "execution.chat_task"]) == 1
    assert inproc.engine.complete_external(task_id, True, {"result": {"text": "hello"}}) == ACCEPTED
    assert inproc.engine.complete_external(task_id, True, {"result": {"text": "again"}}) == DUPLICATE
    snap = inproc.engine.snapshot(task_id)
    assert snap["state"] == "completed" and snap["context"]["result"] == {"text": "hello"}
    assert [h["to"] for h in snap["history"]] == ["queued", "running", "streaming", "completed"]


def test_an_error_answer_fails_the_task_and_the_deadline_times_it_out(inproc):
    failed = start(inproc)
    inproc.engine.fire(failed, "start")
    inproc.engine.complete_external(failed, True, {"error": {"code": "boom"}})
    assert inproc.engine.snapshot(failed)["state"] == "failed"
    late = start(inproc)
    inproc.engine.fire(late, "start")
    inproc.fire_timers("expire")
    snap = inproc.engine.snapshot(late)
    assert snap["state"] == "timed_out" and "timed out" in snap["context"]["error"]
    assert inproc.outbox.sent("celery", "chat.task_timed_out")
