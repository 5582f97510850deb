"""What real processes write with LOG_FORMAT=json: every line, from start-up to a clean stop, is a
JSON object a log pipeline can read (README, "Logs"); and a misspelt variable is named at start-up
(README, "Configuration")."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import requests
from conftest import ROOT, Process, embedded, wait_for
from orchestrator.entrypoints.ports import free_port

KEYS = {"ts", "level", "logger", "service", "pid", "process", "message"}


def not_json_objects(text: str) -> list[str]:
    """The lines of `text` that are not a JSON object with every key of a log line (KEYS)."""
    bad = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            bad.append(line)
            continue
        if not isinstance(record, dict) or not KEYS <= record.keys():
            bad.append(line)
    return bad


def messages(text: str) -> list[str]:
    return [json.loads(line)["message"] for line in text.splitlines()]


def test_every_line_the_worker_and_the_api_write_is_a_json_object(env, rt):
    # INFO, as an operator runs them; a misspelt variable to see it named once per process, not
    # once more by each pool process or gunicorn worker
    json_env = {**env, "LOG_FORMAT": "json", "LOG_LEVEL": "INFO", "SWEEP_INTERVL": "5"}
    name = f"jsonlines{uuid.uuid4().hex[:6]}"
    worker = Process(name, ["worker", "--concurrency", "2", "--name", f"{name}@%h"], json_env).start()
    port = free_port()
    api = Process("api-json", ["api", "--port", str(port), "--host", "127.0.0.1", "--workers", "2", "--access-log"],
                  json_env).start()
    try:
        wait_for(lambda: any(k.startswith(f"{name}@") for r in rt.celery.control.ping(timeout=0.5) for k in r),
                 timeout=60, what="the worker to answer ping")

        def answers() -> bool:
            try:
                return requests.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200
            except requests.RequestException:
                return False

        wait_for(answers, timeout=60, interval=0.2, what="the API")
        assert requests.get(f"http://127.0.0.1:{port}/no-such-route", timeout=5).status_code == 404
    finally:
        # SIGTERM to every process of each (as systemd stops a unit): the shutdown lines too
        worker.stop()
        api.stop()
    assert worker.output().strip() and api.output().strip()
    not_json = {proc.name: not_json_objects(proc.output()) for proc in (worker, api)}
    assert not_json == {worker.name: [], api.name: []}
    for proc in (worker, api):
        said = messages(proc.output())
        assert said.count("SWEEP_INTERVL is not a setting; did you mean SWEEP_INTERVAL?") == 1, said
    # each line says which process wrote it: every one of them said "MainProcess"
    for proc, service in ((worker, "worker"), (api, "api")):
        lines = [json.loads(line) for line in proc.output().splitlines()]
        assert {line["service"] for line in lines} == {service}, proc.name
        assert all(isinstance(line["pid"], int) for line in lines), proc.name
    worker_said, api_said = messages(worker.output()), messages(api.output())
    # what Celery and gunicorn used to print past logging, now as log lines
    assert "worker: Warm shutdown (MainProcess)" in worker_said
    assert any(m.startswith("Listening at: http://127.0.0.1:") for m in api_said), api_said
    assert any('"GET /no-such-route HTTP/1.1" 404' in m for m in api_said), api_said  # the access log


def test_warnings_and_uncaught_errors_are_json_lines_too(tmp_path):
    script = ("import logging, threading, warnings\n"
              "from orchestrator.logs import configure\n"
              "configure('INFO', 'json')\n"
              "warnings.warn('careful', UserWarning)\n"
              "t = threading.Thread(target=lambda: 1 / 0, name='helper'); t.start(); t.join()\n"
              "raise RuntimeError('boom')\n")
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 1
    assert out.stdout == "" and not_json_objects(out.stderr) == [], out.stderr
    lines = [json.loads(line) for line in out.stderr.splitlines()]
    assert [(line["level"], line["logger"]) for line in lines] == [
        ("WARNING", "py.warnings"), ("ERROR", "orchestrator"), ("CRITICAL", "orchestrator")], lines
    assert "UserWarning: careful" in lines[0]["message"]
    assert "helper" in lines[1]["message"] and "ZeroDivisionError" in lines[1]["exc"]
    assert lines[2]["message"] == "uncaught RuntimeError: boom" and "Traceback" in lines[2]["exc"]


def test_a_misspelt_variable_is_named_at_start_up_with_the_setting_it_resembles(tmp_path):
    env = {**os.environ, **embedded(tmp_path), "LOG_FORMAT": "json", "PYTHONPATH": str(ROOT),
           "DATABSE_URL": "postgresql://nobody@127.0.0.1:1/x", "CELERY_BROKER_ULR": "amqp://x", "log_level": "debug",
           "CHAT_HEARTBEAT_SECOND": "8", "HOME": str(tmp_path), "PATH": os.environ["PATH"], "POSTGRES_DB": "orchestrator"}
    out = subprocess.run([sys.executable, "-m", "orchestrator.entrypoints.cli", "db", "upgrade"], env=env,
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    warnings = [line["message"] for line in map(json.loads, out.stderr.splitlines()) if line["level"] == "WARNING"]
    assert warnings == ["CELERY_BROKER_ULR is not a setting; did you mean CELERY_BROKER_URL?",
                        # a workflow's own setting (sagas/chat/settings.py) too
                        "CHAT_HEARTBEAT_SECOND is not a setting; did you mean CHAT_HEARTBEAT_SECONDS?",
                        "DATABSE_URL is not a setting; did you mean DATABASE_URL?",
                        "log_level is not a setting; did you mean LOG_LEVEL?"], out.stderr
