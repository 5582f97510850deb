"""The seeded small fault-injection run (bench/chaos, docs/reliability.md) as one test: every
fault kind at least once over a mixed load of every built-in workflow, real processes started by
the CLI, private PostgreSQL, RabbitMQ, Redis and Kafka broker. Nothing may be lost or done twice."""
from __future__ import annotations

import json
import subprocess
import sys

from conftest import ROOT


def test_small_seeded_run_loses_nothing_and_duplicates_nothing(tmp_path):
    out = tmp_path / "result.json"
    run = subprocess.run([sys.executable, "-m", "bench.chaos", "--small", "--seed", "7", "--json", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    print(run.stdout[-6000:], run.stderr[-4000:])
    result = json.loads(out.read_text())
    assert all(n >= 1 for n in result["faults"].values()), result["faults"]
    assert all(n >= 1 for n in result["started"].values()), result["started"]
    assert sum(result["lost"].values()) == 0, result["lost_examples"]
    assert sum(result["duplicated"].values()) == 0, result["duplicate_examples"]
    assert result["not_started"] == 0, result["errors"]
    assert run.returncode == 0, run.stdout[-3000:]
