"""The DBOS Transact peer: the benchmark's trivial three-step workflow on DBOS, in a process of its own.

`python -m bench.dbos_peer SYSTEM_DATABASE_URL` launches DBOS on that system database (created
by DBOS on launch; the caller drops it), registers the queue `bench` polling every 10 ms, and
then answers one JSON command per line of standard input on its standard output:

    {"op": "throughput", "n": 300, "threads": 4} -> {"rate": workflows/s}
        n workflows enqueued from `threads` threads; first enqueue to the last one's
        `updated_at` (SUCCESS) in DBOS's own workflow_status table;
    {"op": "latency", "n": 30} -> {"ms": [...]}
        one workflow at a time, enqueue to its `updated_at` (SUCCESS) in workflow_status, the
        next enqueued once its result is in (polled every 5 ms);
    {"op": "ping"} -> {"ok": true}

End of input destroys DBOS and exits. Anything else the process prints goes to standard error.
"""
from __future__ import annotations

import json
import os
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from dbos import DBOS, DBOSConfig

QUEUE = "bench"
POLL_SECONDS = 0.01


@DBOS.step()
def one(i: int) -> dict[str, int]:
    return {"n": 1}


@DBOS.step()
def two(i: int) -> dict[str, int]:
    return {"n": 2}


@DBOS.step()
def three(i: int) -> dict[str, int]:
    return {"n": 3}


@DBOS.workflow()
def bench_workflow(i: int) -> dict[str, int]:
    """The same three trivial steps as the engine's `bench` workflow, each checkpointed by DBOS."""
    one(i)
    two(i)
    return three(i)


def throughput(queue: Any, db: Any, n: int, threads: int) -> dict[str, float]:
    import sqlalchemy as sa

    first_ms = time.time() * 1000
    with ThreadPoolExecutor(threads) as pool:
        handles = list(pool.map(lambda i: queue.enqueue(bench_workflow, i), range(n)))
    ids = [h.get_workflow_id() for h in handles]
    for h in handles:
        h.get_result(polling_interval_sec=0.05)
    with db.connect() as conn:
        last_ms, done = conn.execute(sa.text(
            "SELECT max(updated_at), count(*) FROM dbos.workflow_status "
            "WHERE workflow_uuid = ANY(:ids) AND status = 'SUCCESS'"), {"ids": ids}).one()
    if done != n:
        raise RuntimeError(f"{done} of {n} DBOS workflows succeeded")
    return {"rate": n / max(1e-6, (int(last_ms) - first_ms) / 1000)}


def latency(queue: Any, db: Any, n: int) -> dict[str, list[float]]:
    import sqlalchemy as sa

    out = []
    for i in range(n):
        t0_ms = time.time() * 1000
        handle = queue.enqueue(bench_workflow, i)
        handle.get_result(polling_interval_sec=0.005)
        with db.connect() as conn:
            done_ms = conn.execute(sa.text("SELECT updated_at FROM dbos.workflow_status WHERE workflow_uuid = :id"),
                                   {"id": handle.get_workflow_id()}).scalar_one()
        out.append(int(done_ms) - t0_ms)
    return {"ms": out}


def main(argv: list[str]) -> None:
    url = argv[0]
    # The protocol owns the real standard output; DBOS's and anyone's prints go to stderr.
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    config: DBOSConfig = {"name": f"orch-bench-{uuid.uuid4().hex[:6]}", "system_database_url": url,
                          "log_level": "WARNING"}
    DBOS(config=config)
    DBOS.launch()
    import sqlalchemy as sa

    db = sa.create_engine(url, pool_size=1)  # reads DBOS's workflow_status table for the timings
    try:
        queue = DBOS.register_queue(QUEUE, polling_interval_sec=POLL_SECONDS)
        out.write(json.dumps({"ready": True}) + "\n")
        for line in sys.stdin:
            cmd = json.loads(line)
            try:
                if cmd["op"] == "throughput":
                    reply: dict[str, Any] = throughput(queue, db, cmd["n"], cmd.get("threads", 4))
                elif cmd["op"] == "latency":
                    reply = latency(queue, db, cmd["n"])
                else:
                    reply = {"ok": True}
            except Exception as exc:  # reported to the caller, which stops the run with it
                reply = {"error": f"{type(exc).__name__}: {exc}"}
            out.write(json.dumps(reply) + "\n")
    finally:
        db.dispose()
        DBOS.destroy()


if __name__ == "__main__":
    main(sys.argv[1:])
