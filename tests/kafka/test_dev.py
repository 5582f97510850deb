"""`orchestrator dev` as a process: with no Kafka configured it starts the bundled broker, the
bridge and the Kafka emulators; with KAFKA_BROKERS set it runs the emulators against that broker;
a route and a worker go through; a bridge that dies is started again; a second start on the same
./data takes new events as new; a port it cannot have stops it before anything starts; SIGTERM
stops everything, the broker too."""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
import requests
from conftest import ROOT, terminate, wait_for

from orchestrator.entrypoints.ports import free_port

from .conftest import Kafka, key_on_partition_of

pytestmark = pytest.mark.kafka

MARKER = "ORCHESTRATOR_DEV_TEST"


def dev_env(**extra: str) -> dict[str, str]:
    """The environment of a dev run on embedded defaults, its ports free, tagged with a marker
    every child inherits (see `leftovers`)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("CELERY_", "DATABASE_", "POSTGRES_", "REDIS_", "KAFKA_", "GITLAB_"))}
    env.update(PORT=str(free_port()), HOST="127.0.0.1", SWEEP_INTERVAL="0.2", LOG_LEVEL="WARNING",
               PYTHONPATH=str(ROOT), FLOWER_BASIC_AUTH="admin:secret", EMULATOR_TTS_FAILURE_RATE="0",
               EMULATOR_TTS_LATENCY="0.05", EMULATOR_RUNNER_FAILURE_RATE="0",
               GITLAB_EMULATOR_PORT=str(free_port()), **{MARKER: uuid.uuid4().hex},
               # the media emulators are not under test here; keep their fixed ports free
               VIDEO_DOWNLOADER_URL="http://127.0.0.1:9", AUDIO_NORMALIZATION_URL="http://127.0.0.1:9",
               AUDIO_TRANSCRIBER_URL="http://127.0.0.1:9")
    env.update(extra)
    return env


def leftovers(env: dict[str, str]) -> list[int]:
    """PIDs of live processes carrying this run's marker: dev's children, the broker."""
    tag = f"{MARKER}={env[MARKER]}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if tag in environ.split(b"\0") and state != "Z":
            found.append(int(entry.name))
    return found


def kill_leftovers(env: dict[str, str]) -> None:
    for pid in leftovers(env):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class Dev:
    """One `orchestrator dev` process in `cwd`, its output in `log`."""

    def __init__(self, cwd: Path, env: dict[str, str], *flags: str, name: str = "dev") -> None:
        self.env = env
        self.log = cwd / f"{name}-{uuid.uuid4().hex[:4]}.log"
        self.base = f"http://127.0.0.1:{env['PORT']}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "orchestrator.entrypoints.cli", "dev", "--flower-port", str(free_port()), "--concurrency", "1",
             "--api-workers", "1", "--kafka-port", "0", *flags], cwd=cwd, env=env,
            stdout=self.log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def brokers(self) -> str:
        return wait_for(lambda: (re.search(r"Kafka (\S+?:\d+)", self.output()) or [None, None])[1], timeout=150,
                        what="dev to start")

    def pids(self) -> dict[str, int]:
        line = wait_for(lambda: (re.search(r"orchestrator dev: pids (.*)", self.output()) or [None, None])[1],
                        timeout=150, what="dev to list its children")
        return {name: int(pid) for name, pid in (item.split("=") for item in line.split(", "))}

    def wait_ready(self) -> None:
        def ready() -> bool:
            assert self.proc.poll() is None, self.output()[-3000:]
            try:
                return requests.get(f"{self.base}/readyz", timeout=3).json()["dependencies"]["kafka"]["status"] == "ok"
            except (requests.RequestException, KeyError, ValueError):
                return False

        wait_for(ready, timeout=90, interval=0.5, what="API ready with Kafka")

    def route(self, route_id: str, status: str | None = None) -> Any:
        # what is asserted is that the route gets there, not how fast one answer comes on a
        # loaded 2-core machine (a 5 s read timeout failed the test while the route went on)
        r = requests.get(f"{self.base}/workflows/{route_id}", timeout=30)
        if r.status_code != 200 or status and r.json()["status"] != status:
            return None
        return r.json()

    def stop(self) -> int:
        try:
            return terminate(self.proc)
        finally:
            kill_leftovers(self.env)



def test_dev_runs_both_kafka_workflows_on_the_bundled_broker(tmp_path):
    dev = Dev(tmp_path, dev_env())
    try:
        brokers = dev.brokers()
        dev.wait_ready()
        route_id = f"dev-{uuid.uuid4().hex[:6]}"
        produce = [sys.executable, "-m", "orchestrator.entrypoints.cli", "produce"]
        penv = {**dev.env, "KAFKA_BROKERS": brokers}
        subprocess.run(produce + ["route.confirmed", f'{{"route_id": "{route_id}", "mode": "walking"}}',
                                  "--key", route_id], env=penv, cwd=tmp_path, check=True, timeout=60)
        scenario = str(uuid.uuid4())
        subprocess.run(produce + ["init_scenario", f'{{"scenario_uuid": "{scenario}", "camera_url": "rtsp://c/1"}}'],
                       env=penv, cwd=tmp_path, check=True, timeout=60)
        view = wait_for(lambda: dev.route(route_id, "completed"), timeout=90, interval=0.5,
                        what="the route completed under dev")
        assert view["steps"]["delivery_prefetch"]["status"] == "completed"
        workers = wait_for(lambda: (lambda p: p if p["total"] == 1 and p["items"][0]["status"] == "running" else None)(
            requests.get(f"{dev.base}/workers?scenario_uuid={scenario}", timeout=5).json()), timeout=150,
            what="the worker running under dev")
        assert workers["items"][0]["camera_url"] == "rtsp://c/1"
        metrics = requests.get(f"{dev.base}/metrics", timeout=10).text
        assert "route_to_first_audio_seconds_count" in metrics  # the bridge's metrics on the API's /metrics
    finally:
        code = dev.stop()
    assert code == 0, dev.output()[-3000:]
    host, kport = brokers.split(":")
    with pytest.raises(OSError):
        socket.create_connection((host, int(kport)), timeout=1).close()


def test_dev_restarts_a_bridge_that_dies(tmp_path):
    """The Kafka consumer can crash (a topic it reads deleted): dev starts the bridge again, and
    keeps everything else running."""
    dev = Dev(tmp_path, dev_env(), "--no-kafka-emulators")
    try:
        kafka = Kafka(dev.brokers())
        pids = dev.pids()
        assert "kafka-emulators" not in pids  # opted out
        dev.wait_ready()
        os.kill(pids["bridge"], signal.SIGKILL)
        wait_for(lambda: re.search(r"bridge restarted \(pid \d+\)", dev.output()), timeout=150,
                 what="dev to restart the bridge")
        assert f"bridge (pid {pids['bridge']}) exited with signal SIGKILL" in dev.output()
        route_id = f"after-{uuid.uuid4().hex[:6]}"
        kafka.send("route.confirmed", {"route_id": route_id, "mode": "walking"}, key=route_id)
        wait_for(lambda: dev.route(route_id), timeout=60, interval=0.5, what="a route started by the new bridge")
        assert dev.proc.poll() is None
    finally:
        code = dev.stop()
    assert code == 0, dev.output()[-3000:]


def test_dev_started_again_on_the_same_data_takes_new_events(tmp_path):
    """The bundled broker is new (offsets from 0) while ./data keeps what the bridge handled."""
    first = f"first-{uuid.uuid4().hex[:6]}"
    second = key_on_partition_of(first, "second")  # the same partition: the same offset, 0
    for route_id in (first, second):
        dev = Dev(tmp_path, dev_env(), "--no-kafka-emulators", name=route_id)
        try:
            kafka = Kafka(dev.brokers())
            dev.wait_ready()
            kafka.send("route.confirmed", {"route_id": route_id, "mode": "walking"}, key=route_id)
            wait_for(lambda: dev.route(route_id), timeout=60, interval=0.5, what=f"{route_id} started under dev")
        finally:
            code = dev.stop()
        assert code == 0, dev.output()[-3000:]
    assert (tmp_path / "data" / "orchestrator.db").exists()  # one database for both runs


def test_dev_with_kafka_brokers_runs_the_kafka_emulators(tmp_path, own_broker):
    dev = Dev(tmp_path, dev_env(KAFKA_BROKERS=own_broker.bootstrap))
    try:
        assert "kafka-emulators" in dev.pids()
        dev.wait_ready()
        route_id = f"own-{uuid.uuid4().hex[:6]}"
        Kafka(own_broker.bootstrap).send("route.confirmed", {"route_id": route_id, "mode": "walking"}, key=route_id)
        # story, TTS and delivery prefetch answer: only the emulators do on this broker
        view = wait_for(lambda: dev.route(route_id, "completed"), timeout=90, interval=0.5,
                        what="the route completed by the emulated services")
        assert view["steps"]["delivery_prefetch"]["status"] == "completed"
    finally:
        code = dev.stop()
    assert code == 0, dev.output()[-3000:]


def run_refused(tmp_path: Path, env: dict[str, str], *flags: str) -> str:
    """Run dev expecting it to refuse to start; its output. Nothing of it may be left running."""
    dev = Dev(tmp_path, env, *flags)
    try:
        code = dev.proc.wait(60)
        assert code != 0, dev.output()[-3000:]
        assert leftovers(env) == []
        assert "orchestrator dev: pids" not in dev.output()  # nothing was started
        return dev.output()
    finally:
        if dev.proc.poll() is None:
            os.killpg(dev.proc.pid, signal.SIGKILL)
        kill_leftovers(env)


def test_dev_refuses_a_port_given_to_two_processes(tmp_path):
    env = dev_env(PORT="8010")
    del env["GITLAB_EMULATOR_PORT"]  # its default, 8010
    out = run_refused(tmp_path, env)
    assert "port 8010 is used by both the API (PORT) and the GitLab emulator (GITLAB_EMULATOR_PORT)" in out


def test_dev_refuses_a_port_something_else_listens_on(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = run_refused(tmp_path, dev_env(PORT=str(port)))
    assert f"port {port} for the API on 127.0.0.1 is not available" in out
    assert "move the API with PORT" in out


def test_bridge_refuses_a_metrics_port_in_use(kenv):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        run = subprocess.run([sys.executable, "-m", "orchestrator.entrypoints.cli", "bridge", "--metrics-port", str(port)],
                             env=kenv, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert run.returncode != 0
    assert f"--metrics-port: cannot listen on 127.0.0.1:{port}" in run.stderr
