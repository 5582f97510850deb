"""Secrets never leak: a whole `orchestrator dev` (every process, real ports of its own) runs with
distinctive values for every secret it knows — ADMIN_TOKEN, GITLAB_TOKEN, the passwords in
DATABASE_URL, CELERY_BROKER_URL and REDIS_URL, CONSOLE_BASIC_AUTH and FLOWER_BASIC_AUTH — is used
(a pipeline, a chat task, GitLab reads, admin calls, bad input, wrong logins, readiness), and
none of the values appears in any log line or any answer (body or header)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Iterator

import pytest
import requests
from conftest import ROOT, fresh_database, terminate, wait_for
from orchestrator.entrypoints.ports import free_port

SECRETS = {
    "ADMIN_TOKEN": "adm-7Qx1-SECRET-token",
    "GITLAB_TOKEN": "glpat-9Zr4-SECRET-token",
    "db": "pg-3Kd8-SECRET-pass",
    "mq": "mq-5Tn2-SECRET-pass",
    "redis": "rd-8Wm6-SECRET-pass",
    "console": "con-2Hb7-SECRET-pass",
    "flower": "flw-6Jc3-SECRET-pass",
}


def rabbitmqctl(*args: str) -> None:
    subprocess.run([shutil.which("rabbitmqctl") or "rabbitmqctl", *args], check=True, capture_output=True, timeout=60)


@pytest.fixture
def broker_with_password() -> Iterator[str]:
    """A RabbitMQ user and vhost of their own, the user's password one of the secrets."""
    name = f"orch-secret-{uuid.uuid4().hex[:6]}"
    rabbitmqctl("add_vhost", name)
    rabbitmqctl("add_user", name, SECRETS["mq"])
    rabbitmqctl("set_permissions", "-p", name, name, ".*", ".*", ".*")
    yield f"amqp://{name}:{SECRETS['mq']}@127.0.0.1:5672/{name}"
    rabbitmqctl("delete_vhost", name)
    rabbitmqctl("delete_user", name)


@pytest.fixture
def redis_with_password(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A private Redis that requires a password (the shared one has none)."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    port = free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--requirepass",
                             SECRETS["redis"], "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        import redis

        wait_for(lambda: redis.Redis(port=port, password=SECRETS["redis"]).ping(), timeout=20, what="redis")
        yield f"redis://:{SECRETS['redis']}@127.0.0.1:{port}/0", proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(10)


def test_no_secret_in_any_log_or_answer_of_a_full_run(tmp_path, broker_with_password, redis_with_password):
    with fresh_database() as url:
        database = url.replace("postgres@", f"postgres:{SECRETS['db']}@")  # trust: any password is accepted
        run(tmp_path, database, broker_with_password, *redis_with_password)


def run(tmp_path: Path, database: str, broker: str, redis_url: str, redis_proc: subprocess.Popen[bytes]) -> None:
    port, flower, gitlab = free_port(), free_port(), free_port()
    emulator_base = free_port()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("CELERY_", "DATABASE_", "POSTGRES_", "REDIS_", "VIDEO_", "AUDIO_", "GITLAB_"))}
    env.update(PORT=str(port), HOST="127.0.0.1", POLL_INTERVAL="0.3", SWEEP_INTERVAL="0.2", EMULATOR_JOB_SECONDS="0.3",
               LOG_LEVEL="INFO", PYTHONPATH=str(ROOT), DATABASE_URL=database, CELERY_BROKER_URL=broker,
               REDIS_URL=redis_url, CELERY_RESULT_BACKEND=redis_url, ADMIN_TOKEN=SECRETS["ADMIN_TOKEN"],
               GITLAB_TOKEN=SECRETS["GITLAB_TOKEN"], GITLAB_URL=f"http://127.0.0.1:{gitlab}",
               GITLAB_EMULATOR_PORT=str(gitlab), CONSOLE_BASIC_AUTH=f"operator:{SECRETS['console']}",
               FLOWER_BASIC_AUTH=f"flower:{SECRETS['flower']}")
    log_path = tmp_path / "dev.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "orchestrator.entrypoints.cli", "dev", "--flower-port",
                                 str(flower), "--concurrency", "2", "--api-workers", "1", "--emulator-port",
                                 str(emulator_base), "--kafka-port", "0"],
                                cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    answers: list[requests.Response] = []

    def http(method: str, path: str, root: str = base, **kwargs: object) -> requests.Response:
        r = requests.request(method, root + path, timeout=30, **kwargs)  # type: ignore[arg-type]
        answers.append(r)
        return r

    admin = {"X-Admin-Token": SECRETS["ADMIN_TOKEN"]}
    try:
        def up() -> bool:
            try:
                return requests.get(f"{base}/readyz", timeout=5).status_code == 200
            except requests.RequestException:
                return False

        wait_for(up, timeout=150, interval=0.5, what="dev to be ready")
        # work: a pipeline, a chat task, GitLab reads
        job = http("POST", "/pipeline", json={"youtube_url": f"https://www.youtube.com/watch?v={uuid.uuid4().hex[:11]}"})
        assert job.status_code == 200, job.text
        session = http("POST", "/api/v1/chat/init", json={}).json()["session_id"]
        task = http("POST", f"/api/v1/chat/{session}/task", json={"message": "hello"})
        assert task.status_code == 202, task.text
        assert http("GET", "/geometries", params={"project": "demo/balance"}).status_code < 500
        assert http("GET", "/geometries", params={"project": "nobody/nothing"}).status_code == 404
        # error paths: bad input, unknown things, wrong and missing credentials
        assert http("POST", "/pipeline", data="{", headers={"Content-Type": "application/json"}).status_code == 400
        assert http("GET", f"/sagas/{uuid.uuid4()}").status_code == 404
        assert http("GET", "/admin/stats").status_code == 401
        assert http("GET", "/admin/stats", headers={"X-Admin-Token": "wrong"}).status_code == 403
        assert http("GET", "/ui/", auth=("operator", "wrong")).status_code == 401
        assert http("GET", "/", root=f"http://127.0.0.1:{flower}", auth=("flower", "wrong")).status_code == 401
        # the admin's and operators' own calls, with the secrets sent
        stats = http("GET", "/admin/stats", headers=admin)
        assert stats.status_code == 200, stats.text
        assert http("GET", "/ui/", auth=("operator", SECRETS["console"])).status_code == 200
        assert http("GET", "/api/workers", root=f"http://127.0.0.1:{flower}",
                    auth=("flower", SECRETS["flower"])).status_code == 200
        assert http("POST", "/sagas/bulk", headers=admin,
                    json={"action": "cancel", "filter": {"type": "media"}, "dry_run": True}).status_code == 200
        ready = http("GET", "/readyz")
        assert ready.status_code == 200 and "***" in ready.json()["dependencies"]["database"]["address"], ready.text
        http("GET", "/health/detailed")
        http("GET", "/metrics")
        http("GET", "/openapi.json")
        done = wait_for(lambda: (lambda j: j if j["status"] in ("completed", "failed") else None)(
            http("GET", f"/jobs/{job.json()['job_id']}").json()), timeout=120, what="the pipeline")
        assert done["status"] == "completed", done
        wait_for(lambda: http("GET", f"/api/v1/chat/{session}/tasks/{task.json()['task_id']}").json()
                 .get("status") in ("completed", "failed"), timeout=60, what="the chat task")
        # a service going away: the processes that use it log their errors, /readyz names it
        redis_proc.terminate()
        redis_proc.wait(10)
        wait_for(lambda: "Redis unavailable" in log_path.read_text(errors="replace"), timeout=30,
                 what="the chat consumers to log the outage")
        down = http("GET", "/readyz")
        assert down.status_code == 503 and "redis" in down.json()["down"], down.text
        http("POST", "/api/v1/chat/init", json={})
    finally:
        code = terminate(proc, timeout=90)
    logs = log_path.read_text(errors="replace")
    assert "orchestrator dev: API" in logs and code == 0, logs[-3000:]
    for name, secret in SECRETS.items():
        assert secret not in logs, (name, [line for line in logs.splitlines() if secret in line][:5])
        for r in answers:
            assert secret not in r.text and secret not in str(r.headers), (name, r.request.method, r.url, r.text[:500])
    # passwords are shown masked where an address is shown
    assert "***@127.0.0.1" in logs or "**@127.0.0.1" in logs
