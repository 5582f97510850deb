"""What a worker process loads: every workflow module, but not what only the bridge, the API or
the `celery` command's plugins use, nor Alembic, which only the migrating commands load (docs/performance.md,
"Memory": each module is paid once per pool process)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

PROBE = """
import contextlib, io, json, sys
from orchestrator import runtime
from orchestrator.entrypoints.cli import _celery_worker, _logging
rt = runtime.current()
_logging(rt.settings)  # as the worker starts: its logging, the check of the variables' names
assert runtime.wait_for_services(rt.settings, ("database", "schema"))  # what the worker checks first
with contextlib.redirect_stdout(io.StringIO()) as usage:
    _celery_worker(rt.celery, ["--help"])  # the worker command's own option parsing, then out
assert "--concurrency" in usage.getvalue()
print(json.dumps(sorted(sys.modules)))
"""


def test_worker_loads_the_workflows_but_not_the_bridge_metrics_migrations_or_celery_plugins(tmp_path):
    env = {**os.environ, "DATABASE_URL": f"sqlite:///{tmp_path}/w.db", "WORKFLOW_MODULES": "sagas,tasks",
           "PYTHONPATH": str(ROOT)}
    upgraded = subprocess.run([sys.executable, "-m", "orchestrator.entrypoints.cli", "db", "upgrade"], env=env,
                              cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert upgraded.returncode == 0, upgraded.stderr
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    loaded = set(json.loads(out.stdout.splitlines()[-1]))
    assert {"sagas.route_content", "sagas.worker_deployment", "orchestrator.engine"} <= loaded
    for unwanted in ("prometheus_client", "orchestrator.kafka_bridge", "confluent_kafka", "flask", "web",
                     "flower", "click_repl", "prompt_toolkit", "alembic", "mako"):
        assert unwanted not in loaded, f"a worker process imports {unwanted}"
