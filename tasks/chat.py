"""Chat tasks run by our own workers. The chat answer itself is the execution service's work."""
from __future__ import annotations

from celery import shared_task


@shared_task(name="chat.task_timed_out", acks_late=True, reject_on_worker_lost=False)
def task_timed_out(task_id: str) -> str:
    """Tell the session's sockets that the sweeper timed the task out (idempotent). A pool process
    lost while notifying drops the notice rather than requeueing it for ever: the task's state is
    in the store either way."""
    # Imported here: the Redis client costs every worker process memory that only this task uses.
    from sagas.chat import live as chat_live

    session_id, frames = chat_live.store().timed_out_frames(task_id)
    chat_live.publish(session_id, frames)
    return "notified" if frames else "skipped"
