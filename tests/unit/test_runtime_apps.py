"""Each Runtime has a Celery app of its own: a second runtime built in one process (a test, a
benchmark) must not move the first one's publishing and control to its broker, and every app
holds every task with the attributes local continuation and in-process runners look for."""
from __future__ import annotations

from orchestrator import runtime
from orchestrator.config import load_settings
from orchestrator.steps import local_step_tasks


def _built(tmp_path, name, broker):
    env = {"DATABASE_URL": f"sqlite:///{tmp_path}/{name}.db", "CELERY_BROKER_URL": broker,
           "WORKFLOW_MODULES": "sagas,tasks"}
    return runtime.build(load_settings(environ=env, dotenv="/nonexistent"))


def test_a_second_runtime_leaves_the_first_ones_broker_alone(tmp_path):
    first = _built(tmp_path, "a", "amqp://guest:guest@127.0.0.1:5672/first")
    second = _built(tmp_path, "b", "amqp://guest:guest@127.0.0.1:5672/second")
    try:
        assert first.celery is not second.celery
        assert first.celery.conf.broker_url.endswith("/first")
        assert second.celery.conf.broker_url.endswith("/second")
    finally:
        first.db.dispose()
        second.db.dispose()


def test_every_app_knows_the_step_functions_its_worker_may_run_locally(tmp_path):
    rt = _built(tmp_path, "c", "amqp://guest:guest@127.0.0.1:5672/c")
    try:
        local = local_step_tasks(rt.celery)
        assert "media.download" in local and callable(local["media.download"])
        task = rt.celery.tasks["media.download"]
        assert task.reports_to == "step" and task.step_function is local["media.download"]
    finally:
        rt.db.dispose()
