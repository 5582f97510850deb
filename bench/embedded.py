"""The engine on `make run`'s embedded defaults: `python -m bench.embedded [--n 200] [--rounds 2]`
(also printed by `make bench`).

SQLite state and kombu's SQLite broker in a temporary folder, one engine worker (prefork,
concurrency 4, queue `bench`) and one sweeper, as `orchestrator dev` runs them. In alternating
rounds, n `bench` workflows (three trivial steps, bench/workflow.py) started from this process,
and n raw Celery chains of the same three tasks on the same worker, broker and result backend;
first start to last completion its store records (the instance's `finished_at`, the last link's
`date_done`). Prints both rates (medians) and their ratio. No target: the embedded broker is for
one machine and development; the issue's figures are on PostgreSQL and RabbitMQ (bench/run.py).
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from .procs import BenchError, Process, note, wait_for
from .workflow import QUEUE


def _env(folder: Path) -> dict[str, str]:
    url = f"sqlite:///{folder}/orchestrator.db"
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("CELERY_", "DATABASE_", "POSTGRES_", "REDIS_", "KAFKA_"))}
    return {**base, "DATABASE_URL": url, "CELERY_BROKER_URL": f"sqla+sqlite:///{folder}/broker.db",
            "CELERY_RESULT_BACKEND": f"db+{url}", "WORKFLOW_MODULES": "sagas,tasks,bench.workflow",
            "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "LOG_LEVEL": "WARNING"}


def measure(n: int = 200, rounds: int = 2) -> dict[str, float]:
    """{"engine": workflows/s, "raw": chains/s} (medians of `rounds` alternating rounds of n).
    Raises BenchError when a round does not finish within its timeout."""
    from sqlalchemy import text

    from orchestrator import runtime
    from orchestrator.config import load_settings
    from orchestrator.migrate import upgrade

    from .run import _utc, raw_chain

    folder = Path(tempfile.mkdtemp(prefix="orch-bench-embedded-"))
    env = _env(folder)
    upgrade(env["DATABASE_URL"])
    rt = runtime.build(load_settings(environ=env, dotenv=os.devnull))
    procs = [Process("worker", ["worker", "--concurrency", "4", "--queues", QUEUE, "--name", "bench-embedded@%h"],
                     env, folder),
             Process("sweeper", ["sweeper"], env, folder)]

    def check() -> None:
        for p in procs:
            if not p.alive():
                raise BenchError(f"the embedded {p.name} exited:\n{p.tail()}")

    def done_count() -> int:
        with rt.db.connect() as conn:
            return int(conn.execute(text("SELECT count(*) FROM workflow_instances WHERE finished")).scalar())

    def engine_round(count: int) -> float:
        target = done_count() + count
        first = datetime.now(timezone.utc)
        for i in range(count):
            rt.engine.start("bench", {"i": i})
        wait_for(lambda: done_count() >= target, timeout=max(60.0, count), interval=0.1,
                 what=f"{count} embedded bench workflows", check=check)
        with rt.db.connect() as conn:
            last = _utc(conn.execute(text("SELECT max(finished_at) FROM workflow_instances")).scalar())
        assert last is not None
        return count / max(1e-6, (last - first).total_seconds())

    def raw_round(count: int) -> float:
        first = datetime.now(timezone.utc)
        results = [raw_chain(rt.celery).apply_async() for _ in range(count)]
        wait_for(lambda: all(r.ready() for r in results), timeout=max(60.0, count), interval=0.2,
                 what=f"{count} embedded raw chains", check=check)
        failed = [r for r in results if not r.successful()]
        if failed:
            raise BenchError(f"{len(failed)} embedded raw chains failed, e.g. {failed[0].result!r}")
        return count / max(1e-6, (max(_utc(r.date_done) for r in results) - first).total_seconds())  # type: ignore[type-var]

    rates: dict[str, list[float]] = {"engine": [], "raw": []}
    try:
        engine_round(5)
        raw_round(5)  # warm: every pool process has its connections and imports
        for r in range(1, rounds + 1):
            for peer, run in (("engine", engine_round), ("raw", raw_round)):
                note(f"(g) embedded round {r}: {peer}, {n} runs ...")
                rates[peer].append(run(n))
                note(f"    {rates[peer][-1]:.1f}/s")
    finally:
        for p in procs:
            p.stop()
        rt.celery.close()
        rt.db.dispose()
        shutil.rmtree(folder, ignore_errors=True)
    return {peer: statistics.median(v) for peer, v in rates.items()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.embedded", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=200, help="runs of each per round (200)")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds; medians (2)")
    args = p.parse_args(argv)
    if args.n < 1 or args.rounds < 1:
        p.error("--n and --rounds must be at least 1")
    started = time.monotonic()
    r = measure(args.n, args.rounds)
    print(f"embedded defaults (SQLite, kombu's SQLite broker): engine {r['engine']:.1f} workflows/s, raw Celery "
          f"chain {r['raw']:.1f}/s ({r['engine'] / r['raw']:.2f}x), measured in {time.monotonic() - started:.0f}s")


if __name__ == "__main__":
    main()
