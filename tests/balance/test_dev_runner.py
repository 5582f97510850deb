"""`orchestrator dev` on a bare machine runs the balance saga end to end on the local git backend."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import requests
from orchestrator.entrypoints.ports import free_port
from conftest import ROOT, terminate, wait_for

from sagas.balance.repository import GitRepo

pytestmark = [pytest.mark.e2e]


def test_dev_creates_the_demo_project_and_runs_the_saga(tmp_path):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("CELERY_", "DATABASE_", "POSTGRES_", "REDIS_", "GIT", "CONSOLE_", "ADMIN_"))}
    port = free_port()
    env.update(PORT=str(port), HOST="127.0.0.1", SWEEP_INTERVAL="0.2", LOG_LEVEL="WARNING", PYTHONPATH=str(ROOT),
               FLOWER_BASIC_AUTH="admin:secret", GITLAB_EMULATOR_PORT=str(free_port()),
               # media emulators are not needed here: pointing at a closed port keeps them from starting
               VIDEO_DOWNLOADER_URL="http://127.0.0.1:9", AUDIO_NORMALIZATION_URL="http://127.0.0.1:9",
               AUDIO_TRANSCRIBER_URL="http://127.0.0.1:9")
    log = (tmp_path / "dev.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.entrypoints.cli", "dev", "--flower-port", str(free_port()),
                             "--concurrency", "2", "--api-workers", "1", "--kafka-port", "0"], cwd=tmp_path, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _up(f"{base}/healthz"), timeout=90, what="the dev API")
        # dev serves the operator console with its own login (admin:admin unless told otherwise)
        assert requests.get(f"{base}/ui/", auth=("admin", "admin"), timeout=10).status_code == 200
        assert requests.get(f"{base}/ui/", timeout=10).status_code == 401
        # and the admin operations with its own token, printed at start like the login
        assert requests.get(f"{base}/admin/stats", timeout=10).status_code == 401
        assert requests.get(f"{base}/admin/stats", headers={"X-Admin-Token": "dev-admin-token"},
                            timeout=10).status_code == 200
        demo = GitRepo(tmp_path / "data" / "repos" / "demo" / "balance")
        assert demo.read("main", "balance_input.json") and demo.read("main", "geometries_manifest.json")
        r = requests.post(f"{base}/saga/calculate-balance", timeout=60,
                          json={"project": "demo/balance", "branch": "issue/1", "dependencies": ["condenser"]})
        assert r.status_code == 200 and r.json()["state"] == "AWAIT_USER_CONDENSER_INPUT", r.text
        saga_id = r.json()["saga_id"]
        r = requests.post(f"{base}/sagas/{saga_id}/events/submit_input", timeout=60,
                          json={"step": "CONDENSER", "use_hydrated": True})
        assert r.status_code == 200, r.text
        done = wait_for(lambda: (lambda b: b if b["status"] in ("completed", "failed") else None)(
            requests.get(f"{base}/saga/calculate-balance/{saga_id}", timeout=10).json()), timeout=120,
            interval=0.5, what="the saga")
        assert done["status"] == "completed" and done["result"]["calculation"] == "balance"
        assert demo.read("issue/1", "balance_output.json")
        geo = requests.get(f"{base}/geometries?project=demo/balance", timeout=10).json()
        assert len(geo["geometries"]) == 2
        page = requests.get(f"{base}/ui/sagas/{saga_id}", auth=("admin", "admin"), timeout=10)
        assert page.status_code == 200 and 'data-current="true"' in page.text
    finally:
        print((tmp_path / "dev.log").read_text(errors="replace")[-5000:])  # shown when the test fails
        code = terminate(proc)
    assert code == 0, (tmp_path / "dev.log").read_text()[-3000:]
    time.sleep(0.5)


def _up(url: str) -> bool:
    try:
        return requests.get(url, timeout=1).status_code == 200
    except requests.RequestException:
        return False
