"""The Kafka figures of `make bench` (bench.run.kafka_rows over bench/kafka_intake.py) at a tiny
size, on the bundled broker and PostgreSQL: the bridge's intake beside the raw consume rate, and
the outbox relay's produce rate with how far it ends behind the bridge, each judged. No figure
is checked (timings are not asserted)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
from bench.run import kafka_rows
from bench.table import render
print(render(kafka_rows(40)))
"""


def test_the_kafka_rows_print_the_bridge_intake_and_the_relay_behind_it():
    env = {**os.environ,
           "BENCH_PG_ADMIN_URL": os.environ.get("TEST_PG_ADMIN_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/test")}
    run = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=240)
    assert run.returncode == 0, run.stderr[-4000:]
    assert "outbox relay produce" in run.stdout, run.stdout
    table = run.stdout[run.stdout.index("| figure"):].splitlines()
    rows = {cells[0].strip(): [c.strip() for c in cells] for cells in (line.split("|")[1:-1] for line in table[2:])}
    intake, relay = rows["Kafka intake (one bridge)"], rows["Kafka: outbox relay behind the bridge"]
    assert intake[1].endswith("events/s") and intake[2].startswith("raw consume") and intake[5] in ("yes", "NO")
    assert relay[1].endswith("s behind") and relay[2].startswith("relay ") and relay[5] in ("yes", "NO"), relay
