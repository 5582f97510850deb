"""Processes that start together on new embedded files, as `make run` starts them on a new
`data/`: none of them may lose a race over who creates the files' tables.

kombu's SQLAlchemy transport used to create its tables and each queue's row lazily, in every
process: two processes first using a new broker.db at once failed with "table kombu_queue
already exists" or a UNIQUE failure on kombu_queue.name. A worker that lost stopped
("Unrecoverable error: IntegrityError"; CI met it as a step-message test waiting 90 s for a
worker that had died), and a publisher's session stayed unusable. Switching a new SQLite file
to WAL failed the same way ("database is locked", at once rather than after the busy timeout)."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time

from sqlalchemy import create_engine, text

from conftest import ROOT, embedded

QUEUES = ("default", "engine", "media")

#: One process: builds its runtime at the agreed instant, then publishes one message per queue
#: and reads the state database, each through a connection of its own.
PROCESS = textwrap.dedent("""
    import json, sys, time
    from orchestrator import runtime
    from orchestrator.config import load_settings
    from sqlalchemy import text
    settings = load_settings(environ=json.loads(sys.argv[1]), dotenv="/nonexistent")
    time.sleep(max(0.0, float(sys.argv[2]) - time.time()))
    rt = runtime.build(settings)
    for queue in sys.argv[3].split(","):
        rt.celery.send_task(f"probe.{queue}", queue=queue)
    with rt.db.connect() as conn:
        conn.execute(text("SELECT 1"))
    print("ok")
""")


def broker_rows(tmp_path) -> tuple[list[str], int, str]:
    """(the queue rows' names, the number of messages, the journal mode) of the broker file."""
    db = create_engine(f"sqlite:///{tmp_path}/broker.db")
    try:
        with db.connect() as conn:
            names = sorted(conn.execute(text("SELECT name FROM kombu_queue")).scalars())
            messages = conn.execute(text("SELECT count(*) FROM kombu_message")).scalar_one()
            mode = conn.execute(text("PRAGMA journal_mode")).scalar_one()
            return names, messages, mode
    finally:
        db.dispose()


def test_a_runtime_built_on_a_new_embedded_broker_creates_its_tables_and_queues(tmp_path):
    """Before anything is published or consumed, so no process has to create them later."""
    from orchestrator import runtime
    from orchestrator.config import load_settings

    rt = runtime.build(load_settings(environ=embedded(tmp_path), dotenv="/nonexistent"))
    try:
        names, messages, mode = broker_rows(tmp_path)
        assert set(QUEUES) <= set(names) and len(names) == len(set(names)), names
        assert (messages, mode) == (0, "wal")
        # the worker's consumer finds its queues: nothing for it to insert
        with rt.celery.connection_for_read() as conn:
            assert all(conn.default_channel.queue_declare(queue=q, passive=True) for q in QUEUES)
    finally:
        rt.db.dispose()


def test_processes_starting_at_once_on_new_embedded_files_all_publish(tmp_path):
    env = {**embedded(tmp_path), "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    count = 6
    at = time.time() + 6.0  # after every process has imported what it needs
    procs = [subprocess.Popen([sys.executable, "-c", PROCESS, json.dumps(env), str(at), ",".join(QUEUES)],
                              cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(count)]
    outcomes = [p.communicate(timeout=120) for p in procs]
    failed = [err[-1500:] for (out, err), p in zip(outcomes, procs) if p.returncode != 0 or "ok" not in out]
    assert not failed, failed
    names, messages, mode = broker_rows(tmp_path)
    assert sorted(set(names)) == names and set(QUEUES) <= set(names), names  # one row per queue
    assert messages == count * len(QUEUES)  # every publish stored
    assert mode == "wal"


def test_the_queues_of_plain_kombu_consumers_are_made_before_they_start(tmp_path):
    """The calculation queues, which only plain kombu clients use (the calculation worker, the
    results consumer, the step that sends a calculation), are made with the others under the
    write lock (`prepare_embedded_calculation_queues`, called by `orchestrator dev` and the
    calculation emulator before they consume): kombu made them lazily in each process, and the
    calculation emulator that lost the race logged a lost connection on `make run`'s first start."""
    from orchestrator import runtime
    from orchestrator.config import load_settings
    from sagas.balance.calculations import prepare_embedded_calculation_queues, results_queue, task_queue

    settings = load_settings(environ=embedded(tmp_path), dotenv="/nonexistent")
    prepare_embedded_calculation_queues(settings)
    app = runtime.make_celery(settings)
    try:
        calculation = [task_queue(settings).name, results_queue(settings).name]
        names, messages, _ = broker_rows(tmp_path)
        assert set(calculation) | set(QUEUES) <= set(names) and len(names) == len(set(names)), names
        with app.connection_for_read() as conn:
            assert all(conn.default_channel.queue_declare(queue=q, passive=True) for q in calculation)
    finally:
        app.close()
