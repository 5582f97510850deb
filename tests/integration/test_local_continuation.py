"""Local continuation: a step whose successor is a task of the same worker runs that successor in
its own delivery (no broker hop). The report that dispatches the successor also claims it, so
its run sends nothing before its step; a crash between that commit and the successor's end is a
failed attempt of the successor, retried, and the workflow completes with each effect once."""
from __future__ import annotations

import uuid
from typing import Any, Iterator

import pytest
from sqlalchemy import event, select, text

from conftest import Process, start_worker, wait_for
from engine_workflows import effects, trio_step
from orchestrator.engine import CLAIMS, LOCAL, OUTBOX, RUNS
from orchestrator.rows import INSTANCES
from orchestrator.steps import Continuation, execute_step


@pytest.fixture(scope="module")
def far_worker(env: dict[str, str], rt: Any) -> Iterator[Process]:
    """A worker that reads only `hops-far`: the last step of `hops` runs there."""
    name = f"far{uuid.uuid4().hex[:6]}"
    proc = Process(name, ["worker", "--concurrency", "1", "--queues", "hops-far", "--name", f"{name}@%h"], env).start()
    wait_for(lambda: any(k.startswith(f"{name}@") for r in rt.celery.control.ping(timeout=0.5) for k in r),
             timeout=60, what=f"worker {name} to answer ping")
    yield proc
    proc.stop()


def _done(client: Any, instance_id: str, timeout: float = 60) -> dict[str, Any]:
    return wait_for(lambda: (lambda s: s if s["state"] == "done" else None)(client.get(f"/sagas/{instance_id}").json),
                    timeout=timeout, what=f"hops {instance_id} to finish")


def _outputs(saga: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {s["name"]: s["data"]["output"] for s in saga["steps"]}


def _effects(instance_id: str) -> dict[str, int]:
    return {k.decode(): int(v) for k, v in effects().hgetall(f"effects:{instance_id}").items()}


def _unsent(rt: Any, instance_id: str) -> int:
    with rt.sessions() as s:
        return s.execute(text("SELECT count(*) FROM outbox WHERE instance_id = :i AND sent_at IS NULL"),
                         {"i": instance_id}).scalar()


def test_successor_runs_in_the_same_delivery_and_another_queue_goes_through_the_broker(
        client, rt, env, sweeper, far_worker):
    near = start_worker(env, rt, f"near{uuid.uuid4().hex[:6]}", concurrency=2)
    try:
        instance_id = client.post("/saga", json={"type": "hops", "input": {}}).json["id"]
        saga = _done(client, instance_id)
    finally:
        near.stop()
    out = _outputs(saga)
    # `next` ran in the delivery of `near` (its message was never published) ...
    assert out["next"]["delivery"] == out["near"]["delivery"], out
    assert out["near"]["worker"].startswith(near.name + "@"), out
    # ... while `far`, a task of another queue, went through the broker to the other worker.
    assert out["far"]["delivery"] != out["near"]["delivery"], out
    assert out["far"]["worker"].startswith(far_worker.name + "@"), out
    assert _effects(instance_id) == {"near": 1, "next": 1, "far": 1}
    # The row `next` ran from counts as sent: the sweeper will not send it again.
    wait_for(lambda: _unsent(rt, instance_id) == 0, timeout=10, what="every outbox row marked sent")
    # It was written on the `local` channel; the others went to the broker.
    with rt.sessions() as session:
        rows = session.execute(text("SELECT target, channel FROM outbox WHERE instance_id = :i ORDER BY id"),
                               {"i": instance_id}).all()
    assert [tuple(r) for r in rows] == [("hops.step", "celery"), ("hops.step", "local"), ("hops.far", "celery")]
    assert [h["event"] for h in saga["history"]] == ["create", "start", "neared", "nexted", "fared"]


def test_worker_killed_between_commit_and_local_successor_completes_once(client, rt, env, sweeper, far_worker):
    victim = start_worker(env, rt, f"victim{uuid.uuid4().hex[:6]}", concurrency=1)
    try:
        instance_id = client.post("/saga", json={"type": "hops", "input": {"die_after": "near"}}).json["id"]
        # `near` kills its whole worker right after its report (which claims `next`) commits.
        assert victim.proc is not None
        victim.proc.wait(60)
    finally:
        victim.kill()
    saga = client.get(f"/sagas/{instance_id}").json
    assert saga["state"] == "next", saga
    assert {s["name"]: s["status"] for s in saga["steps"]} == {"near": "completed", "next": "queued"}
    assert _effects(instance_id) == {"near": 1}
    rescuer = start_worker(env, rt, f"rescuer{uuid.uuid4().hex[:6]}", concurrency=2)
    try:
        saga = _done(client, instance_id)
    finally:
        rescuer.stop()
    # The broker gave the delivery of `near` to the rescuer, which found `next` claimed by the
    # lost worker: its first attempt failed with that worker (it never ran), the second ran.
    assert {s["name"]: s["attempt"] for s in saga["steps"]}["next"] == 2, saga["steps"]
    assert _effects(instance_id) == {"near": 1, "next": 1, "far": 1}
    assert [h["event"] for h in saga["history"]] == ["create", "start", "neared", "nexted", "fared"]
    out = _outputs(saga)
    assert out["next"]["worker"].startswith(rescuer.name + "@"), out



def test_a_worker_told_to_stop_runs_no_successor_itself(client, rt, env, sweeper, far_worker):
    """A worker in its warm shutdown (SIGTERM to its whole process group, as systemd sends it)
    finishes the step it runs and takes no new one: its successor goes through the broker to
    another worker. Before, the stopping worker ran the successors itself (up to
    LOCAL_CONTINUATION_STEPS of them), past a stop timeout set from the longest step."""
    import signal

    stopping = start_worker(env, rt, f"stopping{uuid.uuid4().hex[:6]}", concurrency=1)
    try:
        instance_id = client.post("/saga", json={"type": "hops", "input": {"slow_in": "near"}}).json["id"]
        wait_for(lambda: _effects(instance_id).get("near") == 1, timeout=60, what="near to start")
        stopping.kill(signal.SIGTERM)  # warm shutdown: `near` (3 s) finishes first
    finally:
        stopping.kill()
    saga = client.get(f"/sagas/{instance_id}").json
    assert {s["name"]: s["status"] for s in saga["steps"]}["near"] == "completed", saga
    assert _effects(instance_id) == {"near": 1}, saga  # `next` did not run in the stopping worker
    successor = start_worker(env, rt, f"successor{uuid.uuid4().hex[:6]}", concurrency=1)
    try:
        saga = _done(client, instance_id)
    finally:
        successor.stop()
    assert _effects(instance_id) == {"near": 1, "next": 1, "far": 1}
    out = _outputs(saga)
    assert out["next"]["worker"].startswith(successor.name + "@"), out

def test_on_sqlite_with_the_embedded_broker_only_the_first_step_crosses_the_broker(env, rt, tmp_path):
    """The embedded defaults (`make run`): SQLite state, kombu's SQLite broker. Each `hops`
    instance puts two messages on the broker (its first step, and `far` for the other worker);
    `next` runs in the delivery of `near`."""
    import json

    from sqlalchemy import create_engine

    from conftest import engine_on
    from orchestrator.migrate import upgrade

    url = f"sqlite:///{tmp_path}/orchestrator.db"
    broker = f"sqla+sqlite:///{tmp_path}/broker.db"
    upgrade(url)
    sqlite_env = {**env, "DATABASE_URL": url, "CELERY_BROKER_URL": broker, "LOG_LEVEL": "INFO"}
    procs = [Process(f"lc-near{uuid.uuid4().hex[:4]}", ["worker", "--concurrency", "2", "--name", "lc-near@%h"], sqlite_env).start(),
             Process(f"lc-far{uuid.uuid4().hex[:4]}", ["worker", "--concurrency", "1", "--queues", "hops-far", "--name", "lc-far@%h"],
                     sqlite_env).start(),
             Process("lc-sweeper", ["sweeper"], sqlite_env).start()]
    try:
        with engine_on(rt.settings, url) as engine:
            ids = [engine.start("hops", {})[0]["id"] for _ in range(3)]
            for instance_id in ids:
                wait_for(lambda: engine.snapshot(instance_id, history=False)["state"] == "done", timeout=90,
                         what=f"hops {instance_id} on SQLite")
                out = {s["name"]: s["data"]["output"] for s in engine.snapshot(instance_id)["steps"]}
                assert out["next"]["delivery"] == out["near"]["delivery"] != out["far"]["delivery"], out
                assert _effects(instance_id) == {"near": 1, "next": 1, "far": 1}
    finally:
        for p in procs:
            p.stop()
    db = create_engine(broker.removeprefix("sqla+"))
    try:
        with db.connect() as conn:
            sent = [json.loads(p)["headers"]["task"] for p in conn.execute(text("SELECT payload FROM kombu_message")).scalars()]
    finally:
        db.dispose()
    assert sorted(sent) == sorted(["hops.step", "hops.far"] * 3), sent


def test_local_continuation_steps_0_sends_every_step_through_the_broker(client, rt, env, sweeper, far_worker):
    near = start_worker({**env, "LOCAL_CONTINUATION_STEPS": "0"}, rt, f"bro{uuid.uuid4().hex[:6]}", concurrency=2)
    try:
        instance_id = client.post("/saga", json={"type": "hops", "input": {}}).json["id"]
        saga = _done(client, instance_id)
    finally:
        near.stop()
    out = _outputs(saga)
    assert len({out["near"]["delivery"], out["next"]["delivery"], out["far"]["delivery"]}) == 3, out
    assert _effects(instance_id) == {"near": 1, "next": 1, "far": 1}


@pytest.mark.parametrize("how", ["process", "worker"])
def test_a_local_successor_that_dies_with_its_worker_is_a_failed_attempt_retried_at_once(
        client, rt, env, sweeper, far_worker, how):
    """`next` runs locally in the delivery of `near`, and its pool process (or its whole worker)
    is SIGKILLed during its run. The worker's main process (or the broker, giving the delivery
    of `near` back to another worker) reported `near`, which was done, so `next` waited out its
    lease (STEP_LEASE_SECONDS, 600 s by default). Now `next` is named: its attempt fails and is
    retried by its policy."""
    victim = start_worker(env, rt, f"lost{uuid.uuid4().hex[:6]}", concurrency=1)
    rescuer = None
    try:
        instance_id = client.post("/saga", json={"type": "hops", "input": {"die_in": "next", "die_how": how}}).json["id"]
        if how == "worker":
            assert victim.proc is not None
            victim.proc.wait(60)
            rescuer = start_worker(env, rt, f"rescuer{uuid.uuid4().hex[:6]}", concurrency=2)
        saga = _done(client, instance_id)
    finally:
        victim.kill()
        if rescuer is not None:
            rescuer.stop()
    steps = {s["name"]: s for s in saga["steps"]}
    assert steps["next"]["attempt"] == 2 and steps["next"]["failures"] == 1, steps["next"]
    reporter = victim if how == "process" else rescuer  # the main process, or the one given it back
    assert reporter is not None
    assert f"step next of {instance_id} (attempt 1): " in reporter.log.read_text(), reporter.log.read_text()[-3000:]
    assert _effects(instance_id) == {"near": 1, "next": 2, "far": 1}
    assert [h["event"] for h in saga["history"]].count("nexted") == 1, saga["history"]


def test_a_local_successor_is_claimed_by_the_report_that_dispatches_it(own_engine):
    """The report of `one` dispatches `two`, which its delivery runs itself: that report also
    claims `two` and marks its outbox row sent, and hands it the rows it wrote. So each local
    hop is one transaction, its report, where it was two (a claim with its read, then the
    report), and a step run so sees what a read would have given it. The delivery of `one`
    claims and reads in one statement on PostgreSQL (it was two).

    On PostgreSQL each of those transactions is one statement, run on the autocommit pool as a
    transaction of its own: no BEGIN and no COMMIT round trip around it (the sessions' engine
    begins nothing). On SQLite each report is a transaction of several statements."""
    engine = own_engine
    given = {"text": 'é "q" \\ \n', "list": [1, {"a": [2.5, None, True]}], "big": 2 ** 53 + 1}
    snapshot, _ = engine.start("trio", given)
    instance_id = snapshot["id"]
    step = trio_step.step_function
    continuation = Continuation({"trio.step": step}, 16)
    begins: list[Any] = []
    statements: list[str] = []
    bind = engine.sessions.kw["bind"]
    engines = {bind, engine.reads}

    def on_begin(conn: Any) -> None:
        begins.append(conn)

    def on_statement(conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        if not statement.startswith("PREPARE "):  # once per connection and statement
            statements.append(statement)

    event.listen(bind, "begin", on_begin)
    for e in engines:
        event.listen(e, "before_cursor_execute", on_statement)
    try:
        assert execute_step(engine, "trio.step", step, instance_id, "one", 1, continuation=continuation) == "done"
        first, statements[:], begun = list(statements), [], list(begins)
        continuation.run_successors(engine)
    finally:
        event.remove(bind, "begin", on_begin)
        for e in engines:
            event.remove(e, "before_cursor_execute", on_statement)

    assert not [s for s in statements if s.lstrip().upper().startswith("SELECT")], statements
    if bind.dialect.name == "postgresql":
        assert engine.reads is not bind
        assert len(first) == 2, first  # the claim with its read, the report
        assert len(statements) == 2, statements  # each report is one statement there
        assert begins == [], statements  # ... and a transaction of its own
    else:
        assert len(begins) - len(begun) == 2, statements  # the reports of `two` and `three`, nothing else
    with bind.connect() as conn:
        assert conn.execute(select(INSTANCES.c.state).where(INSTANCES.c.id == instance_id)).scalar() == "done"
        outputs = {name: data["output"] for name, data in conn.execute(
            select(RUNS.c.name, RUNS.c.data).where(RUNS.c.instance_id == instance_id)).all()}
        claims = dict(conn.execute(select(CLAIMS.c.step, CLAIMS.c.dispatch).where(
            CLAIMS.c.instance_id == instance_id)).all())
        local = conn.execute(select(OUTBOX.c.sent_at, OUTBOX.c.publish_attempts).where(
            OUTBOX.c.instance_id == instance_id, OUTBOX.c.channel == LOCAL)).all()
    assert [o["input"] for o in outputs.values()] == [given] * 3, outputs
    assert claims == {name: o["dispatch"] for name, o in outputs.items()}, (claims, outputs)
    assert len(local) == 2 and all(sent is not None and n == 1 for sent, n in local), local
