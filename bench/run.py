"""Engine overhead benchmark on the real services: `python -m bench.run` (also `make bench`).

One run creates its own PostgreSQL database and RabbitMQ vhost, starts one worker (queue
`bench`) and one sweeper from the CLI, and measures with the same worker, broker and backend:

  (a) engine throughput: N three-step `bench` workflows started through the engine, first start
      to last `finished_at`;
  (b) raw baseline: N Celery chains of the same three trivial tasks, first apply to last
      `date_done`;
  (c) latency of single workflows (POST /saga -> state "done") against single raw chains;
  (d) peak RSS of the worker (main process and pool children) during (a) and (b);
  (e) CPU time per workflow of the worker and of the database's server backends in (a) and (b),
      to tell where the engine's overhead goes.

Everything it created is removed at the end (results in the Redis backend expire on their own).
Service addresses can be changed with BENCH_PG_ADMIN_URL, BENCH_AMQP_URL and BENCH_REDIS_URL.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlparse

ROOT = Path(__file__).resolve().parents[1]
PG_ADMIN = os.environ.get("BENCH_PG_ADMIN_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/test")
AMQP = os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672")
REDIS = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/2")
QUEUE = "bench"
WARMUP = 8


class BenchError(Exception):
    """Stops the run with a message; resources are cleaned up first."""


def note(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


# -- services ----------------------------------------------------------------------------------
def _where(url: str) -> str:
    u = urlparse(url.replace("postgresql+psycopg2", "postgresql"))
    return f"{u.hostname}:{u.port}" if u.port else str(u.hostname)


def check_services() -> None:
    """Fail fast, naming the service, when one of the three is not reachable."""
    from sqlalchemy import create_engine, text

    try:
        eng = create_engine(PG_ADMIN, connect_args={"connect_timeout": 3})
        with eng.connect() as conn:
            conn.execute(text("SELECT 1"))
        eng.dispose()
    except Exception as exc:
        raise BenchError(f"PostgreSQL at {_where(PG_ADMIN)} is not reachable: {_first_line(exc)}") from None

    from kombu import Connection

    try:
        with Connection(AMQP + "//", connect_timeout=3) as conn:
            conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0)
    except Exception as exc:
        raise BenchError(f"RabbitMQ at {_where(AMQP)} is not reachable: {_first_line(exc)}") from None

    import redis

    try:
        redis.Redis.from_url(REDIS, socket_connect_timeout=3, socket_timeout=3).ping()
    except Exception as exc:
        raise BenchError(f"Redis at {_where(REDIS)} is not reachable: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def _rabbitmqctl(*args: str) -> bool:
    ctl = shutil.which("rabbitmqctl")
    if ctl is None:
        return False
    try:
        return subprocess.run([ctl, *args], capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


# -- processes and memory ----------------------------------------------------------------------
class Process:
    """An orchestrator process started from the CLI in a session (process group) of its own."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], logdir: Path) -> None:
        self.name = name
        self.log = logdir / f"{name}.log"
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "orchestrator.entrypoints.cli", *args], env=env,
                                         cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 20.0) -> None:
        if self.alive():
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
            except ProcessLookupError:
                pass

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def _descendants(root: int) -> list[int]:
    """root and all its descendants, from the parent links in /proc/<pid>/stat."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def _rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _cpu_ticks(pid: int) -> int:
    """utime + stime of one process, in clock ticks (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])
    except (OSError, ValueError, IndexError):
        return 0


class RssSampler(threading.Thread):
    """Sums VmRSS over a process tree every `interval` seconds; keeps the maximum."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        super().__init__(daemon=True, name="rss-sampler")
        self.pid = pid
        self.interval = interval
        self.peak_kib = 0
        self.samples = 0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            total = sum(_rss_kib(p) for p in _descendants(self.pid))
            self.peak_kib = max(self.peak_kib, total)
            self.samples += 1
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join(5)


# -- helpers -----------------------------------------------------------------------------------
def wait_for(predicate: Callable[[], Any], timeout: float, interval: float, what: str,
             check: Callable[[], None] | None = None) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if check is not None:
            check()
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def _utc(value: Any) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value if value.tzinfo is not None else value.replace(tzinfo=timezone.utc)


def raw_chain(app: Any) -> Any:
    """The baseline: the same three links as one Celery chain, from the runtime's app (so the
    tasks' own options, queue included, apply)."""
    from celery import chain

    return chain(*(app.tasks[f"bench.raw_{n}"].si() for n in ("one", "two", "three")))


# -- the benchmark -----------------------------------------------------------------------------
class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.tag = uuid.uuid4().hex[:8]
        self.admin: Any = None
        self.database: str | None = None
        self.vhost: str | None = None
        self.logdir = Path(tempfile.mkdtemp(prefix="orch-bench-"))
        self.procs: list[Process] = []
        self.worker: Process | None = None
        self.rt: Any = None
        self.failed = False
        self._started_in = 0.0

    # -- setup and teardown --------------------------------------------------------------------
    def setup(self) -> None:
        from sqlalchemy import create_engine, text

        from orchestrator import runtime
        from orchestrator.config import load_settings
        from orchestrator.migrate import upgrade

        self.admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
        name = f"orch_bench_{self.tag}"
        with self.admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        self.database = name
        database_url = PG_ADMIN.rsplit("/", 1)[0] + "/" + name
        upgrade(database_url)

        vhost = f"orch-bench-{self.tag}"
        user = urlparse(AMQP).username or "guest"
        if _rabbitmqctl("add_vhost", vhost):
            self.vhost = vhost
            if not _rabbitmqctl("set_permissions", "-p", vhost, user, ".*", ".*", ".*"):
                raise BenchError(f"could not grant {user} access to RabbitMQ vhost {vhost}")
            broker_url = f"{AMQP}/{vhost}"
        else:
            note("rabbitmqctl unavailable; using the default vhost")
            broker_url = f"{AMQP}//"

        base = {k: v for k, v in os.environ.items()
                if not k.startswith(("CELERY_", "DATABASE_", "POSTGRES_", "REDIS_"))}
        self.env = {
            **base,
            "DATABASE_URL": database_url,
            "CELERY_BROKER_URL": broker_url,
            "CELERY_RESULT_BACKEND": REDIS,
            "REDIS_URL": REDIS,
            "WORKFLOW_MODULES": "sagas,tasks,bench.workflow",
            "PYTHONPATH": str(ROOT),
            "LOG_LEVEL": "WARNING",
            "SWEEP_INTERVAL": "0.2",
        }
        self.rt = runtime.install(runtime.build(load_settings(environ=self.env, dotenv=os.devnull)))

        self.worker = self._start("worker", ["worker", "--concurrency", str(self.args.concurrency),
                                             "--pool", self.args.pool, "--queues", QUEUE,
                                             "--name", f"{QUEUE}@%h"])
        self._start("sweeper", ["sweeper"])
        wait_for(self._pinged, timeout=60, interval=0.2, what="the worker to answer ping",
                 check=self.check_processes)

    def _start(self, name: str, args: list[str]) -> Process:
        proc = Process(name, args, self.env, self.logdir)
        self.procs.append(proc)
        return proc

    def _pinged(self) -> bool:
        replies = self.rt.celery.control.ping(timeout=0.5)
        return any(node.startswith(f"{QUEUE}@") for reply in replies for node in reply)

    def check_processes(self) -> None:
        for proc in self.procs:
            if not proc.alive():
                raise BenchError(f"the {proc.name} exited with {proc.proc.returncode}:\n{proc.tail()}")

    def teardown(self) -> None:
        for proc in self.procs:
            try:
                proc.stop()
            except Exception as exc:  # keep cleaning up
                note(f"stopping the {proc.name}: {_first_line(exc)}")
        if self.vhost is not None and not _rabbitmqctl("delete_vhost", self.vhost):
            note(f"could not delete RabbitMQ vhost {self.vhost}")
        elif self.vhost is None and self.rt is not None:
            self._delete_queue()
        if self.rt is not None:
            from orchestrator import runtime

            try:
                self.rt.celery.close()
            except Exception:
                pass
            runtime.reset()
        if self.database is not None:
            from sqlalchemy import text

            try:
                with self.admin.connect() as conn:
                    conn.execute(text(f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)'))
            except Exception as exc:
                note(f"could not drop database {self.database}: {_first_line(exc)}")
        if self.admin is not None:
            self.admin.dispose()
        if self.failed:
            note(f"process logs kept in {self.logdir}")
        else:
            shutil.rmtree(self.logdir, ignore_errors=True)

    def _delete_queue(self) -> None:
        """On the shared default vhost, remove the benchmark's queue and exchange again."""
        try:
            with self.rt.celery.connection_for_write() as conn:
                conn.ensure_connection(max_retries=1)
                conn.default_channel.queue_delete(QUEUE)
                conn.default_channel.exchange_delete(QUEUE)
        except Exception as exc:
            note(f"could not delete the {QUEUE} queue: {_first_line(exc)}")

    # -- database reads ------------------------------------------------------------------------
    def _scalar(self, sql: str, **params: Any) -> Any:
        from sqlalchemy import text

        with self.rt.sessions() as s:
            return s.execute(text(sql), params).scalar()

    def count_done(self) -> int:
        return int(self._scalar("SELECT count(*) FROM workflow_instances "
                                "WHERE type = 'bench' AND state = 'done'"))

    def states(self) -> str:
        from sqlalchemy import text

        with self.rt.sessions() as s:
            rows = s.execute(text("SELECT coalesce(state, '-'), count(*) FROM workflow_instances "
                                  "WHERE type = 'bench' GROUP BY 1 ORDER BY 1")).all()
        return ", ".join(f"{state}={n}" for state, n in rows) or "none"

    # -- phases --------------------------------------------------------------------------------
    def _start_many(self, n: int, start: Callable[[int], Any]) -> list[Any]:
        with ThreadPoolExecutor(self.args.threads) as pool:
            return list(pool.map(start, range(n)))

    def _engine_batch(self, n: int, timeout: float) -> float:
        """Start n workflows; wait for all to be done. Workflows per second, first start to last
        `finished_at`."""
        engine = self.rt.engine
        target = self.count_done() + n
        first = datetime.now(timezone.utc)
        self._start_many(n, lambda i: engine.start("bench", {"i": i}))
        self._started_in = (datetime.now(timezone.utc) - first).total_seconds()
        try:
            wait_for(lambda: self.count_done() >= target, timeout=timeout, interval=0.2,
                     what=f"{n} bench workflows to finish", check=self.check_processes)
        except BenchError as exc:
            raise BenchError(f"{exc} (states: {self.states()})") from None
        last = _utc(self._scalar("SELECT max(finished_at) FROM workflow_instances "
                                 "WHERE type = 'bench' AND created_at >= :t", t=first))
        assert last is not None
        return n / max(1e-6, (last - first).total_seconds())

    def _raw_batch(self, n: int, timeout: float) -> float:
        """Apply n chains; wait until each chain's last result is ready. Chains per second, first
        apply to last `date_done`."""
        first = datetime.now(timezone.utc)
        pending = self._start_many(n, lambda _: raw_chain(self.rt.celery).apply_async())
        self._started_in = (datetime.now(timezone.utc) - first).total_seconds()
        results = list(pending)

        def all_ready() -> bool:
            nonlocal pending
            pending = [r for r in pending if not r.ready()]
            return not pending

        try:
            wait_for(all_ready, timeout=timeout, interval=0.2, what=f"{n} raw chains to finish",
                     check=self.check_processes)
        except BenchError as exc:
            states = sorted({r.state for r in pending[:20]})
            raise BenchError(f"{exc} ({len(pending)} not ready; states {', '.join(states)})") from None
        failed = [r for r in results if not r.successful()]
        if failed:
            raise BenchError(f"{len(failed)} raw chains failed, e.g. {failed[0].result!r}")
        last = max(_utc(r.date_done) for r in results)  # type: ignore[type-var]
        return n / max(1e-6, (last - first).total_seconds())

    def warm_up(self) -> None:
        """A few of each first, so every pool process has its connections and imports."""
        self._engine_batch(WARMUP, timeout=60)
        self._raw_batch(WARMUP, timeout=60)

    def cpu_ticks(self) -> dict[str, dict[int, int]]:
        """CPU used so far by the worker (and its pool) and by this database's server backends."""
        from sqlalchemy import text

        assert self.worker is not None
        with self.admin.connect() as conn:
            backends = conn.execute(text("SELECT pid FROM pg_stat_activity WHERE datname = :d"),
                                    {"d": self.database}).scalars().all()
        return {"worker": {p: _cpu_ticks(p) for p in _descendants(self.worker.pid)},
                "postgres": {p: _cpu_ticks(p) for p in backends}}

    def cpu_ms_since(self, before: dict[str, dict[int, int]], n: int) -> dict[str, float]:
        """CPU milliseconds per workflow since `before`, by kind of process."""
        after = self.cpu_ticks()
        tick_ms = 1000 / os.sysconf("SC_CLK_TCK")
        return {kind: sum(max(0, t - before[kind].get(p, 0)) for p, t in after[kind].items()) * tick_ms / n
                for kind in after}

    def throughput(self) -> tuple[float, float, float, dict[str, float], dict[str, float]]:
        n = self.args.n
        assert self.worker is not None
        sampler = RssSampler(self.worker.pid)
        sampler.start()
        # Alternate engine and raw rounds and keep the medians, so a load change on the
        # machine during the run hits both sides alike.
        engine_rates, raw_rates, engine_cpus, raw_cpus = [], [], [], []
        try:
            for r in range(1, self.args.rounds + 1):
                note(f"(a) round {r}: engine, {n} workflows ...")
                cpu = self.cpu_ticks()
                engine_rates.append(self._engine_batch(n, timeout=max(60.0, n * 0.5)))
                engine_cpus.append(self.cpu_ms_since(cpu, n))
                note(f"    all started in {self._started_in:.2f}s, done in {n / engine_rates[-1]:.2f}s")
                note(f"(b) round {r}: raw, {n} chains ...")
                cpu = self.cpu_ticks()
                raw_rates.append(self._raw_batch(n, timeout=max(60.0, n * 0.5)))
                raw_cpus.append(self.cpu_ms_since(cpu, n))
                note(f"    all applied in {self._started_in:.2f}s, done in {n / raw_rates[-1]:.2f}s")
        finally:
            sampler.stop()

        def median_cpu(samples: list[dict[str, float]]) -> dict[str, float]:
            return {k: statistics.median(s[k] for s in samples) for k in samples[0]}

        return (statistics.median(engine_rates), statistics.median(raw_rates), sampler.peak_kib / 1024,
                median_cpu(engine_cpus), median_cpu(raw_cpus))

    def latency(self) -> tuple[list[float], list[float]]:
        from web import create_app

        n = self.args.latency_n
        client = create_app(self.rt).test_client()
        engine = self.rt.engine
        note(f"(c) latency: {n} single workflows, then {n} single chains ...")
        engine_ms: list[float] = []
        for _ in range(n):
            t0 = time.perf_counter()
            resp = client.post("/saga", json={"type": "bench", "input": {}})
            if resp.status_code != 201:
                raise BenchError(f"POST /saga answered {resp.status_code}: {resp.get_data(as_text=True)}")
            instance_id = resp.json["id"]
            wait_for(lambda: engine.snapshot(instance_id)["state"] == "done", timeout=30,
                     interval=0.005, what=f"workflow {instance_id} to finish", check=self.check_processes)
            engine_ms.append((time.perf_counter() - t0) * 1000)
        raw_ms: list[float] = []
        for _ in range(n):
            t0 = time.perf_counter()
            result = raw_chain(self.rt.celery).apply_async()
            wait_for(result.ready, timeout=30, interval=0.005, what="a raw chain to finish",
                     check=self.check_processes)
            raw_ms.append((time.perf_counter() - t0) * 1000)
        return engine_ms, raw_ms

    def run(self) -> None:
        a = self.args
        note(f"n={a.n} latency-n={a.latency_n} concurrency={a.concurrency} threads={a.threads}")
        started = time.monotonic()
        self.setup()
        note(f"worker and sweeper up after {time.monotonic() - started:.1f}s; warming up ...")
        self.warm_up()
        engine_rate, raw_rate, peak_mib, engine_cpu, raw_cpu = self.throughput()
        engine_ms, raw_ms = self.latency()
        note(f"done in {time.monotonic() - started:.1f}s")
        print(f"engine   3-step workflows/s   {engine_rate:7.1f}")
        print(f"raw      3-step chains/s      {raw_rate:7.1f}")
        print(f"ratio    engine/raw           {engine_rate / raw_rate:7.2f}")
        print(f"latency  POST /saga -> done   median {statistics.median(engine_ms):.1f} ms  "
              f"p95 {percentile(engine_ms, 95):.1f} ms   (raw chain: median "
              f"{statistics.median(raw_ms):.1f} ms p95 {percentile(raw_ms, 95):.1f} ms)")
        print(f"cpu      per workflow         worker {engine_cpu['worker']:.1f} ms  postgres "
              f"{engine_cpu['postgres']:.1f} ms   (raw chain: worker {raw_cpu['worker']:.1f} ms)")
        print(f"worker   peak RSS             {peak_mib:7.1f} MiB")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=300, help="workflows (and chains) for throughput (300)")
    p.add_argument("--latency-n", type=int, default=30, help="single workflows for latency (30)")
    p.add_argument("--concurrency", type=int, default=4, help="worker pool processes (4)")
    p.add_argument("--pool", default="prefork", choices=("prefork", "threads"),
                   help="worker pool, the same for both sides (prefork)")
    p.add_argument("--rounds", type=int, default=3, help="alternating engine/raw rounds; medians (3)")
    p.add_argument("--threads", type=int, default=4, help="threads starting workflows (4)")
    p.add_argument("--kafka-n", type=int, default=2000, help="events for the Kafka intake figures (2000; 0 skips)")
    args = p.parse_args(argv)
    if args.kafka_n < 0 or args.kafka_n == 1:
        p.error("--kafka-n must be 0 (skip) or at least 2")
    for name in ("n", "latency_n", "concurrency", "threads", "rounds"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    def _terminate(*_: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _terminate)
    try:
        check_services()
    except BenchError as exc:
        sys.exit(f"bench: {exc}")
    bench = Bench(args)
    code = 0
    try:
        bench.run()
    except BenchError as exc:
        bench.failed = True
        note(str(exc))
        code = 1
    except BaseException as exc:
        bench.failed = True
        if not isinstance(exc, KeyboardInterrupt):
            raise
        note("interrupted")
        code = 130
    finally:
        bench.teardown()
    if code == 0 and args.kafka_n:
        from bench.kafka_intake import report

        report(args.kafka_n)
    sys.exit(code)


if __name__ == "__main__":
    main()
