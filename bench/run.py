"""Engine benchmark beside its peers, on the real services: `python -m bench.run` (also `make bench`).

One run creates its own PostgreSQL database and RabbitMQ vhost, starts one engine worker (queue
`bench`), one sweeper, one plain Celery worker (bench/plain_app.py, queue `bench-plain`) and one
DBOS Transact process (bench/dbos_peer.py, on a system database of its own), and measures:

  (a) throughput of trivial three-step workflows, in alternating rounds (medians) of
        engine      the `bench` workflow (bench/workflow.py): every transition committed, outbox;
        raw         the same three links as a plain Celery chain, on the engine's worker;
        upsert      a Celery chain whose links each upsert a state row (bench/handrolled.py);
        plain       the raw chain on the plain Celery worker (its memory is the peer of (d));
        DBOS        the same workflow on DBOS Transact, its queue polled every 10 ms
                    (paused with SIGSTOP while the others run, so its polling costs them nothing);
  (b) latency of single workflows: POST /saga -> state "done" (the instance's finished_at),
      against single raw chains, upsert chains and DBOS workflows, each to the completion its
      own store records;
  (c) CPU time per workflow of the worker and of the database's server backends;
  (d) peak RSS of the engine's worker (main process and pool children) against the plain worker;
  (e) parked workflows (bench/parked.py): memory growth of the worker and sweeper while N wait on
      timers and signals, and how fast the sweeper fires N timers that come due at once;
  (f) Kafka intake (bench/kafka_intake.py): one bridge against the raw consume rate, and the
      outbox relay producing what the bridge wrote (how far its last message ends behind);
  (g) `make run`'s embedded defaults (bench/embedded.py): the engine and the raw chain on SQLite
      and kombu's SQLite broker, printed without a target.

It ends with one table: every figure, its peer, its target and whether it holds. Everything it
created is removed at the end (results in the Redis backend expire on their own). Service
addresses can be changed with BENCH_PG_ADMIN_URL, BENCH_AMQP_URL and BENCH_REDIS_URL.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlparse

from .procs import (BenchError, Process, RssSampler, cpu_seconds, descendants, first_line, note, percentile,
                    wait_for)
from .table import Row, at_least, at_most, render

ROOT = Path(__file__).resolve().parents[1]
PG_ADMIN = os.environ.get("BENCH_PG_ADMIN_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/test")
AMQP = os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672")
REDIS = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/2")
QUEUE = "bench"
WARMUP = 8
PEERS = ("engine", "raw", "upsert", "plain", "dbos")

#: Labels of the closing table's rows, in order (the end-to-end test checks every one is there).
ROWS = (
    "throughput vs raw Celery chain",
    "latency median vs raw chain",
    "latency p95 vs raw chain",
    "throughput vs DBOS",
    "latency median vs DBOS",
    "throughput vs hand-rolled upsert chain",
    "worker peak RSS vs plain Celery worker",
    "worker peak PSS vs plain Celery worker",
    "parked: RSS growth worker + sweeper",
    "parked: timers fired when all due at once",
    "Kafka intake (one bridge)",
    "Kafka: outbox relay behind the bridge",
    "embedded defaults: throughput vs raw chain",
)

#: The outbox relay keeps up with the bridge when its last message goes out at most this long
#: (seconds) after the bridge accepted the last event.
RELAY_BEHIND_MAX_S = 1.0


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
        raise BenchError(f"PostgreSQL at {_where(PG_ADMIN)} is not reachable: {first_line(exc)}") from None

    from kombu import Connection

    try:
        with Connection(AMQP + "//", connect_timeout=3) as conn:
            conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0)
    except Exception as exc:
        raise BenchError(f"RabbitMQ at {_where(AMQP)} is not reachable: {first_line(exc)}") from None

    import redis

    try:
        redis.Redis.from_url(REDIS, socket_connect_timeout=3, socket_timeout=3).ping()
    except Exception as exc:
        raise BenchError(f"Redis at {_where(REDIS)} is not reachable: {first_line(exc)}") from None


def _rabbitmqctl(*args: str) -> bool:
    ctl = shutil.which("rabbitmqctl")
    if ctl is None:
        return False
    try:
        return subprocess.run([ctl, *args], capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


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


class DbosPeer:
    """The DBOS process (bench/dbos_peer.py): one JSON command a line in, one reply a line out.
    Paused (SIGSTOP) between commands so that its 10 ms queue polling loads no other round."""

    def __init__(self, url: str, env: dict[str, str], logdir: Path) -> None:
        self.proc = Process("dbos", [], env, logdir, pipes=True,
                            argv=[sys.executable, "-m", "bench.dbos_peer", url])

    def _read(self, timeout: float) -> dict[str, Any]:
        import select

        out = self.proc.proc.stdout
        assert out is not None
        ready, _, _ = select.select([out], [], [], timeout)
        line = out.readline() if ready else ""
        if not line:
            raise BenchError(f"the DBOS peer did not answer within {timeout:.0f}s:\n{self.proc.tail()}")
        reply: dict[str, Any] = json.loads(line)
        if "error" in reply:
            raise BenchError(f"the DBOS peer failed: {reply['error']}")
        return reply

    def ready(self, timeout: float = 120) -> None:
        self._read(timeout)
        self.proc.signal(signal.SIGSTOP)

    def ask(self, timeout: float, **cmd: Any) -> dict[str, Any]:
        self.proc.signal(signal.SIGCONT)
        try:
            assert self.proc.proc.stdin is not None
            self.proc.proc.stdin.write(json.dumps(cmd) + "\n")
            self.proc.proc.stdin.flush()
            return self._read(timeout)
        finally:
            self.proc.signal(signal.SIGSTOP)

    def close(self) -> None:
        if self.proc.alive():
            self.proc.signal(signal.SIGCONT)
            try:
                assert self.proc.proc.stdin is not None
                self.proc.proc.stdin.close()  # end of input: DBOS is destroyed, the process exits
                self.proc.proc.wait(20)
            except (OSError, subprocess.TimeoutExpired):
                pass
        self.proc.stop()


# -- the benchmark -----------------------------------------------------------------------------
class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.tag = uuid.uuid4().hex[:8]
        self.admin: Any = None
        self.databases: list[str] = []
        self.vhost: str | None = None
        self.logdir = Path(tempfile.mkdtemp(prefix="orch-bench-"))
        self.procs: list[Process] = []
        self.worker: Process | None = None
        self.plain_worker: Process | None = None
        self.sweeper: Process | None = None
        self.dbos: DbosPeer | None = None
        self.plain: Any = None
        self.rt: Any = None
        self.failed = False
        self.results: dict[str, Any] = {}
        self._started_in = 0.0

    # -- setup and teardown --------------------------------------------------------------------
    def _create_database(self, name: str) -> str:
        from sqlalchemy import text

        with self.admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        self.databases.append(name)
        return PG_ADMIN.rsplit("/", 1)[0] + "/" + name

    def setup(self) -> None:
        from sqlalchemy import create_engine, text

        from orchestrator import runtime
        from orchestrator.config import load_settings
        from orchestrator.migrate import upgrade

        from .handrolled import TABLE_DDL
        from .plain_app import QUEUE as PLAIN_QUEUE
        from .plain_app import make_app

        self.admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
        database_url = self._create_database(f"orch_bench_{self.tag}")
        upgrade(database_url)
        dbos_url = self._create_database(f"orch_bench_dbos_{self.tag}").replace("postgresql+psycopg2", "postgresql")

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
                if not k.startswith(("CELERY_", "DATABASE_", "POSTGRES_", "REDIS_", "DBOS_"))}
        self.env = {
            **base,
            "DATABASE_URL": database_url,
            "CELERY_BROKER_URL": broker_url,
            "CELERY_RESULT_BACKEND": REDIS,
            "REDIS_URL": REDIS,
            "WORKFLOW_MODULES": "sagas,tasks,bench.workflow,bench.handrolled,bench.parked_workflow",
            "PYTHONPATH": str(ROOT),
            "LOG_LEVEL": "WARNING",
            "SWEEP_INTERVAL": "0.2",
        }
        # this process starts the workflows and relays their first message, as the API does, and
        # like the API it tests each pooled connection before use (`orchestrator api`)
        self.rt = runtime.install(runtime.build(load_settings(environ=self.env, dotenv=os.devnull), pre_ping=True))
        with self.rt.sessions() as s, s.begin():
            s.execute(text(TABLE_DDL))
        self.plain = make_app(broker_url, REDIS)

        a = self.args
        self.worker = self._start("worker", ["worker", "--concurrency", str(a.concurrency), "--pool", a.pool,
                                             "--queues", QUEUE, "--name", f"{QUEUE}@%h"])
        self.sweeper = self._start("sweeper", ["sweeper"])
        self.plain_worker = self._start("plain-worker", [], argv=[
            sys.executable, "-m", "celery", "-A", "bench.plain_app", "worker", "--loglevel", "WARNING",
            "-Q", PLAIN_QUEUE, "-c", str(a.concurrency), "--pool", a.pool, "-n", f"{PLAIN_QUEUE}@%h"])
        self.dbos = DbosPeer(dbos_url, self.env, self.logdir)
        wait_for(self._pinged, timeout=60, interval=0.2, what="both workers to answer ping",
                 check=self.check_processes)
        self.dbos.ready()

    def _start(self, name: str, args: list[str], argv: list[str] | None = None) -> Process:
        proc = Process(name, args, self.env, self.logdir, argv=argv)
        self.procs.append(proc)
        return proc

    def _pinged(self) -> bool:
        replies = self.rt.celery.control.ping(timeout=0.5)
        nodes = {node.split("@")[0] for reply in replies for node in reply}
        return {QUEUE, "bench-plain"} <= nodes

    def check_processes(self) -> None:
        for proc in self.procs + ([self.dbos.proc] if self.dbos else []):
            if not proc.alive():
                raise BenchError(f"the {proc.name} exited with {proc.proc.returncode}:\n{proc.tail()}")

    def teardown(self) -> None:
        if self.dbos is not None:
            self.dbos.close()
        for proc in self.procs:
            try:
                proc.stop()
            except Exception as exc:  # keep cleaning up
                note(f"stopping the {proc.name}: {first_line(exc)}")
        if self.vhost is not None and not _rabbitmqctl("delete_vhost", self.vhost):
            note(f"could not delete RabbitMQ vhost {self.vhost}")
        elif self.vhost is None and self.rt is not None:
            self._delete_queues()
        for app in (self.plain, self.rt.celery if self.rt else None):
            try:
                if app is not None:
                    app.close()
            except Exception:
                pass
        if self.rt is not None:
            from orchestrator import runtime

            runtime.reset()
        from sqlalchemy import text

        for name in self.databases:
            try:
                with self.admin.connect() as conn:
                    conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            except Exception as exc:
                note(f"could not drop database {name}: {first_line(exc)}")
        if self.admin is not None:
            self.admin.dispose()
        if self.failed:
            note(f"process logs kept in {self.logdir}")
        else:
            shutil.rmtree(self.logdir, ignore_errors=True)

    def _delete_queues(self) -> None:
        """On the shared default vhost, remove the benchmark's queues and exchanges again."""
        try:
            with self.rt.celery.connection_for_write() as conn:
                conn.ensure_connection(max_retries=1)
                for name in (QUEUE, "bench-plain"):
                    conn.default_channel.queue_delete(name)
                    conn.default_channel.exchange_delete(name)
        except Exception as exc:
            note(f"could not delete the benchmark's queues: {first_line(exc)}")

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

    # -- one batch of each peer ----------------------------------------------------------------
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

    def _chain_batch(self, n: int, timeout: float, make: Callable[[int], Any], what: str) -> float:
        """Apply n chains made by `make(i)`; wait until each chain's last result is ready.
        Chains per second, first apply to last `date_done`."""
        first = datetime.now(timezone.utc)
        pending = self._start_many(n, lambda i: make(i).apply_async())
        self._started_in = (datetime.now(timezone.utc) - first).total_seconds()
        results = list(pending)

        def all_ready() -> bool:
            nonlocal pending
            pending = [r for r in pending if not r.ready()]
            return not pending

        try:
            wait_for(all_ready, timeout=timeout, interval=0.2, what=f"{n} {what} chains to finish",
                     check=self.check_processes)
        except BenchError as exc:
            states = sorted({r.state for r in pending[:20]})
            raise BenchError(f"{exc} ({len(pending)} not ready; states {', '.join(states)})") from None
        failed = [r for r in results if not r.successful()]
        if failed:
            raise BenchError(f"{len(failed)} {what} chains failed, e.g. {failed[0].result!r}")
        last = max(_utc(r.date_done) for r in results)  # type: ignore[type-var]
        return n / max(1e-6, (last - first).total_seconds())

    def _maker(self, peer: str) -> Callable[[int], Any]:
        from .handrolled import upsert_chain
        from .plain_app import plain_chain

        if peer == "raw":
            return lambda _: raw_chain(self.rt.celery)
        if peer == "upsert":
            return lambda i: upsert_chain(self.rt.celery, f"{uuid.uuid4().hex}")
        return lambda _: plain_chain(self.plain)

    def batch(self, peer: str, n: int) -> float:
        """One batch of n three-step runs of `peer`: runs per second."""
        timeout = max(60.0, n * 0.5)
        if peer == "engine":
            return self._engine_batch(n, timeout)
        if peer == "dbos":
            assert self.dbos is not None
            self._started_in = 0.0  # enqueued inside the DBOS process, not timed apart
            return float(self.dbos.ask(timeout, op="throughput", n=n, threads=self.args.threads)["rate"])
        return self._chain_batch(n, timeout, self._maker(peer), peer)

    # -- phases --------------------------------------------------------------------------------
    def warm_up(self) -> None:
        """A few of each first, so every pool process has its connections and imports."""
        for peer in PEERS:
            self.batch(peer, WARMUP)

    def cpu_seconds(self) -> dict[str, dict[int, float]]:
        """CPU used so far by the worker (and its pool) and by this database's server backends."""
        from sqlalchemy import text

        assert self.worker is not None
        with self.admin.connect() as conn:
            backends = conn.execute(text("SELECT pid FROM pg_stat_activity WHERE datname = :d"),
                                    {"d": self.databases[0]}).scalars().all()
        return {"worker": {p: cpu_seconds(p) for p in descendants(self.worker.pid)},
                "postgres": {p: cpu_seconds(p) for p in backends}}

    def cpu_ms_since(self, before: dict[str, dict[int, float]], n: int) -> dict[str, float]:
        """CPU milliseconds per workflow since `before`, by kind of process."""
        after = self.cpu_seconds()
        return {kind: sum(max(0.0, t - before[kind].get(p, 0.0)) for p, t in after[kind].items()) * 1000 / n
                for kind in after}

    def throughput(self) -> None:
        n = self.args.n
        assert self.worker is not None and self.plain_worker is not None
        samplers = {"engine": RssSampler(self.worker.pid), "plain": RssSampler(self.plain_worker.pid)}
        for s in samplers.values():
            s.start()
        # Alternate the peers' rounds and keep the medians, so a load change on the machine
        # during the run hits every side alike.
        rates: dict[str, list[float]] = {p: [] for p in PEERS}
        cpus: dict[str, list[dict[str, float]]] = {"engine": [], "raw": []}
        try:
            for r in range(1, self.args.rounds + 1):
                for peer in PEERS:
                    note(f"(a) round {r}: {peer}, {n} runs ...")
                    cpu = self.cpu_seconds() if peer in cpus else None
                    rates[peer].append(self.batch(peer, n))
                    if cpu is not None:
                        cpus[peer].append(self.cpu_ms_since(cpu, n))
                    started = f" (all started in {self._started_in:.2f}s)" if self._started_in else ""
                    note(f"    {rates[peer][-1]:.1f}/s{started}")
        finally:
            for s in samplers.values():
                s.stop()
        self.results["rate"] = {p: statistics.median(v) for p, v in rates.items()}
        self.results["rates"] = rates
        self.results["cpu"] = {p: {k: statistics.median(s[k] for s in v) for k in v[0]} for p, v in cpus.items()}
        self.results["rss"] = {p: s.peak_kib / 1024 for p, s in samplers.items()}
        self.results["pss"] = {p: s.peak_pss_kib / 1024 for p, s in samplers.items()}

    def latency(self) -> None:
        """One run at a time, from its start to its completion as its own store records it (the
        instance's `finished_at`, the last link's `date_done`, DBOS's `updated_at`), as the
        throughput rounds take it. Each run is polled until it is done before the next starts;
        the poll only paces the runs: timing it would add each store's read cost (a snapshot
        from PostgreSQL against a Redis GET) and up to one polling interval to the figure."""
        from web import create_app

        n = self.args.latency_n
        client = create_app(self.rt).test_client()
        engine = self.rt.engine
        note(f"(b) latency: {n} single runs of each ...")
        ms: dict[str, list[float]] = {"engine": []}
        for _ in range(n):
            t0 = datetime.now(timezone.utc)
            resp = client.post("/saga", json={"type": "bench", "input": {}})
            if resp.status_code != 201:
                raise BenchError(f"POST /saga answered {resp.status_code}: {resp.get_data(as_text=True)}")
            instance_id = resp.json["id"]
            wait_for(lambda: engine.snapshot(instance_id, history=False)["state"] == "done", timeout=30,
                     interval=0.005, what=f"workflow {instance_id} to finish", check=self.check_processes)
            done = _utc(self._scalar("SELECT finished_at FROM workflow_instances WHERE id = :i", i=instance_id))
            assert done is not None
            ms["engine"].append((done - t0).total_seconds() * 1000)
        for peer in ("raw", "upsert"):
            make = self._maker(peer)
            ms[peer] = []
            for i in range(n):
                t0 = datetime.now(timezone.utc)
                result = make(i).apply_async()
                wait_for(result.ready, timeout=30, interval=0.005, what=f"a {peer} chain to finish",
                         check=self.check_processes)
                done = _utc(result.date_done)
                assert done is not None
                ms[peer].append((done - t0).total_seconds() * 1000)
        assert self.dbos is not None
        ms["dbos"] = self.dbos.ask(max(60.0, n * 2.0), op="latency", n=n)["ms"]
        self.results["latency"] = ms

    def parked(self) -> None:
        from . import parked

        assert self.worker is not None and self.sweeper is not None
        self.results["parked"] = parked.measure(self.rt, self.worker.pid, self.sweeper.pid, self.args.parked,
                                                self.args.threads, self.check_processes)

    def run(self) -> None:
        a = self.args
        note(f"n={a.n} rounds={a.rounds} latency-n={a.latency_n} parked={a.parked} kafka-n={a.kafka_n} "
             f"concurrency={a.concurrency} pool={a.pool} threads={a.threads}")
        started = time.monotonic()
        self.setup()
        note(f"workers, sweeper and DBOS up after {time.monotonic() - started:.1f}s; warming up ...")
        self.warm_up()
        self.throughput()
        self.latency()
        if self.dbos is not None:
            self.dbos.close()  # its work is done: its polling must not load the parked phase
            self.dbos = None
        if a.parked:
            self.parked()
        note(f"(a)-(e) done in {time.monotonic() - started:.1f}s")


# -- report ------------------------------------------------------------------------------------
def _lat(ms: list[float]) -> str:
    return f"median {statistics.median(ms):6.1f} ms  p95 {percentile(ms, 95):6.1f} ms"


def report(res: dict[str, Any], args: argparse.Namespace) -> list[Row]:
    """Print every figure beside its peer; the rows of the closing table."""
    rate, lat = res["rate"], res["latency"]
    names = {"engine": "engine workflow", "raw": "raw Celery chain", "upsert": "hand-rolled upsert chain",
             "plain": "raw chain, plain worker", "dbos": "DBOS Transact workflow"}
    print(f"throughput (3 steps, median of {args.rounds} alternating rounds of {args.n}; runs/s)")
    for p in PEERS:
        rounds = " ".join(f"{x:.1f}" for x in res["rates"][p])
        print(f"  {names[p]:<26} {rate[p]:8.1f}   (rounds: {rounds})")
    print(f"latency (single runs, {args.latency_n} each; start -> completion its store records)")
    for p in ("engine", "raw", "upsert", "dbos"):
        print(f"  {names[p]:<26} {_lat(lat[p])}")
    cpu = res["cpu"]
    print(f"cpu per workflow: engine worker {cpu['engine']['worker']:.1f} ms, postgres "
          f"{cpu['engine']['postgres']:.1f} ms; raw chain worker {cpu['raw']['worker']:.1f} ms")
    print(f"worker peak RSS: engine {res['rss']['engine']:.1f} MiB, plain Celery {res['rss']['plain']:.1f} MiB "
          f"(pool {args.pool}, concurrency {args.concurrency}); peak PSS: engine {res['pss']['engine']:.1f} MiB, "
          f"plain Celery {res['pss']['plain']:.1f} MiB")

    def med(p: str) -> float:
        return statistics.median(lat[p])

    def p95(p: str) -> float:
        return percentile(lat[p], 95)

    rows = []

    def row(label: str, ours: str, peer: str, check: tuple[str, str, bool] | None, target: str = "-") -> None:
        ratio, tgt, holds = check if check else ("-", target, None)
        rows.append(Row(label, ours, peer, ratio, tgt, holds))

    row(ROWS[0], f"{rate['engine']:.1f}/s", f"{rate['raw']:.1f}/s", at_least(rate["engine"] / rate["raw"], 0.9))
    row(ROWS[1], f"{med('engine'):.1f} ms", f"{med('raw'):.1f} ms", at_most(med("engine") / med("raw"), 1.5))
    row(ROWS[2], f"{p95('engine'):.1f} ms", f"{p95('raw'):.1f} ms", at_most(p95("engine") / p95("raw"), 2.0))
    row(ROWS[3], f"{rate['engine']:.1f}/s", f"{rate['dbos']:.1f}/s", at_least(rate["engine"] / rate["dbos"], 2.5))
    row(ROWS[4], f"{med('engine'):.1f} ms", f"{med('dbos'):.1f} ms", None)
    rows[-1].ratio = f"{med('engine') / med('dbos'):.2f}x"
    row(ROWS[5], f"{rate['engine']:.1f}/s", f"{rate['upsert']:.1f}/s", at_least(rate["engine"] / rate["upsert"], 1.0))
    row(ROWS[6], f"{res['rss']['engine']:.0f} MiB", f"{res['rss']['plain']:.0f} MiB",
        at_most(res["rss"]["engine"] / res["rss"]["plain"], 1.2))
    row(ROWS[7], f"{res['pss']['engine']:.0f} MiB", f"{res['pss']['plain']:.0f} MiB", None)
    rows[-1].ratio = f"{res['pss']['engine'] / res['pss']['plain']:.2f}x"  # beside RSS, no target of its own
    parked = res.get("parked")
    if parked is not None:
        growth = parked.worker_mib + parked.sweeper_mib
        print(f"parked: {parked.n} workflows; RSS growth worker {parked.worker_mib:+.1f} MiB, sweeper "
              f"{parked.sweeper_mib:+.1f} MiB; {parked.n} timers due at once fired in {parked.fire_seconds:.2f}s "
              f"({parked.timers_per_second:.0f} timers/s)")
        rows.append(Row(ROWS[8], f"{growth:+.1f} MiB ({parked.n} parked)",
                        f"worker {parked.worker_mib:+.1f}, sweeper {parked.sweeper_mib:+.1f}", "-",
                        "< 50 MB", growth * 1.048576 < 50))
        row(ROWS[9], f"{parked.timers_per_second:.0f} timers/s", f"{parked.n} in {parked.fire_seconds:.1f}s", None)
    else:
        rows.append(Row(ROWS[8], "skipped", "-", "-", "< 50 MB", None))
        rows.append(Row(ROWS[9], "skipped", "-", "-", "-", None))
    return rows


def kafka_rows(n: int) -> list[Row]:
    """The Kafka intake figures (bench/kafka_intake.py), printed, and their two rows of the table:
    the bridge's intake beside the raw consume rate, and how far the outbox relay producing the
    bridge's story.generate messages ends behind it."""
    if not n:
        return [Row(ROWS[10], "skipped", "-", "-", ">= 5000 events/s", None),
                Row(ROWS[11], "skipped", "-", "-", f"<= {RELAY_BEHIND_MAX_S:g}s behind", None)]
    from .kafka_intake import measure

    note(f"(f) Kafka intake: {n} events ...")
    k = measure(n)
    print(f"kafka: bridge intake {k['bridge']:.1f} events/s; raw consume {k['consume']:.0f}/s, raw produce "
          f"{k['produce']:.0f}/s; outbox relay produce {k['relay_produce_per_s']:.0f}/s, its last message "
          f"{k['relay_behind_s']:.2f}s after the last event accepted")
    return [Row(ROWS[10], f"{k['bridge']:.0f} events/s", f"raw consume {k['consume']:.0f}/s",
                f"{k['bridge'] / k['consume']:.4f}x", ">= 5000 events/s", k["bridge"] >= 5000),
            Row(ROWS[11], f"{k['relay_behind_s']:.2f}s behind", f"relay {k['relay_produce_per_s']:.0f}/s, "
                f"bridge {k['bridge']:.0f}/s", f"{k['relay_produce_per_s'] / k['bridge']:.2f}x",
                f"<= {RELAY_BEHIND_MAX_S:g}s behind", k["relay_behind_s"] <= RELAY_BEHIND_MAX_S)]


def embedded_row(n: int, rounds: int) -> Row:
    """The embedded defaults' figures (bench/embedded.py), printed, and their row (no target)."""
    label = ROWS[12]
    if not n:
        return Row(label, "skipped", "-", "-", "-", None)
    from .embedded import measure

    try:
        r = measure(n, rounds)
    except Exception as exc:  # the other figures still stand; the row says why this one is missing
        note(f"embedded defaults failed: {first_line(exc)}")
        return Row(label, "failed", first_line(exc)[:60], "-", "-", None)
    print(f"embedded defaults (SQLite, kombu's SQLite broker; median of {rounds} rounds of {n}): engine "
          f"{r['engine']:.1f} workflows/s, raw Celery chain {r['raw']:.1f}/s")
    return Row(label, f"{r['engine']:.1f}/s", f"{r['raw']:.1f}/s", f"{r['engine'] / r['raw']:.2f}x", "-", None)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: 1 round of 30, 5 latency runs, 200 parked, 200 Kafka events")
    p.add_argument("--n", type=int, default=None, help="runs of each peer per throughput round (300)")
    p.add_argument("--latency-n", type=int, default=None, help="single runs of each peer for latency (30)")
    p.add_argument("--rounds", type=int, default=None, help="alternating rounds of every peer; medians (3)")
    p.add_argument("--parked", type=int, default=None, help="workflows parked on timers and signals (10000; 0 skips)")
    p.add_argument("--kafka-n", type=int, default=None, help="events for the Kafka intake figures (2000; 0 skips)")
    p.add_argument("--embedded-n", type=int, default=None,
                   help="runs of each per round on the embedded defaults (200; 0 skips)")
    p.add_argument("--concurrency", type=int, default=4, help="worker pool processes, both workers (4)")
    p.add_argument("--pool", default="prefork", choices=("prefork", "threads"),
                   help="worker pool, the same for both workers (prefork)")
    p.add_argument("--threads", type=int, default=4, help="threads starting runs (4)")
    args = p.parse_args(argv)
    defaults = (dict(n=30, latency_n=5, rounds=1, parked=200, kafka_n=200, embedded_n=10) if args.quick
                else dict(n=300, latency_n=30, rounds=3, parked=10000, kafka_n=2000, embedded_n=200))
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.kafka_n < 0 or args.kafka_n == 1:
        p.error("--kafka-n must be 0 (skip) or at least 2")
    if args.parked < 0 or args.parked == 1:
        p.error("--parked must be 0 (skip) or at least 2")
    if args.embedded_n < 0:
        p.error("--embedded-n must be 0 (skip) or more")
    for name in ("n", "latency_n", "concurrency", "threads", "rounds"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def machine() -> str:
    """CPU model and count, memory: the line the table is quoted with."""
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
        mem_kib = int(next(x for x in Path("/proc/meminfo").read_text().splitlines()
                           if x.startswith("MemTotal")).split()[1])
    except (OSError, StopIteration, ValueError):
        mem_kib = 0
    return f"{os.cpu_count()} x {model}, {mem_kib / 1024 / 1024:.0f} GiB RAM"


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
    if code:
        sys.exit(code)
    rows = report(bench.results, args)
    try:
        rows += kafka_rows(args.kafka_n)
    except Exception as exc:  # the other figures still stand; the rows say why these are missing
        note(f"Kafka intake failed: {first_line(exc)}")
        rows.append(Row(ROWS[10], "failed", first_line(exc)[:60], "-", ">= 5000 events/s", False))
        rows.append(Row(ROWS[11], "failed", "-", "-", f"<= {RELAY_BEHIND_MAX_S:g}s behind", False))
    rows.append(embedded_row(args.embedded_n, min(args.rounds, 2)))
    print()
    print(f"{datetime.now(timezone.utc):%Y-%m-%d} on {machine()}")
    print(render(rows))


if __name__ == "__main__":
    main()
