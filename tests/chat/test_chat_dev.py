"""`orchestrator dev` on embedded defaults (SQLite, a server-less broker) serves the chat page and
answers a message over the WebSocket through the execution emulator it starts."""
from __future__ import annotations

import os
import subprocess
import sys
import uuid

import pytest
import requests
import websocket
from orchestrator.entrypoints.ports import free_port
from chat_support import expected_answer, read_frames, result_of, wait_http, ws_url
from conftest import ROOT, terminate

pytestmark = pytest.mark.e2e


def test_dev_serves_the_chat_page_and_answers(tmp_path):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("CELERY_", "DATABASE_", "POSTGRES_", "REDIS_", "VIDEO_", "AUDIO_", "CHAT_",
                                "EXECUTION_"))}
    port, flower = free_port(), free_port()
    env.update(PORT=str(port), HOST="127.0.0.1", SWEEP_INTERVAL="0.2", LOG_LEVEL="WARNING", PYTHONPATH=str(ROOT),
               FLOWER_BASIC_AUTH="admin:secret", CHAT_CONSUMER_ID=f"dev-{uuid.uuid4().hex[:8]}",
               GITLAB_EMULATOR_PORT=str(free_port()))  # dev refuses a port in use: none of its fixed ones
    # The media emulators are not needed here (and their fixed ports may be taken): name URLs.
    for name in ("VIDEO_DOWNLOADER_URL", "AUDIO_NORMALIZATION_URL", "AUDIO_TRANSCRIBER_URL"):
        env[name] = f"http://127.0.0.1:{free_port()}"
    log = (tmp_path / "dev.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.entrypoints.cli", "dev", "--flower-port", str(flower),
                             "--concurrency", "1", "--kafka-port", "0"], cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{base}/healthz", timeout=90)
        page = requests.get(f"{base}/chat", timeout=10)
        assert page.status_code == 200 and "/ws/chat/" in page.text
        r = requests.post(f"{base}/api/v1/chat/init", timeout=10)
        assert r.status_code == 201, r.text
        sid = r.json()["session_id"]
        ws = websocket.create_connection(ws_url(base, sid), timeout=30)
        try:
            r = requests.post(f"{base}/api/v1/chat/{sid}/task", json={"message": "hello dev"}, timeout=10)
            assert r.status_code == 202, r.text
            frames = read_frames(ws, result_of(r.json()["task_id"]), timeout=60)
        finally:
            ws.close()
        assert frames[-1]["type"] == "result", (tmp_path / "dev.log").read_text()[-3000:]
        assert frames[-1]["data"]["text"] == expected_answer("hello dev")
        assert len([f for f in frames if f["type"] == "chunk"]) == 3
    finally:
        code = terminate(proc)
    assert code == 0, (tmp_path / "dev.log").read_text()[-3000:]
