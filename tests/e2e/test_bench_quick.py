"""`python -m bench.run` end to end at a tiny size: every peer runs (the embedded defaults' too),
and the closing table has every row with its target and verdict. No figure is checked (timings
are not asserted)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.run import ROWS

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]


def test_a_quick_bench_run_ends_with_every_row_of_the_table():
    env = {**os.environ,
           "BENCH_PG_ADMIN_URL": os.environ.get("TEST_PG_ADMIN_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/test"),
           "BENCH_AMQP_URL": os.environ.get("TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672")}
    # The Kafka figures are skipped here: their broker alone takes half a minute to measure.
    run = subprocess.run([sys.executable, "-m", "bench.run", "--quick", "--n", "10", "--latency-n", "3",
                          "--parked", "40", "--kafka-n", "0"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-4000:]
    for peer in ("engine workflow", "raw Celery chain", "hand-rolled upsert chain", "raw chain, plain worker",
                 "DBOS Transact workflow"):
        assert peer in run.stdout
    table = run.stdout[run.stdout.index("| figure"):].splitlines()
    rows = {cells[0].strip(): cells for cells in (line.split("|")[1:-1] for line in table[2:])}
    assert list(rows) == list(ROWS), run.stdout
    for label, cells in rows.items():
        assert cells[5].strip() in ("yes", "NO", "-"), (label, cells)
    assert rows["Kafka intake (one bridge)"][1].strip() == "skipped"
    assert rows["Kafka: outbox relay behind the bridge"][1].strip() == "skipped"
    assert rows["throughput vs DBOS"][5].strip() in ("yes", "NO")  # measured, so judged
    assert rows["embedded defaults: throughput vs raw chain"][1].strip().endswith("/s")  # measured, no target
