"""Stand-ins for the media pipeline's HTTP microservices.

The orchestrator drives three services over HTTP: ``video-downloader``,
``audio-normalization`` and ``audio-transcriber``. This module serves the same
contract with deterministic results and wall-clock job progress, so pipelines
can be exercised end to end without the real (slow, GPU-hungry) services.

Besides the service contract, every app exposes a small control surface under
``/_emulator`` that lets tests inject faults (error statuses, dropped
connections, hangs, jobs that never finish or fail) and inspect what the
orchestrator actually did (submits, polls, result fetches).

Run all three at once with ``python -m emulators.media``; with ``--data DIR`` every
service keeps its jobs in ``DIR/<service>.sqlite3``, so a restarted emulator (even after
kill -9) still serves them, and a job that was running completes at its original time.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import secrets
import signal
import socket
import sqlite3
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, urlsplit

from flask import Flask, Response, jsonify, request
from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler, make_server

from emulators import effects

SERVICES = ("video-downloader", "audio-normalization", "audio-transcriber")
DEFAULT_PORTS = {"video-downloader": 8001, "audio-normalization": 8002, "audio-transcriber": 8003}

FAULT_ENDPOINTS = ("submit", "status", "result", "health")
FAULT_KINDS = ("500", "503", "404", "400", "drop", "hang")
NORMALIZATION_OPTIONS = (
    "remove_noise",
    "convert_to_mono",
    "apply_highpass_filter",
    "set_sample_rate_16k",
    "isolate_vocals",
)
SEGMENT_SECONDS = 2.5
# A job that must never finish still has to look alive to pollers, so its
# progress climbs like a normal job but is capped short of completion.
NEVER_FINISH_CAP = 99.0
_VIDEO_ID = re.compile(r"[A-Za-z0-9_-]+")

JsonBody = dict[str, Any]


@dataclass
class _Fault:
    endpoint: str
    kind: str
    times: int

    def as_json(self) -> JsonBody:
        return {"endpoint": self.endpoint, "kind": self.kind, "times": self.times}


@dataclass
class _JobPlan:
    """How jobs created from now on behave (set through ``/_emulator/faults``)."""

    never_finish: bool = False
    fail: str | None = None
    job_seconds: float | None = None

    def as_json(self) -> JsonBody:
        return {"never_finish": self.never_finish, "fail": self.fail, "job_seconds": self.job_seconds}


@dataclass
class _Job:
    """One submitted job. Its fields up to ``result`` are what a store keeps; the counters
    count this process's requests only (like ``submits`` in ``/_emulator/stats``)."""

    job_id: str
    idempotency_key: str | None
    created: float  # wall clock (time.time()) at submit, so it still holds after a restart
    seconds: float
    never_finish: bool
    fail: str | None
    result: bytes | JsonBody
    status_polls: int = 0
    result_fetches: int = 0

    def state(self) -> tuple[str, float]:
        """Status and progress, derived from elapsed time so no worker thread is needed."""
        elapsed = time.time() - self.created
        fraction = 1.0 if self.seconds <= 0 else min(1.0, max(0.0, elapsed / self.seconds))
        if self.never_finish:
            return "processing", round(min(fraction * 100.0, NEVER_FINISH_CAP), 2)
        if fraction >= 1.0:
            return ("failed" if self.fail is not None else "completed"), 100.0
        return ("processing" if fraction > 0 else "queued"), round(fraction * 100.0, 2)

    def status_json(self) -> JsonBody:
        status, progress = self.state()
        error = self.fail if status == "failed" else None
        return {"job_id": self.job_id, "status": status, "progress": progress, "error": error}


class _JobStore:
    """The jobs of one service in an SQLite file, one row per job, written once at submit.

    Each write is one transaction, so a process killed at any moment leaves a readable file
    holding every job whose submit was answered. A result is stored as bytes: a download as
    is, a transcription (``json_results``) as its JSON text."""

    def __init__(self, path: Path, *, json_results: bool) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.json_results = json_results
        # Autocommit; callers serialise access under _State.lock.
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS jobs (job_id TEXT PRIMARY KEY, idempotency_key TEXT,"
            " created REAL NOT NULL, seconds REAL NOT NULL, never_finish INTEGER NOT NULL,"
            " fail TEXT, result BLOB NOT NULL)"
        )

    def load(self) -> list[_Job]:
        """Every stored job, in submit order."""
        rows = self.db.execute(
            "SELECT job_id, idempotency_key, created, seconds, never_finish, fail, result"
            " FROM jobs ORDER BY rowid"
        )
        return [
            _Job(job_id, key, created, seconds, bool(never_finish), fail,
                 json.loads(result) if self.json_results else bytes(result))
            for job_id, key, created, seconds, never_finish, fail, result in rows
        ]

    def add(self, job: _Job) -> None:
        result = json.dumps(job.result).encode() if self.json_results else job.result
        self.db.execute(
            "INSERT INTO jobs VALUES (?, ?, ?, ?, ?, ?, ?)",
            (job.job_id, job.idempotency_key, job.created, job.seconds, job.never_finish, job.fail, result),
        )

    def clear(self) -> None:
        self.db.execute("DELETE FROM jobs")


class _State:
    """All mutable state of one emulated service; guarded by ``lock``.

    ``store``, when given, keeps the jobs across restarts; fault plans, latency and the
    counters are this process's only."""

    def __init__(self, service: str, job_seconds: float, store: _JobStore | None = None) -> None:
        self.lock = threading.Lock()
        self.service = service
        self.job_seconds = job_seconds
        self.store = store
        self.jobs: dict[str, _Job] = {}
        self.by_key: dict[str, str] = {}
        for job in store.load() if store is not None else []:
            self.jobs[job.job_id] = job
            if job.idempotency_key is not None:
                self.by_key[job.idempotency_key] = job.job_id
        self.faults: list[_Fault] = []
        self.plan = _JobPlan()
        self.submits = 0
        self.submit_requests = 0
        self.latency: float | None = None  # set through /_emulator/latency; None: the server's own

    def take_fault(self, endpoint: str) -> _Fault | None:
        with self.lock:
            for fault in self.faults:
                if fault.endpoint == endpoint:
                    fault.times -= 1
                    if fault.times <= 0:
                        self.faults.remove(fault)
                    return fault
        return None

    def clear_jobs(self) -> tuple[int, int]:
        with self.lock:
            dropped = len(self.jobs)
            pending = sum(1 for job in self.jobs.values() if job.state()[0] in ("queued", "processing"))
            self.jobs.clear()
            self.by_key.clear()
            if self.store is not None:
                self.store.clear()
        return dropped, pending


class _BadRequest(Exception):
    """Input validation failure; the message names the offending field."""


def _error(message: str, status: int) -> tuple[Response, int]:
    return jsonify({"error": message}), status


def _bool_field(name: str) -> bool:
    raw = request.form.get(name, "false").strip().lower()
    if raw not in ("true", "false"):
        raise _BadRequest(f"{name} must be 'true' or 'false'")
    return raw == "true"


def _uploaded_file() -> bytes:
    upload = request.files.get("file")
    if upload is None:
        raise _BadRequest("file is required (multipart field 'file')")
    return upload.read()


def _video_id(url: str) -> str:
    """The ``v=`` query parameter, else the last path segment (youtu.be/<id>)."""
    parts = urlsplit(url.strip())
    candidates = parse_qs(parts.query).get("v") or [s for s in parts.path.split("/") if s][-1:]
    if not parts.netloc or not candidates or not _VIDEO_ID.fullmatch(candidates[0]):
        raise _BadRequest("url does not contain a YouTube video id")
    return candidates[0]


def _transcription(data: bytes, language: str, language_out: str | None) -> JsonBody:
    # Deterministic from the input: segment count and text depend on its bytes,
    # so different uploads are distinguishable in pipeline outputs.
    count = 2 + len(data) % 2
    digest = hashlib.sha256(data).hexdigest()[:8]
    segments = [
        {
            "text": f"Segment {i + 1} of {count}: {len(data)} bytes of audio ({digest}).",
            "start": i * SEGMENT_SECONDS,
            "end": (i + 1) * SEGMENT_SECONDS,
            "duration": SEGMENT_SECONDS,
        }
        for i in range(count)
    ]
    detected = language if language != "auto" else "en"
    return {
        "text": " ".join(segment["text"] for segment in segments),
        "segments": segments,
        "language": language_out or detected,
        "transcription_file": "transcription.srt",
    }


def _parse_submit(service: str) -> tuple[str, bytes | JsonBody, str]:
    """Validate a POST /jobs body; returns (job id stem, result, id style)."""
    if service == "video-downloader":
        body = request.get_json(silent=True)
        url = body.get("url") if isinstance(body, dict) else None
        if not isinstance(url, str) or not url.strip():
            raise _BadRequest("url is required and must be a string")
        return f"{_video_id(url)}_audio", b"AUDIO:" + url.encode(), "video"
    if service == "audio-normalization":
        data = _uploaded_file()
        enabled = sorted(name for name in NORMALIZATION_OPTIONS if _bool_field(name))
        return "norm", b"NORM[" + ",".join(enabled).encode() + b"]:" + data, "random"
    data = _uploaded_file()
    language = request.form.get("language", "").strip() or "auto"
    language_out = request.form.get("language_out", "").strip() or None
    return "trans", _transcription(data, language, language_out), "random"


def _drop_connection() -> Response:
    """Close the TCP connection so the client sees no HTTP response at all."""
    sock: socket.socket | None = request.environ.get("werkzeug.socket")
    if sock is None:
        # Only a real werkzeug server exposes the socket; the test client cannot drop.
        raise ConnectionAbortedError("injected drop needs a real server (EmulatorServer)")
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    # The server still holds a file object on the socket, so this only marks it
    # closed; the pending response write then fails with BrokenPipeError, which
    # werkzeug treats as a client disconnect and swallows quietly.
    sock.close()
    return Response(b"", status=500)


def create_app(
    service: str,
    *,
    job_seconds: float = 1.0,
    latency: float = 0.0,
    hang_seconds: float = 30.0,
    data_dir: str | Path | None = None,
) -> Flask:
    """Build the Flask app emulating ``service`` (one of ``SERVICES``).

    ``job_seconds``: time from submit to completion; ``latency``: delay before
    every service answer; ``hang_seconds``: how long an injected "hang" stalls;
    ``data_dir``: where the jobs are kept (``<data_dir>/<service>.sqlite3``, created if
    missing, jobs found there are served again); None keeps them in memory only.
    """
    if service not in SERVICES:
        raise ValueError(f"unknown service {service!r}; expected one of {SERVICES}")
    app = Flask(f"emulators.media[{service}]")
    store = None
    if data_dir is not None:
        store = _JobStore(Path(data_dir) / f"{service}.sqlite3", json_results=service == "audio-transcriber")
    state = _State(service, job_seconds, store)
    app.extensions["media_emulator"] = state

    @app.before_request
    def _latency_and_faults() -> Any:
        # The control surface is not part of the emulated service, so it is
        # neither delayed nor subject to injected faults.
        if request.path.startswith("/_emulator"):
            return None
        delay = latency if state.latency is None else state.latency
        if delay > 0:
            time.sleep(delay)
        if request.endpoint not in FAULT_ENDPOINTS:
            return None
        fault = state.take_fault(request.endpoint)
        if fault is None:
            return None
        if fault.kind == "hang":
            time.sleep(hang_seconds)
            return None  # then answer normally, long after the client gave up
        if fault.kind == "drop":
            return _drop_connection()
        message = "injected 400: bad request" if fault.kind == "400" else f"injected {fault.kind}"
        return _error(message, int(fault.kind))

    @app.get("/health", endpoint="health")
    def health() -> Any:
        return jsonify({"status": "healthy", "service": service})

    @app.post("/jobs", endpoint="submit")
    def submit() -> Any:
        try:
            stem, result, style = _parse_submit(service)
        except _BadRequest as exc:
            return _error(str(exc), 400)
        key = request.headers.get("Idempotency-Key") or None
        with state.lock:
            state.submit_requests += 1
            if key is not None and key in state.by_key:
                job = state.jobs[state.by_key[key]]
                body = job.status_json()
                return jsonify({k: body[k] for k in ("job_id", "status", "progress")}), 200
            if style == "video":
                # Same video under another key (or none): keep ids unique with _2, _3...
                job_id, n = stem, 2
                while job_id in state.jobs:
                    job_id, n = f"{stem}_{n}", n + 1
            else:
                job_id = f"{stem}_{secrets.token_hex(4)}"
                while job_id in state.jobs:
                    job_id = f"{stem}_{secrets.token_hex(4)}"
            plan = state.plan
            seconds = plan.job_seconds if plan.job_seconds is not None else state.job_seconds
            job = _Job(job_id, key, time.time(), seconds, plan.never_finish, plan.fail, result)
            if state.store is not None:
                state.store.add(job)  # before the answer: a job the client learnt of is kept
            state.jobs[job_id] = job
            if key is not None:
                state.by_key[key] = job_id
            state.submits += 1
        # one job per workflow stage: the key is `instance:step:restarts`
        effects.record("media_submit", f"{service}:{(key or job_id).rsplit(':', 1)[0]}", job_id)
        return jsonify({"job_id": job_id, "status": "queued", "progress": 0.0}), 201

    @app.get("/jobs/<job_id>", endpoint="status")
    def status(job_id: str) -> Any:
        with state.lock:
            job = state.jobs.get(job_id)
            if job is None:
                return _error(f"job {job_id} not found", 404)
            job.status_polls += 1
            return jsonify(job.status_json())

    def _completed_result(job_id: str) -> tuple[_Job | None, Any]:
        with state.lock:
            job = state.jobs.get(job_id)
            if job is None:
                return None, _error(f"job {job_id} not found", 404)
            if job.state()[0] != "completed":
                return None, _error("job not completed", 409)
            # Only successful fetches count: tests use this to spot double downloads.
            job.result_fetches += 1
            return job, None

    if service == "audio-transcriber":

        @app.get("/jobs/<job_id>/transcription", endpoint="result")
        def transcription(job_id: str) -> Any:
            job, failure = _completed_result(job_id)
            return failure if job is None else jsonify(job.result)

    else:
        filename_of = (
            (lambda job_id: f"{job_id}.webm")
            if service == "video-downloader"
            else (lambda job_id: "audio_normalized.webm")
        )

        @app.get("/jobs/<job_id>/download", endpoint="result")
        def download(job_id: str) -> Any:
            job, failure = _completed_result(job_id)
            if job is None:
                return failure
            assert isinstance(job.result, bytes)
            return Response(
                job.result,
                mimetype="application/octet-stream",
                headers={"Content-Disposition": f"attachment; filename={filename_of(job_id)}"},
            )

    @app.post("/admin/factory-reset")
    def factory_reset() -> Any:
        dropped, pending = state.clear_jobs()
        return jsonify({"files_removed": dropped, "tasks_purged": pending})

    @app.post("/_emulator/faults")
    def set_faults() -> Any:
        try:
            faults, plan = _parse_fault_plan(request.get_json(silent=True))
        except _BadRequest as exc:
            return _error(str(exc), 400)
        with state.lock:
            state.faults, state.plan = faults, plan
        return jsonify({"faults": [f.as_json() for f in faults], "job": plan.as_json()})

    @app.get("/_emulator/faults")
    def get_faults() -> Any:
        with state.lock:
            return jsonify({"faults": [f.as_json() for f in state.faults], "job": state.plan.as_json()})

    @app.delete("/_emulator/faults")
    def clear_faults() -> Any:
        with state.lock:
            state.faults, state.plan = [], _JobPlan()
        return jsonify({"faults": [], "job": state.plan.as_json()})

    @app.route("/_emulator/latency", methods=["GET", "POST"])
    def set_latency() -> Any:
        """`{"seconds": s}` delays every service answer by s seconds from now on; null restores
        the server's own latency. GET shows the latency in force."""
        if request.method == "POST":
            body = request.get_json(silent=True)
            seconds = body.get("seconds") if isinstance(body, dict) else "missing"
            if seconds is not None and (isinstance(seconds, bool) or not isinstance(seconds, (int, float))
                                        or not 0 <= seconds <= 600):
                return _error("seconds must be a number from 0 to 600, or null", 400)
            with state.lock:
                state.latency = None if seconds is None else float(seconds)
        return jsonify({"seconds": latency if state.latency is None else state.latency})

    @app.get("/_emulator/stats")
    def stats() -> Any:
        with state.lock:
            jobs = {
                job.job_id: {
                    "idempotency_key": job.idempotency_key,
                    "status": job.state()[0],
                    "status_polls": job.status_polls,
                    "result_fetches": job.result_fetches,
                }
                for job in state.jobs.values()
            }
            return jsonify(
                {"submits": state.submits, "submit_requests": state.submit_requests, "jobs": jobs}
            )

    @app.post("/_emulator/reset")
    def reset() -> Any:
        state.clear_jobs()
        with state.lock:
            state.faults, state.plan = [], _JobPlan()
            state.submits = state.submit_requests = 0
        return jsonify({"reset": True})

    return app


def _parse_fault_plan(body: Any) -> tuple[list[_Fault], _JobPlan]:
    if not isinstance(body, dict):
        raise _BadRequest("body must be a JSON object")
    raw_faults = body.get("faults", [])
    if not isinstance(raw_faults, list):
        raise _BadRequest("faults must be a list")
    faults = []
    for i, raw in enumerate(raw_faults):
        if not isinstance(raw, dict):
            raise _BadRequest(f"faults[{i}] must be an object")
        endpoint, kind, times = raw.get("endpoint"), str(raw.get("kind")), raw.get("times", 1)
        if endpoint not in FAULT_ENDPOINTS:
            raise _BadRequest(f"faults[{i}].endpoint must be one of {', '.join(FAULT_ENDPOINTS)}")
        if kind not in FAULT_KINDS:
            raise _BadRequest(f"faults[{i}].kind must be one of {', '.join(FAULT_KINDS)}")
        if isinstance(times, bool) or not isinstance(times, int) or times < 1:
            raise _BadRequest(f"faults[{i}].times must be a positive integer")
        faults.append(_Fault(endpoint, kind, times))
    job = body.get("job") or {}
    if not isinstance(job, dict):
        raise _BadRequest("job must be an object")
    never_finish, fail, seconds = job.get("never_finish", False), job.get("fail"), job.get("job_seconds")
    if not isinstance(never_finish, bool):
        raise _BadRequest("job.never_finish must be a boolean")
    if fail is not None and not isinstance(fail, str):
        raise _BadRequest("job.fail must be a string or null")
    bad_number = isinstance(seconds, bool) or not isinstance(seconds, (int, float))
    if seconds is not None and (bad_number or seconds < 0):
        raise _BadRequest("job.job_seconds must be a non-negative number or null")
    return faults, _JobPlan(never_finish, fail, None if seconds is None else float(seconds))


class _QuietRequestHandler(WSGIRequestHandler):
    # Per-request access lines would drown test output; errors are still logged.
    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass


class EmulatorServer:
    """One emulated service on a real socket, served from a daemon thread."""

    def __init__(
        self,
        service: str,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        log_requests: bool = False,
        **app_kwargs: Any,
    ) -> None:
        self.service = service
        self.host = host
        self.app = create_app(service, **app_kwargs)
        self._port = port
        self._log_requests = log_requests
        self._server: BaseWSGIServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self._server.server_port if self._server is not None else self._port

    @property
    def url(self) -> str:
        # A wildcard bind address is not something a client can connect to.
        host = "127.0.0.1" if self.host in ("", "0.0.0.0") else self.host
        host = "[::1]" if host == "::" else (f"[{host}]" if ":" in host else host)
        return f"http://{host}:{self.port}"

    def start(self) -> EmulatorServer:
        if self._server is None:
            handler = None if self._log_requests else _QuietRequestHandler
            self._server = make_server(
                self.host, self._port, self.app, threaded=True, request_handler=handler
            )
            # A short poll interval keeps stop() quick; the default waits up to 0.5 s.
            self._thread = threading.Thread(
                target=self._server.serve_forever,
                kwargs={"poll_interval": 0.05},
                name=f"emulator-{self.service}",
                daemon=True,
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        # Request threads are daemons, so a request stuck in an injected hang
        # does not block shutdown.
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server, self._thread = None, None

    def __enter__(self) -> EmulatorServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _ports(value: str) -> list[int]:
    try:
        ports = [int(part) for part in value.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid port list {value!r}") from None
    if len(ports) != len(SERVICES) or any(not 0 <= p <= 65535 for p in ports):
        raise argparse.ArgumentTypeError(f"expected {len(SERVICES)} ports for {', '.join(SERVICES)}")
    return ports


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m emulators.media", description="Serve emulated media pipeline services."
    )
    parser.add_argument("--host", default="127.0.0.1")
    # argparse applies ``type`` to string defaults, so bad env values are reported like bad flags.
    parser.add_argument(
        "--job-seconds", type=float, default=os.environ.get("EMULATOR_JOB_SECONDS", "1.0")
    )
    parser.add_argument("--latency", type=float, default=os.environ.get("EMULATOR_LATENCY", "0"))
    parser.add_argument("--hang-seconds", type=float, default=30.0)
    parser.add_argument(
        "--ports",
        type=_ports,
        default=[DEFAULT_PORTS[s] for s in SERVICES],
        help="comma-separated ports for " + ", ".join(SERVICES) + " (0 picks a free port)",
    )
    parser.add_argument("--log-requests", action="store_true")
    parser.add_argument(
        "--data",
        default=None,
        help="directory keeping every service's jobs across restarts (<service>.sqlite3); "
        "default: in memory only",
    )
    args = parser.parse_args(argv)

    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    servers: list[EmulatorServer] = []
    try:
        for service, port in zip(SERVICES, args.ports):
            server = EmulatorServer(
                service,
                args.host,
                port,
                log_requests=args.log_requests,
                job_seconds=args.job_seconds,
                latency=args.latency,
                hang_seconds=args.hang_seconds,
                data_dir=args.data,
            )
            try:
                servers.append(server.start())
            except OSError as exc:  # typically the port is already taken
                print(f"{service}: cannot listen on {args.host}:{port}: {exc}", file=sys.stderr)
                return 1
            print(f"{service} listening on {server.url}", flush=True)
        # Poll rather than block forever so signal handlers always get to run.
        while not stop.wait(0.5):
            pass
    finally:
        for server in servers:
            server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


if __name__ == "__main__":
    sys.exit(main())
