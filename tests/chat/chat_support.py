"""Chat test helpers: the execution emulator and API processes, a WebSocket client that reads
frames until a task's answer is complete."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest
import requests
import websocket
from conftest import ROOT, Process, wait_for
from orchestrator.entrypoints.ports import free_port

ARTIFACTS = ROOT / "test-artifacts"


def wait_http(url: str, timeout: float = 60) -> None:
    def up() -> bool:
        try:
            return requests.get(url, timeout=1).status_code < 500
        except requests.RequestException:
            return False

    wait_for(up, timeout=timeout, interval=0.2, what=url)


class Emulator(Process):
    """`python -m emulators.execution`, as the dev runner starts it."""

    def start(self) -> "Emulator":
        out = self.log.open("ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "emulators.execution", *self.args], env=self.env,
                                     cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        return self


@pytest.fixture(scope="session")
def chat_env(env: dict[str, str]) -> dict[str, str]:
    return {**env, "CHAT_CONSUMER_ID": f"test-{uuid.uuid4().hex[:8]}", "CHAT_HEARTBEAT_SECONDS": "1",
            "EXECUTION_CHUNKS": "3", "EXECUTION_CHUNK_DELAY": "0.05", "EXECUTION_FAILURE_RATE": "0",
            "CHAT_TASK_TIMEOUT_SECONDS": "60", "API_THREADS": "64"}


@pytest.fixture(scope="session")
def execution(chat_env: dict[str, str], rt: Any) -> Iterator[Emulator]:
    proc = Emulator("execution", ["--concurrency", "32", "--name", f"exec{uuid.uuid4().hex[:6]}@%h"], chat_env).start()
    wait_for(lambda: any(k.startswith("exec") for r in rt.celery.control.ping(timeout=0.5) for k in r)
             or proc.proc.poll() is not None, timeout=60, what="execution emulator")
    assert proc.proc.poll() is None, proc.output()[-3000:]
    yield proc
    proc.stop()


def start_api(env: dict[str, str], name: str = "chat-api", workers: int = 2, **extra: str) -> tuple[Process, str]:
    port = free_port()
    proc = Process(name, ["api", "--port", str(port), "--host", "127.0.0.1", "--workers", str(workers)],
                   {**env, **extra}).start()
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{base}/healthz")
    except AssertionError:
        proc.stop()
        raise AssertionError(proc.output()[-3000:]) from None
    return proc, base


@pytest.fixture(scope="module")
def chat_api(chat_env: dict[str, str], execution: Emulator, sweeper: Any) -> Iterator[str]:
    proc, base = start_api(chat_env)

    def consuming() -> bool:
        try:
            return bool(requests.get(f"{base}/health/detailed", timeout=10).json()["callback_consumers"]["this_process"])
        except requests.RequestException:  # a gunicorn worker still starting on a loaded machine
            return False

    wait_for(consuming, timeout=60, what="a callback consumer")
    yield base
    proc.stop()


def ws_url(base: str, session_id: str, after: int | None = None) -> str:
    url = base.replace("http://", "ws://") + f"/ws/chat/{session_id}"
    return url if after is None else f"{url}?after_seq={after}"


def new_session(base: str, config: dict[str, Any] | None = None) -> str:
    r = requests.post(f"{base}/api/v1/chat/init", json={"config": config or {}}, timeout=10)
    assert r.status_code == 201, r.text
    return r.json()["session_id"]


def send_task(base: str, session_id: str, message: str) -> str:
    r = requests.post(f"{base}/api/v1/chat/{session_id}/task", json={"message": message}, timeout=10)
    assert r.status_code == 202, r.text
    body = r.json()
    assert body["status"] == "queued" and body["session_id"] == session_id
    return body["task_id"]


def read_frames(ws: websocket.WebSocket, until: Any, timeout: float = 30) -> list[dict[str, Any]]:
    """Frames (heartbeats left out) until `until(frame)` is true, within `timeout` seconds."""
    frames: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"no final frame within {timeout}s; got {frames}")
        ws.settimeout(left)
        f = json.loads(ws.recv())
        assert set(f) == {"type", "task_id", "seq", "data"}, f
        if f["type"] == "heartbeat":
            continue
        frames.append(f)
        if until(f):
            return frames


def result_of(task_id: str) -> Any:
    return lambda f: f["task_id"] == task_id and f["type"] in ("result", "error")


def expected_answer(message: str, chunks: int = 3) -> str:
    from emulators.execution import answer

    return "".join(answer(message, chunks))


def save_artifact(name: str, data: bytes) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    path.write_bytes(data)
    return path


__all__ = ["chat_env", "execution", "chat_api", "os"]
