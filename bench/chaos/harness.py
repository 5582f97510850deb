"""The fault-injection run: every built-in workflow under crashes, service restarts and failing
external services, counted at the end (`python -m bench.chaos`, `make chaos`; docs/reliability.md).

One run:
  1. starts PRIVATE PostgreSQL, RabbitMQ, Redis and Kafka-protocol broker instances on free ports
     in a temporary directory (bench/chaos/services.py), never the machine's shared ones;
  2. starts the emulators (media services and GitLab in this process, the calculation worker, the
     chat execution service and the Kafka services as processes) with the effect ledger
     (emulators/effects.py), and the product's processes from the CLI: api, two workers, sweeper,
     bridge, calc-results;
  3. starts a seeded mix of workflows through their public interfaces (media over HTTP, balance
     sagas answered by a scripted user who also opens a merge request at the end, chat tasks,
     routes and worker deployments produced to Kafka), while a fault thread applies a seeded plan:
     SIGKILLs of every process kind (each restarted after a random pause), restarts of the four
     services, emulator latency, 5xx bursts and dropped connections;
  4. waits for quiescence and prints one table; exits 1 unless lost = 0 and duplicated = 0.

Any process that exits without being killed by the plan is restarted too, and reported.
"""
from __future__ import annotations

import json
import logging
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import requests

from orchestrator.entrypoints.ports import free_port

from .services import KafkaBroker, Postgres, RabbitMQ, Redis

ROOT = Path(__file__).resolve().parents[2]
log = logging.getLogger("chaos")

PROCESS_KILLS = ("kill_api", "kill_worker_in_step", "kill_worker_between_steps", "kill_sweeper", "kill_bridge",
                 "kill_calc_results")
SERVICE_RESTARTS = ("restart_postgres", "restart_rabbitmq", "restart_redis", "restart_kafka")
EMULATOR_FAULTS = ("emulator_latency", "emulator_5xx_burst", "emulator_dropped_connections")
FAULT_KINDS = PROCESS_KILLS + SERVICE_RESTARTS + EMULATOR_FAULTS
WORKFLOW_KINDS = ("media", "balance", "chat", "route", "worker")
EXPECTED = {"media": "completed", "balance": "COMPLETED", "chat": "completed", "route": "completed",
            "worker": "running"}
TERMINAL = {"media": {"completed", "failed", "cancelled"}, "balance": {"COMPLETED", "FAILED", "CANCELLED"},
            "chat": {"completed", "failed", "timed_out"}, "route": {"completed", "tts_failed", "story_failed"},
            "worker": {"running", "failed", "stopped"}}
KAFKA_TOPICS = ["route.confirmed", "story.generate", "story.generate.completed", "tts.requested", "tts.completed",
                "delivery.prefetch", "init_scenario", "to_deploy", "worker.status", "route.confirmed.dlq",
                "story.generate.completed.dlq", "tts.completed.dlq", "init_scenario.dlq", "worker.status.dlq"]
GITLAB_TOKEN = "chaos-token"
BALANCE_INPUT = {"plant": "chaos", "condenser": {"pressure_kpa": 7.5, "flow_kg_s": 1200},
                 "evaporator": {"pressure_kpa": 350, "flow_kg_s": 42}}


@dataclass
class Size:
    """How big a run is: workflows started, over how many seconds, and faults per kind."""

    workflows: int
    load_seconds: float
    faults_per_kind: int
    quiesce_seconds: float


FULL = Size(workflows=220, load_seconds=240, faults_per_kind=3, quiesce_seconds=420)
SMALL = Size(workflows=40, load_seconds=75, faults_per_kind=1, quiesce_seconds=150)


@dataclass
class Workflow:
    kind: str
    ref: str  # the id or business key it is looked up by
    started: float
    extra: dict[str, Any] = field(default_factory=dict)
    state: str | None = None


class Proc:
    """A process the run supervises: started again whenever it is not running and not held down."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], logdir: Path) -> None:
        self.name, self.argv, self.env = name, argv, env
        self.log = logdir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.held = False  # down on purpose (a kill's pause)
        self.unexpected_exits: list[int] = []

    def start(self) -> None:
        out = self.log.open("ab")
        self.proc = subprocess.Popen(self.argv, env=self.env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        if self.alive():
            assert self.proc is not None
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(30)

    def stop(self) -> None:
        if self.alive():
            assert self.proc is not None
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(15)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                self.kill()


class InFlight:
    """WSGI middleware counting requests being served (to kill a worker inside a step's call)."""

    def __init__(self, app: Any) -> None:
        self.app, self.count, self.lock = app, 0, threading.Lock()

    def __call__(self, environ: Any, start_response: Any) -> Any:
        if environ.get("PATH_INFO", "").startswith("/_emulator"):
            return self.app(environ, start_response)
        with self.lock:
            self.count += 1
        try:
            return list(self.app(environ, start_response))
        finally:
            with self.lock:
                self.count -= 1


class Run:
    """One seeded fault-injection run (see the module's docstring)."""

    def __init__(self, seed: int, size: Size, keep: bool = False) -> None:
        self.seed, self.size, self.keep = seed, size, keep
        self.rng = random.Random(seed)
        self.dir = Path(tempfile.mkdtemp(prefix=f"chaos-{seed}-"))
        os.chmod(self.dir, 0o755)  # PostgreSQL runs as its own user below it
        self.logs = self.dir / "logs"
        self.logs.mkdir()
        self.ledger = self.dir / "effects.jsonl"
        self.workflows: list[Workflow] = []
        self.wlock = threading.Lock()
        self.faults: Counter[str] = Counter()
        self.outages: list[list[float]] = []  # [start, end] of service restarts
        self.http_5xx: list[tuple[float, str, int]] = []
        self.procs: dict[str, Proc] = {}
        self.stopping = threading.Event()
        self.kafka_paused = threading.Event()
        self.errors: list[str] = []
        self.merge_requested: set[str] = set()
        self.producing = 0  # Kafka produce calls under way

    # -- setup -----------------------------------------------------------------------------------
    def setup(self) -> None:
        log.info("run directory %s", self.dir)
        self.pg = Postgres(self.dir)
        self.pg.start()
        db = self.pg.create_database("orchestrator")
        self.redis = Redis(self.dir)
        self.redis.start()
        self.rabbit = RabbitMQ(self.dir)
        self.rabbit.start()
        self.kafka = KafkaBroker(self.dir, "memory://tansu/")
        self.kafka.start()
        from orchestrator.kafka import ensure_topics

        ensure_topics(self.kafka.bootstrap, KAFKA_TOPICS)
        os.environ["EMULATOR_EFFECTS_FILE"] = str(self.ledger)  # the in-process emulators' ledger
        from emulators.gitlab import GitLabEmulator
        from emulators.media import SERVICES, EmulatorServer

        self.media = {name: EmulatorServer(name, job_seconds=0.5, hang_seconds=3.0) for name in SERVICES}
        self.inflight = {}
        for name, server in self.media.items():
            self.inflight[name] = InFlight(server.app.wsgi_app)
            server.app.wsgi_app = self.inflight[name]  # type: ignore[method-assign]
            server.start()
        self.gitlab = GitLabEmulator(self.dir / "gitlab", GITLAB_TOKEN).start()
        self.api_port = free_port()
        self.api = f"http://127.0.0.1:{self.api_port}"
        base = {k: v for k, v in os.environ.items()
                if not k.startswith(("CELERY_", "DATABASE_", "POSTGRES_", "KAFKA_", "REDIS_", "GIT", "OTEL_"))}
        self.env = {
            **base, "DATABASE_URL": db, "CELERY_BROKER_URL": self.rabbit.url, "REDIS_URL": self.redis.url,
            "CELERY_RESULT_BACKEND": self.redis.url, "KAFKA_BROKERS": self.kafka.bootstrap,
            "CONSUMER_GROUP": "chaos", "GITLAB_URL": self.gitlab.url, "GITLAB_TOKEN": GITLAB_TOKEN,
            "GITLAB_TIMEOUT": "3", "VIDEO_DOWNLOADER_URL": self.media["video-downloader"].url,
            "AUDIO_NORMALIZATION_URL": self.media["audio-normalization"].url,
            "AUDIO_TRANSCRIBER_URL": self.media["audio-transcriber"].url,
            "VIDEO_DOWNLOADER_TIMEOUT": "2.5", "AUDIO_NORMALIZATION_TIMEOUT": "2.5",
            "AUDIO_TRANSCRIBER_TIMEOUT": "2.5", "POLL_INTERVAL": "0.3", "MAX_POLL_ATTEMPTS": "400",
            "HTTP_MAX_RETRIES": "3", "RETRY_BACKOFF_BASE_SECONDS": "0.3", "SWEEP_INTERVAL": "0.2",
            "STEP_LEASE_SECONDS": "15", "JOB_TIMEOUT_MINUTES": "30", "CACHE_TTL_HOURS": "0",
            "CHAT_CONSUMER_ID": "chaos", "CHAT_TASK_TIMEOUT_SECONDS": "120", "EXECUTION_CHUNKS": "3",
            "EXECUTION_CHUNK_DELAY": "0.05", "EXECUTION_FAILURE_RATE": "0", "EMULATOR_TTS_FAILURE_RATE": "0",
            "EMULATOR_TTS_LATENCY": "0.05", "EMULATOR_RUNNER_FAILURE_RATE": "0", "LOG_LEVEL": "INFO",
            "LOG_FORMAT": "text", "WORKFLOW_MODULES": "sagas,tasks", "PYTHONPATH": str(ROOT),
            "EMULATOR_EFFECTS_FILE": str(self.ledger), "ADMIN_TOKEN": "chaos-admin",
            "PROMETHEUS_MULTIPROC_DIR": str(self.dir / "metrics"),
        }
        (self.dir / "metrics").mkdir()
        cli = [sys.executable, "-m", "orchestrator.entrypoints.cli"]
        subprocess.run(cli + ["db", "upgrade"], env=self.env, cwd=ROOT, check=True, capture_output=True)
        commands = {
            "api": cli + ["api", "--host", "127.0.0.1", "--port", str(self.api_port), "--workers", "2"],
            "worker-1": cli + ["worker", "--concurrency", "3", "--name", "chaos1@%h"],
            "worker-2": cli + ["worker", "--concurrency", "3", "--name", "chaos2@%h"],
            "sweeper": cli + ["sweeper"],
            "bridge": cli + ["bridge"],
            "calc-results": cli + ["calc-results"],
            "calculator": [sys.executable, "-m", "emulators.calculator", "--seconds", "0.3"],
            "execution": [sys.executable, "-m", "emulators.execution", "--concurrency", "8"],
            "kafka-services": [sys.executable, "-m", "emulators.kafka_services", "--brokers", self.kafka.bootstrap,
                               "--most-stories", "3"],
        }
        for name, argv in commands.items():
            self.procs[name] = Proc(name, argv, self.env, self.logs)
            self.procs[name].start()
        deadline = time.monotonic() + 120
        while not self._up(f"{self.api}/healthz"):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the API did not answer; see {self.logs / 'api.log'}")
            time.sleep(0.3)
        threading.Thread(target=self._supervise, name="supervisor", daemon=True).start()

    @staticmethod
    def _up(url: str) -> bool:
        try:
            return requests.get(url, timeout=2).status_code == 200
        except requests.RequestException:
            return False

    def _supervise(self) -> None:
        """Restart any process that exited by itself (an unexpected exit is recorded)."""
        while not self.stopping.is_set():
            for p in list(self.procs.values()):
                if p.held or p.alive() or p.proc is None:
                    continue
                p.unexpected_exits.append(p.proc.returncode)
                log.warning("%s exited by itself with %s; restarting it", p.name, p.proc.returncode)
                p.kill()  # what it left behind in its group
                time.sleep(1.0)
                if not p.held and not self.stopping.is_set():
                    p.start()
            self.stopping.wait(0.5)

    def teardown(self) -> None:
        self.stopping.set()
        for p in self.procs.values():
            p.held = True
        for p in self.procs.values():
            p.stop()
        for server in self.media.values():
            server.stop()
        self.gitlab.stop()
        for svc in (self.kafka, self.rabbit, self.redis, self.pg):
            try:
                svc.stop()
            except Exception:  # noqa: BLE001 - teardown goes on
                log.warning("stopping %s failed", svc.name, exc_info=True)
        if not self.keep:
            import shutil

            shutil.rmtree(self.dir, ignore_errors=True)

    # -- HTTP with the 5xx count -----------------------------------------------------------------
    def http(self, method: str, path: str, **kwargs: Any) -> requests.Response | None:
        """One call to the API; None when it could not be reached. A 5xx is recorded."""
        kwargs.setdefault("timeout", 15)
        try:
            r = requests.request(method, f"{self.api}{path}", **kwargs)
        except requests.RequestException:
            return None
        if r.status_code >= 500:
            self.http_5xx.append((time.monotonic(), f"{method} {path}: {r.text[:200]}", r.status_code))
        return r

    def until(self, call: Callable[[], Any], timeout: float = 120) -> Any:
        """Call until it returns a value (the API may be down, or a service restarting)."""
        deadline = time.monotonic() + timeout
        while not self.stopping.is_set():
            value = call()
            if value is not None:
                return value
            if time.monotonic() > deadline:
                return None
            time.sleep(0.5)
        return None

    # -- the load --------------------------------------------------------------------------------
    def start_media(self, n: int) -> Workflow | None:
        body = {"youtube_url": f"https://youtu.be/chaos{self.seed}x{n}", "language": "auto"}
        key = f"chaos-media-{self.seed}-{n}"

        def go() -> str | None:
            r = self.http("POST", "/pipeline", json=body, headers={"Idempotency-Key": key})
            return r.json()["job_id"] if r is not None and r.status_code == 200 else None

        job = self.until(go)
        return Workflow("media", job, time.monotonic()) if job else None

    def start_balance(self, n: int) -> Workflow | None:
        project = f"chaos/p{self.seed}x{n}"
        files = {"balance_input.json": json.dumps(BALANCE_INPUT, indent=2),
                 "geometries_manifest.json": json.dumps({"geometries": []})}
        requests.post(f"{self.gitlab.url}/_emulator/projects", json={"path": project, "files": files}, timeout=10)
        body = {"project": project, "branch": f"issue/{n}-chaos", "dependencies": ["condenser", "evaporator"]}

        def go() -> str | None:
            r = self.http("POST", "/saga/calculate-balance", json=body, headers={"Idempotency-Key": f"bal-{n}"},
                          timeout=30)
            return r.json()["saga_id"] if r is not None and r.status_code in (200, 201) else None

        saga = self.until(go)
        return Workflow("balance", saga, time.monotonic(), {"project": project, "branch": body["branch"]}) \
            if saga else None

    def start_chat(self, n: int) -> Workflow | None:
        def init() -> str | None:
            r = self.http("POST", "/api/v1/chat/init", json={})
            return r.json()["session_id"] if r is not None and r.status_code in (200, 201) else None

        session = self.until(init)
        if not session:
            return None

        def task() -> str | None:
            r = self.http("POST", f"/api/v1/chat/{session}/task", json={"message": f"question {n}"},
                          headers={"Idempotency-Key": f"chat-{n}"})
            return r.json()["task_id"] if r is not None and r.status_code in (200, 201, 202) else None

        tid = self.until(task)
        return Workflow("chat", tid, time.monotonic(), {"session": session}) if tid else None

    def produce(self, topic: str, payload: dict[str, Any], key: str, event_id: str) -> bool:
        from confluent_kafka import Producer

        from orchestrator.kafka import producer_config

        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not self.stopping.is_set():
            with self.wlock:
                if self.kafka_paused.is_set():
                    delivered = None
                else:
                    self.producing += 1
                    delivered = False
            if delivered is None:  # held back while the broker restarts
                time.sleep(0.2)
                continue
            try:
                producer = Producer(producer_config(self.kafka.bootstrap))
                producer.produce(topic, json.dumps(payload).encode(), key=key.encode(),
                                 headers=[("event_id", event_id.encode())])
                delivered = producer.flush(15) == 0
            finally:
                with self.wlock:
                    self.producing -= 1
            if delivered:
                return True
            time.sleep(1)  # the same event id again: the bridge de-duplicates a second copy
        return False

    def start_route(self, n: int) -> Workflow | None:
        route = f"r-{self.seed}-{n}"
        wf = Workflow("route", route, time.monotonic())
        ok = self.produce("route.confirmed", {"route_id": route, "mode": "walking"}, route, f"route-{self.seed}-{n}")
        return wf if ok else None

    def start_worker(self, n: int) -> Workflow | None:
        scenario = str(uuid.UUID(int=self.seed * 100000 + n))
        event = f"deploy-{self.seed}-{n}"
        ok = self.produce("init_scenario", {"scenario_uuid": scenario, "camera_url": f"rtsp://cam{n}.example/s"},
                          scenario, event)
        return Workflow("worker", f"init_scenario:{event}", time.monotonic()) if ok else None

    def load(self) -> None:
        starters = {"media": self.start_media, "balance": self.start_balance, "chat": self.start_chat,
                    "route": self.start_route, "worker": self.start_worker}
        kinds = self.rng.choices(WORKFLOW_KINDS, weights=[35, 20, 20, 15, 10], k=self.size.workflows)
        for i, kind in enumerate(kinds[:len(WORKFLOW_KINDS)]):  # every kind at least once
            kinds[i] = WORKFLOW_KINDS[i]
        gap = self.size.load_seconds / self.size.workflows

        def one(n: int, kind: str) -> None:
            wf = starters[kind](n)
            if wf is None:
                self.errors.append(f"{kind} #{n} could not be started")
                return
            with self.wlock:
                self.workflows.append(wf)

        with ThreadPoolExecutor(12) as pool:
            for n, kind in enumerate(kinds):
                if self.stopping.is_set():
                    break
                pool.submit(one, n, kind)
                time.sleep(gap)

    # -- the scripted user of the balance sagas --------------------------------------------------
    def user(self) -> None:
        while not self.stopping.is_set():
            with self.wlock:
                sagas = [w for w in self.workflows if w.kind == "balance" and w.ref not in self.merge_requested
                         and w.state in (None, "COMPLETED")]
            for w in sagas:
                r = self.http("GET", f"/saga/calculate-balance/{w.ref}")
                if r is None or r.status_code != 200:
                    continue
                body = r.json()
                state = body.get("state", "")
                if body.get("status") == "user_input_required" and state.startswith("AWAIT_USER_"):
                    dep = state[len("AWAIT_USER_"):-len("_INPUT")]
                    self.http("POST", f"/sagas/{w.ref}/events/submit_input", json={"step": dep, "use_hydrated": True},
                              timeout=30)
                elif state == "COMPLETED" and w.ref not in self.merge_requested:
                    r = self.http("POST", "/merge-requests", json={"project": w.extra["project"],
                                                                  "source_branch": w.extra["branch"],
                                                                  "title": f"Balance {w.ref}"}, timeout=30)
                    if r is not None and r.status_code in (200, 201):
                        self.merge_requested.add(w.ref)
            time.sleep(0.5)

    # -- the faults ------------------------------------------------------------------------------
    def plan(self) -> list[tuple[float, str]]:
        """(seconds after the load starts, fault kind), every kind `faults_per_kind` times."""
        span = self.size.load_seconds
        out = [(self.rng.uniform(0.05 * span, 0.95 * span), kind)
               for kind in FAULT_KINDS for _ in range(self.size.faults_per_kind)]
        return sorted(out)

    def hold_and_kill(self, name: str) -> None:
        p = self.procs[name]
        p.held = True
        p.kill()
        time.sleep(self.rng.uniform(0.5, 4.0))
        p.start()
        p.held = False

    def outage(self, restart: Callable[[float], None]) -> None:
        window = [time.monotonic(), float("inf")]
        self.outages.append(window)
        try:
            restart(self.rng.uniform(1.0, 5.0))
        finally:
            window[1] = time.monotonic()

    def inject(self, kind: str) -> None:
        log.info("fault: %s", kind)
        if kind == "kill_api":
            self.hold_and_kill("api")
        elif kind in ("kill_worker_in_step", "kill_worker_between_steps"):
            busy = kind == "kill_worker_in_step"
            if busy:  # slow answers, so that a worker is inside a step's call when it dies
                self.set_latency(1.5)
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and (sum(f.count for f in self.inflight.values()) > 0) != busy:
                time.sleep(0.05)
            self.hold_and_kill(self.rng.choice(["worker-1", "worker-2"]))
            if busy:
                self.set_latency(None)
        elif kind == "kill_sweeper":
            self.hold_and_kill("sweeper")
        elif kind == "kill_bridge":
            self.hold_and_kill("bridge")
        elif kind == "kill_calc_results":
            self.hold_and_kill("calc-results")
        elif kind == "restart_postgres":
            self.outage(self.pg.restart)
        elif kind == "restart_rabbitmq":
            self.outage(self.rabbit.restart)
        elif kind == "restart_redis":
            self.outage(self.redis.restart)
        elif kind == "restart_kafka":
            self.restart_kafka()
        elif kind == "emulator_latency":
            self.set_latency(self.rng.uniform(0.5, 2.0))
            time.sleep(self.rng.uniform(3, 8))
            self.set_latency(None)
        elif kind == "emulator_5xx_burst":
            # One service at a time, and the last plan cleared first: the transcription step
            # calls two services (the normalized audio, then the transcriber), so two services'
            # plans, or a plan left unconsumed beside a new one, could add up to four failures of
            # one step, past its retry budget (4 attempts).
            self.clear_emulator_faults()
            self.one_media_service_fails(self.rng.choice(["500", "503"]))
            requests.post(f"{self.gitlab.url}/_emulator/faults", timeout=5, json={"faults": [
                {"method": "GET", "path": "/repository/files", "kind": "error", "status": 502, "times": 2}]})
        elif kind == "emulator_dropped_connections":
            self.clear_emulator_faults()
            self.one_media_service_fails("drop")
        self.faults[kind] += 1

    def one_media_service_fails(self, kind: str) -> None:
        """One endpoint of one media service fails twice (`kind`: "500", "503" or "drop")."""
        server = self.media[self.rng.choice(sorted(self.media))]
        requests.post(f"{server.url}/_emulator/faults", timeout=5, json={"faults": [
            {"endpoint": self.rng.choice(["submit", "status", "result"]), "kind": kind, "times": 2}]})

    def clear_emulator_faults(self) -> None:
        for server in self.media.values():
            requests.delete(f"{server.url}/_emulator/faults", timeout=5)

    def set_latency(self, seconds: float | None) -> None:
        for server in self.media.values():
            requests.post(f"{server.url}/_emulator/latency", json={"seconds": seconds}, timeout=5)

    def restart_kafka(self) -> None:
        """The bundled broker keeps everything in memory: a restart loses its topics, messages and
        committed offsets. Kafka intake is held back until the Kafka workflows in flight finished,
        then the broker restarts empty, its topics are created again, and intake goes on."""
        with self.wlock:
            self.kafka_paused.set()
        try:
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline:
                with self.wlock:
                    pending = [w for w in self.workflows if w.kind in ("route", "worker")]
                    producing = self.producing
                if not producing and all(self.final_state(w) in TERMINAL[w.kind] for w in pending):
                    break
                time.sleep(1)
            else:
                self.errors.append("restart_kafka: Kafka workflows still in flight when the broker restarted")
            window = [time.monotonic(), float("inf")]
            self.outages.append(window)
            self.kafka.restart(self.rng.uniform(1.0, 4.0))
            from orchestrator.kafka import ensure_topics

            ensure_topics(self.kafka.bootstrap, KAFKA_TOPICS)
            # The emulated services are clients we do not own: like any consumer of a broker that
            # lost its log they start again from the new log (the bridge must cope on its own).
            services = self.procs["kafka-services"]
            services.held = True
            services.kill()
            services.start()
            services.held = False
            window[1] = time.monotonic()
        finally:
            self.kafka_paused.clear()

    def chaos(self, t0: float) -> None:
        for at, kind in self.plan():
            while time.monotonic() - t0 < at and not self.stopping.is_set():
                time.sleep(0.1)
            if self.stopping.is_set():
                return
            try:
                self.inject(kind)
            except Exception as exc:  # noqa: BLE001 - a fault that could not be applied is reported
                self.errors.append(f"fault {kind} failed: {exc!r}")
                log.exception("fault %s failed", kind)

    # -- the end ---------------------------------------------------------------------------------
    def final_state(self, w: Workflow) -> str | None:
        if w.kind == "chat":
            r = self.http("GET", f"/api/v1/chat/{w.extra['session']}/tasks/{w.ref}")
            return r.json().get("status") if r is not None and r.status_code == 200 else None
        if w.kind in ("route", "worker"):
            t = "route_content" if w.kind == "route" else "worker_deployment"
            r = self.http("GET", "/sagas", params={"type": t, "key": w.ref})
            items = r.json().get("items") if r is not None and r.status_code == 200 else None
            return items[0]["state"] if items else None
        r = self.http("GET", f"/sagas/{w.ref}")
        return r.json().get("state") if r is not None and r.status_code == 200 else None

    def quiesce(self) -> None:
        deadline = time.monotonic() + self.size.quiesce_seconds
        while time.monotonic() < deadline:
            with self.wlock:
                open_ = [w for w in self.workflows if w.state is None]
            for w in open_:
                state = self.final_state(w)
                if state in TERMINAL[w.kind]:
                    w.state = state
            balance_done = all(w.ref in self.merge_requested for w in self.workflows
                               if w.kind == "balance" and w.state == "COMPLETED")
            if not [w for w in self.workflows if w.state is None] and balance_done:
                return
            time.sleep(1)
        for w in self.workflows:  # the state reached, for the report
            if w.state is None:
                w.extra["last_state"] = self.final_state(w)

    def why(self, w: Workflow) -> list[dict[str, Any]]:
        """The steps of a workflow that did not finish as expected that are not completed, with
        their errors (GET /sagas/<id>), so that a report says why without its logs."""
        ref = w.ref
        if w.kind in ("route", "worker"):
            t = "route_content" if w.kind == "route" else "worker_deployment"
            r = self.http("GET", "/sagas", params={"type": t, "key": w.ref})
            items = r.json().get("items") if r is not None and r.status_code == 200 else None
            ref = items[0]["id"] if items else None
        r = self.http("GET", f"/sagas/{ref}") if ref and w.kind != "chat" else None
        if r is None or r.status_code != 200:
            return []
        return [{k: step.get(k) for k in ("name", "status", "attempt", "failures", "error")}
                for step in r.json().get("steps", []) if step.get("status") != "completed"]

    def table(self) -> dict[str, Any]:
        from emulators.effects import summary

        effects = summary(str(self.ledger))
        grace = 15.0
        outside = [(t, what, code) for t, what, code in self.http_5xx
                   if not any(a <= t <= b + grace for a, b in self.outages)]
        by_kind = {k: [w for w in self.workflows if w.kind == k] for k in WORKFLOW_KINDS}
        lost = [w for w in self.workflows if w.state != EXPECTED[w.kind]]
        return {
            "seed": self.seed,
            "started": {k: len(v) for k, v in by_kind.items()},
            "finished": {k: sum(1 for w in v if w.state == EXPECTED[k]) for k, v in by_kind.items()},
            "lost": {k: sum(1 for w in v if w.state != EXPECTED[k]) for k, v in by_kind.items()},
            "lost_examples": [{"kind": w.kind, "ref": w.ref, "state": w.state or w.extra.get("last_state"),
                               "steps": self.why(w)} for w in lost[:10]],
            "not_started": len(self.errors),
            "errors": self.errors[:10],
            "duplicated": {k: v["duplicated"] for k, v in effects.items()},
            "effects": {k: v["keys"] for k, v in effects.items()},
            "duplicate_examples": {k: v["examples"] for k, v in effects.items() if v["examples"]},
            "http_5xx_outside_outage": len(outside),
            "http_5xx_during_outage": len(self.http_5xx) - len(outside),
            "http_5xx_examples": [w for _, w, _ in outside[:5]],
            "faults": {k: self.faults[k] for k in FAULT_KINDS},
            "unexpected_exits": {n: p.unexpected_exits for n, p in self.procs.items() if p.unexpected_exits},
        }

    def run(self) -> dict[str, Any]:
        self.setup()
        try:
            threading.Thread(target=self.user, name="user", daemon=True).start()
            t0 = time.monotonic()
            chaos = threading.Thread(target=self.chaos, args=(t0,), name="chaos", daemon=True)
            chaos.start()
            self.load()
            chaos.join()
            self.quiesce()
            result = self.table()
            if not passed(result):  # its logs and service data are what tells why
                self.keep = True
            result["run_directory"] = str(self.dir) if self.keep else None
            return result
        finally:
            self.teardown()


def render(result: dict[str, Any]) -> str:
    """The one table: workflows, effects, 5xx and faults."""
    lines = [f"fault-injection run, seed {result['seed']}", "",
             f"{'workflow':<10} {'started':>8} {'finished':>9} {'lost':>5}"]
    for k in WORKFLOW_KINDS:
        lines.append(f"{k:<10} {result['started'][k]:>8} {result['finished'][k]:>9} {result['lost'][k]:>5}")
    total = {c: sum(result[c].values()) for c in ("started", "finished", "lost")}
    lines.append(f"{'total':<10} {total['started']:>8} {total['finished']:>9} {total['lost']:>5}")
    lines += ["", f"{'effect':<22} {'keys':>6} {'duplicated':>11}"]
    for k, n in result["duplicated"].items():
        lines.append(f"{k:<22} {result['effects'][k]:>6} {n:>11}")
    lines += ["", f"5xx answers outside an injected outage: {result['http_5xx_outside_outage']}"
                  f" (during one: {result['http_5xx_during_outage']})", "",
              f"{'fault':<30} {'injected':>8}"]
    for k, n in result["faults"].items():
        lines.append(f"{k:<30} {n:>8}")
    if result["unexpected_exits"]:
        lines += ["", "processes that exited by themselves (restarted): " + json.dumps(result["unexpected_exits"])]
    if result["lost_examples"]:
        lines += ["", "lost: " + json.dumps(result["lost_examples"])]
    if result["duplicate_examples"]:
        lines += ["", "duplicated: " + json.dumps(result["duplicate_examples"])[:2000]]
    if result["http_5xx_examples"]:
        lines += ["", "5xx: " + json.dumps(result["http_5xx_examples"])[:2000]]
    if result["errors"]:
        lines += ["", "not started / faults not applied: " + json.dumps(result["errors"])]
    if result.get("run_directory"):
        lines += ["", f"logs and service data kept in {result['run_directory']}"]
    return "\n".join(lines)


def passed(result: dict[str, Any]) -> bool:
    """lost = 0 and duplicated = 0, every fault kind injected and every workflow started."""
    return (sum(result["lost"].values()) == 0 and sum(result["duplicated"].values()) == 0
            and result["not_started"] == 0 and all(result["faults"].values()))
