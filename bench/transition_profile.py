"""CPU per workflow of the engine's own path, in one process: `bench` workflows (start and three
step hops) on a temporary SQLite database with the in-process step runner of the engine tests,
under cProfile. No broker, worker or PostgreSQL: what is left is the engine's Python.

    .venv/bin/python -m bench.transition_profile [--n 300] [--machine]

`--machine` sends every transition through a python-statemachine instance, as the engine did
before the per-class transition table (orchestrator.workflow.transition_table), for a before /
after comparison in the same hour. Prints CPU ms per workflow (profiler on), the total function
calls, the library's own time, and the top lines by own time.
"""
from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=300, help="workflows to run (300)")
    p.add_argument("--machine", action="store_true", help="every transition through a statemachine instance")
    args = p.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    import bench.workflow  # noqa: F401  (registers the workflow and its tasks)
    from engine.inprocess import InProcess  # the engine tests' in-process runner
    from orchestrator import engine

    if args.machine:
        engine.transition_table = lambda cls: {}  # type: ignore[assignment]
        engine.initial_entry = lambda cls: None  # type: ignore[assignment]
    ip = InProcess(os.path.join(tempfile.mkdtemp(), "engine.db"))
    ip.engine.start("bench", {})  # warm: statements prepared, classes loaded
    ip.run()
    prof = cProfile.Profile()
    started = time.process_time()
    prof.enable()
    for i in range(args.n):
        ip.engine.start("bench", {"i": i})
        ip.run()
    prof.disable()
    cpu = time.process_time() - started
    stats = pstats.Stats(prof)
    own = [(k, v) for k, v in stats.stats.items() if f"{os.sep}statemachine{os.sep}" in k[0]]  # type: ignore[attr-defined]
    print(f"{args.n} workflows: {cpu / args.n * 1000:.2f} ms CPU per workflow (profiler on), "
          f"{stats.total_calls} function calls, python-statemachine {sum(v[2] for _, v in own):.3f} s "  # type: ignore[attr-defined]
          f"in {sum(v[1] for _, v in own)} calls")
    stats.sort_stats("tottime").print_stats(8)


if __name__ == "__main__":
    main()
