"""`orchestrator <command>`: every process of the product from one installed package."""
from __future__ import annotations

import argparse
import atexit
import gc
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from typing import Any, TextIO

from orchestrator.config import Settings, load_settings
from orchestrator.errors import ConfigError
from orchestrator.kafka_events import EVENT_ID_MAX, event_id_problem
from orchestrator.logs import say, set_service

log = logging.getLogger("orchestrator")


def _settings(*areas: str) -> Settings:
    """The settings, with every workflow's own and those of the modules `areas` (the API's,
    `web.settings`, for the commands that run it): a bad variable anywhere stops the process here,
    not in a server's forked worker after it reported itself started."""
    import importlib

    from orchestrator.runtime import load_workflow_modules

    try:
        for module in areas:  # registers its AreaSettings, checked by load_settings
            importlib.import_module(module)
        settings = load_settings()
        load_workflow_modules(settings)
        return settings
    except ConfigError as exc:
        sys.exit(f"configuration error: {exc.message}")


def _logging(settings: Settings) -> None:
    """This process's logging (orchestrator.logs.configure), and, the first time, a warning for
    each variable that looks like a misspelt setting (`warn_misspelled_variables`)."""
    from orchestrator.logs import configure

    configure(settings.log_level, settings.log_format, settings.secrets())
    warn_misspelled_variables(settings)


_warned_misspelled = False  # once per process: a forked one (pool, gunicorn worker) inherits it


def warn_misspelled_variables(settings: Settings) -> None:
    """Log one warning for each variable that is no setting but closely resembles one
    (`DATABSE_URL is not a setting; did you mean DATABASE_URL?`), once per process: a misspelt
    variable is otherwise ignored, and the process runs on the default without a word."""
    global _warned_misspelled
    if _warned_misspelled:
        return
    _warned_misspelled = True
    # Names of the settings this process has loaded: the API's own (API_*, web.settings) only in
    # the commands that run it (api, dev); a worker importing `web` would load Flask into every
    # pool process (docs/performance.md, "Memory"). The API's names resemble no other setting's.
    for variable, meant in settings.misspelled_variables():
        log.warning("%s is not a setting; did you mean %s?", variable, meant)


def _tracing(role: str, settings: Settings) -> None:
    """Spans exported over OTLP when OTEL_EXPORTER_OTLP_ENDPOINT is set (orchestrator/tracing.py);
    without it the SDK is not even imported."""
    from orchestrator import tracing

    # OTEL_* variables given in .env reach the SDK, which reads the environment only
    for name, value in settings.variables.items():
        if name.upper().startswith("OTEL_"):
            os.environ.setdefault(name.upper(), value)
    tracing.setup(role)


def stop_on_signals() -> threading.Event:
    """An event set by SIGINT or SIGTERM, for the long-running loops to finish their pass and exit."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def wait_for_services(settings: Settings, needs: tuple[str, ...] | None = None,
                      stop: threading.Event | None = None) -> None:
    """Wait (logging what for) until the services this process needs answer (default: all of
    orchestrator.runtime.NEEDS); a SIGINT or SIGTERM meanwhile ends the process cleanly (exit 0).
    See orchestrator.runtime.wait_for_services."""
    from orchestrator.runtime import NEEDS
    from orchestrator.runtime import wait_for_services as wait

    needs = NEEDS if needs is None else needs
    own = stop is None
    if own:
        stop = threading.Event()
        previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    if not wait(settings, needs, stop) and own:
        sys.exit(0)
    if own:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def cmd_db(args: argparse.Namespace) -> None:
    from orchestrator.migrate import downgrade, upgrade

    settings = _settings()
    _logging(settings)
    wait_for_services(settings, ("database",))
    if args.action == "upgrade":
        upgrade(settings.database_url, args.revision or "heads", settings.workflow_modules)
    else:
        downgrade(settings.database_url, args.revision or "-1", settings.workflow_modules)
    from orchestrator.logs import mask_url

    say(f"database {args.action}d: {mask_url(settings.database_url)}")


def cmd_api(args: argparse.Namespace) -> None:
    # before the settings import the workflow modules: a metric made earlier would not be shared
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = _own_temporary_folder("orchestrator-metrics-")
    settings = _settings("web.settings")  # API_* too: gunicorn's workers would only fail to boot
    _listenable("the API", args.host or settings.host, args.port or settings.port, host_by="HOST", port_by="PORT")
    _logging(settings)
    _tracing("api", settings)  # gunicorn's workers inherit it; create_app instruments Flask
    from gunicorn.app.base import BaseApplication

    from web import create_app, server
    from web.settings import HttpSettings

    # gunicorn's workers are forked from this process: they inherit the limit on their reads
    server.ThreadWorker.read_timeout = HttpSettings.from_settings(settings).read_timeout_seconds

    class Server(BaseApplication):  # type: ignore[misc]
        def load_config(self) -> None:
            self.cfg.set("bind", f"{args.host or settings.host}:{args.port or settings.port}")
            self.cfg.set("workers", args.workers or settings.workers)
            self.cfg.set("worker_class", "web.server.ThreadWorker")  # gthread, JSON errors
            # Each open chat WebSocket or event stream holds one thread while it is open.
            self.cfg.set("threads", args.threads or settings.api_threads)
            self.cfg.set("timeout", 60)
            self.cfg.set("graceful_timeout", 10)
            self.cfg.set("accesslog", "-" if args.access_log else None)
            # gunicorn's own lines (and the access log) through our handler, in LOG_FORMAT
            self.cfg.set("logger_class", "web.server.GunicornLogger")
            self.cfg.set("loglevel", settings.log_level.lower())
            # gunicorn 25.1's control socket is one path per user (~/.gunicorn/gunicorn.ctl): a
            # second API on the host took it over, and the first to stop deleted it for both.
            # Signals (TERM, HUP, TTIN) manage the API; no gunicornc is needed.
            if "control_socket_disable" in self.cfg.settings:
                self.cfg.set("control_socket_disable", True)

        def load(self) -> Any:  # in each gunicorn worker
            from orchestrator import runtime

            return create_app(runtime.build(pre_ping=True))

    Server().run()


#: A SIGTERM that reaches a pool process within this many seconds of the main process's own is
#: the same signal sent to the whole worker (a warm shutdown); see pool_processes_finish_their_step.
SHUTDOWN_SIGNAL_WINDOW = 1.0


def pool_processes_finish_their_step() -> None:
    """Make a SIGTERM sent to every process of the worker (systemd stops every process of a unit,
    `kill -- -PGID` the process group) a warm shutdown, as a SIGTERM to the main process alone is:
    the main process stops taking tasks and waits for the running ones, and a pool process that
    got the same SIGTERM ignores it and finishes its step instead of dying in it.

    A pool process tells that SIGTERM from the ones its main process sends on purpose (a cold
    shutdown, a revoke with terminate) by time: the main process notes when it got its own
    SIGTERM; one reaching a pool process within SHUTDOWN_SIGNAL_WINDOW of that is ignored, any
    other ends the pool process as before (after waiting at most half a second for that note)."""
    import multiprocessing

    from billiard.common import _shutdown_cleanup
    from celery.signals import task_prerun, worker_shutting_down

    warm_at = multiprocessing.Value("d", 0.0, lock=False)  # shared with the pool processes it forks
    main = os.getpid()

    def shutting_down(how: str = "", sig: str = "", **_: Any) -> None:
        if how == "Warm" and sig == "SIGTERM":
            warm_at.value = time.monotonic()  # system-wide on Linux: comparable across processes

    def on_term(signum: int, frame: Any) -> None:
        got = time.monotonic()
        while not warm_at.value and time.monotonic() - got < 0.5:  # the main process's handler runs too
            time.sleep(0.01)
        if warm_at.value and abs(got - warm_at.value) < SHUTDOWN_SIGNAL_WINDOW:
            return  # the worker's own warm shutdown: finish the step
        _shutdown_cleanup(signum, frame)  # billiard's own handler: end this pool process

    def before_task(**_: Any) -> None:
        # billiard installs its own handler after the pool process starts: take over before a task
        # (not in the main process: a solo or threads pool runs tasks there)
        if os.getpid() != main and signal.getsignal(signal.SIGTERM) is not on_term:
            signal.signal(signal.SIGTERM, on_term)

    # An idle pool process, too, must outlive the worker's own SIGTERM: billiard's handler ends
    # it with os._exit, and on the embedded broker (billiard's plain pool) an idle pool process
    # waits for its next task holding the pool's queue lock, which it then never gives back: the
    # main process waited on that lock at exit for ever, and `orchestrator dev` killed it after
    # its 15 s grace. billiard sets its handler in each pool process right after Celery's
    # worker_process_init (`reset_signals`); ours is set right after it.
    import billiard.pool

    reset_signals = billiard.pool.reset_signals

    def reset_then_take_sigterm(*args: Any, **kwargs: Any) -> None:
        reset_signals(*args, **kwargs)
        if os.getpid() != main:
            signal.signal(signal.SIGTERM, on_term)

    billiard.pool.reset_signals = reset_then_take_sigterm
    worker_shutting_down.connect(shutting_down, weak=False)
    task_prerun.connect(before_task, weak=False)


def _before_fork(**_: Any) -> None:
    """In the main process, before it forks a pool process: what the start-up left behind is
    collected and what remains is frozen out of the cyclic collector, so a collection in a pool
    process does not write to, and so copy, every inherited page (the tree's PSS halves)."""
    import gc

    gc.collect()
    gc.freeze()


def cmd_worker(args: argparse.Namespace) -> None:
    from celery.signals import setup_logging, worker_before_create_process, worker_process_init

    from orchestrator import runtime

    rt = runtime.current()
    _logging(rt.settings)  # the wait below logs; Celery sets logging up again (setup_logging)
    wait_for_services(rt.settings)
    _tracing("worker", rt.settings)
    # a prefork pool process: keeps the parent's provider (its exporter thread restarts after fork)
    worker_process_init.connect(lambda **_: _tracing("worker", rt.settings), weak=False)
    pool_processes_finish_their_step()
    worker_before_create_process.connect(_before_fork, weak=False)

    @setup_logging.connect  # Celery leaves logging to us when this signal has a receiver
    def _setup(**_: Any) -> None:
        _logging(rt.settings)
        from billiard.util import get_logger

        # billiard's pool supervisor ("Process 'ForkPoolWorker-1' pid:… exited with …") logs to a
        # logger of its own that does not propagate and has no handler: Python wrote its bare text.
        # Its warnings and errors only: at INFO it tells of every mmap and child it makes.
        billiard_log = get_logger()
        billiard_log.propagate = True
        billiard_log.setLevel(max(logging.WARNING, logging.getLogger().level))

    argv = ["--loglevel", rt.settings.log_level.upper(), "-Q", args.queues,
            "-c", str(args.concurrency), "-n", args.name, "--pool", args.pool]
    json_lines = rt.settings.log_format == "json"
    if json_lines:
        celery_says_through_logging()
    _celery_worker(rt.celery, argv, quiet=json_lines)


def celery_says_through_logging() -> None:
    """What a Celery worker writes on its terminal past logging (`worker: Warm shutdown
    (MainProcess)`, `Hitting Ctrl+C again ...`) becomes a log line of the `celery.apps.worker`
    logger, in LOG_FORMAT, instead of bare text on stdout (its banner is left out: `quiet`)."""
    from celery.apps import worker as celery_worker

    said = logging.getLogger("celery.apps.worker")

    def to_log(msg: str, f: Any = None) -> None:  # called from its signal handlers, in the main thread
        # WARNING: Celery wrote them whatever the level, and an operator stopping a worker at
        # LOG_LEVEL=WARNING (the tests' too) still sees that it began a warm or cold shutdown
        said.warning("%s", str(msg).strip())

    celery_worker.safe_say = to_log


def _celery_worker(app: Any, argv: list[str], quiet: bool = False) -> None:
    """`celery worker` with `argv` (its options, no command name) on `app`, as `app.worker_main`
    runs it, but without the `celery` command group: that group loads every installed
    `celery.commands` plugin (Flower with tornado and prometheus_client, click-repl with
    prompt_toolkit and pygments), about 15 MiB in the main process and in each pool process it
    forks (docs/performance.md, "Memory"). `quiet`: no banner."""
    from celery.bin.base import CLIContext
    from celery.bin.worker import worker
    from click.exceptions import Exit

    try:
        # click hands the status of ctx.exit back rather than exiting (standalone_mode off): the
        # worker's own, 1 after an "Unrecoverable error", which a supervisor must see (it was 0)
        status = worker.main(args=argv, prog_name="orchestrator worker", standalone_mode=False,
                             obj=CLIContext(app=app, no_color=None, workdir=None, quiet=quiet))
    except Exit as exc:
        status = exc.exit_code
    if isinstance(status, int) and status:
        sys.exit(status)


def _process(role: str, stop: threading.Event | None = None) -> Any:
    """This process's runtime, with its logs and traces set up (a long-running process: sweeper,
    calc-results, bridge); with `stop`, once PostgreSQL, RabbitMQ and Redis answer."""
    from orchestrator import runtime

    rt = runtime.current()
    _logging(rt.settings)
    if stop is not None:
        wait_for_services(rt.settings, stop=stop)
        if stop.is_set():
            sys.exit(0)
    _tracing(role, rt.settings)
    return rt


def cmd_sweeper(args: argparse.Namespace) -> None:
    from .sweeper import run

    stop = stop_on_signals()
    run(_process("sweeper", stop), stop)


def cmd_calc_results(args: argparse.Namespace) -> None:
    from sagas.balance.calculations import run_consumer

    stop = stop_on_signals()
    run_consumer(_process("calc-results", stop), stop)


def cmd_bridge(args: argparse.Namespace) -> None:
    """The Kafka bridge: a consumer-group member turning events into engine starts and events."""
    from orchestrator.kafka_bridge import Bridge

    rt = _process("bridge")
    if not rt.settings.kafka_brokers:
        sys.exit("configuration error: KAFKA_BROKERS: required by the bridge (host:port[,host:port])")
    if args.metrics_port:
        from prometheus_client import start_http_server

        try:
            start_http_server(args.metrics_port, addr="127.0.0.1")
        except OSError as exc:
            sys.exit(f"--metrics-port: cannot listen on 127.0.0.1:{args.metrics_port}: {exc.strerror or exc}")
    stop = stop_on_signals()
    bridge = Bridge(rt, group=args.group)
    # What start-up built (modules, classes, the runtime) lives as long as the process: frozen,
    # the cyclic collector's full collections no longer walk it (each took about 45 ms, one per
    # few thousand events; docs/performance.md, "Kafka intake").
    gc.freeze()
    bridge.run(stop)


def cmd_produce(args: argparse.Namespace) -> None:
    """Produce one JSON event, as an upstream service would (handy with `orchestrator dev`)."""
    from confluent_kafka import Producer

    from orchestrator.jsonutil import loads

    from orchestrator.kafka import producer_config

    settings = _settings()
    _logging(settings)  # a misspelt KAFKA_BROKERS would send the event to :9092 without a word
    brokers = settings.kafka_brokers or "127.0.0.1:9092"
    try:
        loads(args.payload)
    except ValueError as exc:  # nesting past the parser's depth included
        sys.exit(f"payload: not valid JSON: {exc}")
    headers = [(name, value.encode()) for name, value in args.header]
    if args.event_id:  # the bridge de-duplicates by it (docs/kafka.md)
        headers.append(("event_id", args.event_id.encode()))
    producer = Producer(producer_config(brokers))
    producer.produce(args.topic, args.payload.encode(), key=args.key.encode() if args.key else None,
                     headers=headers or None)
    if producer.flush(15):
        sys.exit(f"not delivered to {brokers} within 15s")
    print(f"produced to {args.topic} on {brokers}")
    from orchestrator.kafka_bridge import all_topics, discover
    from orchestrator.workflow import registry

    if args.topic not in all_topics(registry):  # sent all the same: another service may read it
        print(f"note: no workflow consumes or produces topic {args.topic!r}; the bridge consumes "
              f"{', '.join(sorted(discover(registry)))}", file=sys.stderr)


def cmd_flower(args: argparse.Namespace) -> None:
    # Flower serves its own metrics from its process: in the directory the API's /metrics
    # gathers (orchestrator dev shares one among its children) they showed up there as well
    os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
    from orchestrator import runtime

    rt = runtime.current()
    auth = rt.settings.flower_basic_auth
    if not auth:
        sys.exit("configuration error: FLOWER_BASIC_AUTH: required (user:password) so Flower is never open")
    _listenable("Flower", args.address, args.port, host_by="--address", port_by="--port")
    from flower.views.monitor import Metrics
    from tornado.web import authenticated

    # Flower leaves its Prometheus page open (for scrapers); it names every task, worker and
    # queue, so here it takes the same login as the rest (`/healthcheck`, which says only OK, stays open)
    Metrics.get = authenticated(Metrics.get)  # type: ignore[method-assign]
    _logging(rt.settings)
    # --logging=none: tornado keeps its own handler off the root logger, so Flower's lines are ours
    rt.celery.start(["flower", f"--basic-auth={auth}", f"--port={args.port}", f"--address={args.address}",
                     "--logging=none"])


#: A dev child that exits on its own is started again after 1, 2, 4, ... (at most 30) seconds; one
#: that dies this many times in a row, each time within DEV_STABLE_SECONDS of its start, stops dev.
DEV_RESTARTS = 5
#: The login `orchestrator dev` gives Flower and the console unless FLOWER_BASIC_AUTH /
#: CONSOLE_BASIC_AUTH are set (docs/operations.md, "Who may do what").
DEV_LOGIN = "admin:admin"
#: The admin token `orchestrator dev` gives the API (X-Admin-Token) unless ADMIN_TOKEN is set.
DEV_ADMIN_TOKEN = "dev-admin-token"
DEV_STABLE_SECONDS = 60.0
#: The children of `orchestrator dev` that stand in for outside services: started with the
#: product's processes, stopped after them (the worker's last steps still talk to them).
DEV_EMULATORS = frozenset({"emulators", "gitlab", "calculator", "execution", "kafka-emulators"})


@dataclass
class PortClaim:
    """A port a dev child will listen on: who (`what`), the variable or flag that moves it."""

    what: str
    moved_by: str
    host: str
    port: int


def port_problems(claims: list[PortClaim]) -> list[str]:
    """Every clash among `claims` and every claimed port something else already listens on, as
    messages naming the port, its users and what moves it (empty: all can be bound). Port 0
    (any free port) is never a problem."""
    import socket

    problems: list[str] = []
    by_port: dict[int, list[PortClaim]] = {}
    for c in claims:
        if c.port:
            by_port.setdefault(c.port, []).append(c)
    for port, users in by_port.items():
        if len(users) > 1:
            names = " and ".join(f"{c.what} ({c.moved_by})" for c in users)
            problems.append(f"port {port} is used by both {names}: move one of them")
    for port, users in by_port.items():
        if len(users) > 1:
            continue
        c = users[0]
        if not 0 < port < 65536:
            problems.append(f"port {port} of {c.what} is not a port number (set {c.moved_by})")
            continue
        try:
            family, kind, proto, _, address = socket.getaddrinfo(c.host, port, type=socket.SOCK_STREAM)[0]
            with socket.socket(family, kind, proto) as sock:  # as the servers bind: SO_REUSEADDR
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(address)
        except OSError as exc:
            problems.append(f"port {port} for {c.what} on {c.host} is not available ({exc.strerror or exc}): "
                            f"stop what uses it or move {c.what} with {c.moved_by}")
    return problems


def _listenable(what: str, host: str, port: int, host_by: str, port_by: str) -> None:
    """Exit with one line naming the variable or flag unless `what` can listen on host:port: a
    port in use gave gunicorn's "Connection in use" five times, or a 34-line traceback from
    Flower, and neither named what moves it."""
    import socket

    try:
        socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        sys.exit(f"configuration error: {host_by}: {what} cannot listen on {host!r} ({exc.strerror})")
    problems = port_problems([PortClaim(what, port_by, host, port)])
    if problems:
        sys.exit(f"configuration error: {port_by}: {problems[0]}")


def _own_temporary_folder(prefix: str) -> str:
    """A new folder, removed when this process exits (not when a process forked from it does)."""
    import shutil

    folder, owner = tempfile.mkdtemp(prefix=prefix), os.getpid()
    atexit.register(lambda: os.getpid() == owner and shutil.rmtree(folder, ignore_errors=True))
    return folder


#: The file in ./data that one `orchestrator dev` holds locked for its whole life.
DEV_LOCK = "dev.lock"


def hold_data_folder(folder: str = "data") -> TextIO | None:
    """Lock `folder` for this dev (the open lock file, kept for dev's life), or None when another
    dev holds it: two on one folder share its SQLite files and emulator state and break each other.
    An flock is released by the kernel when its holder dies, even by kill -9."""
    import fcntl

    os.makedirs(folder, exist_ok=True)
    lock = open(os.path.join(folder, DEV_LOCK), "a+")  # open, and locked, until dev ends
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        return None
    lock.truncate(0)
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    return lock


def _data_holder(folder: str = "data") -> str:
    """' (pid N)' naming the dev that holds `folder`, from its lock file, or ''."""
    try:
        with open(os.path.join(folder, DEV_LOCK)) as lock:
            pid = lock.read().strip()
    except OSError:
        return ""
    return f" (pid {pid})" if pid.isdigit() else ""


def _kill_group(pid: int, sig: int) -> None:
    """Signal a child's process group (each dev child leads its own); gone already is fine."""
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


def _exit_text(code: int) -> str:
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"code {code}"


def cmd_dev(args: argparse.Namespace) -> None:
    """Every process in the foreground, with the emulators, on embedded defaults.

    Before starting anything it locks ./data (exits 1 when another dev holds it) and checks every
    port it will listen on (exits 1 naming the port and what moves it); a child that dies is restarted with a backoff (DEV_RESTARTS)."""
    # Ctrl-C from the first moment on stops dev, not a traceback in it or in a set-up step
    # (each runs in a session of its own, out of the terminal's reach, and is waited for).
    stopping = threading.Event()

    def stop(*_: Any) -> None:
        stopping.set()

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)

    def unless_stopped(done: str) -> None:
        if stopping.is_set():
            say(f"orchestrator dev: stopped during start-up ({done})")
            sys.exit(0)

    from .children import die_with_parent

    # Every child dies with dev, even by kill -9 (its own session keeps it out of Ctrl-C's reach,
    # and of everything else once dev is gone): the product's processes by SIGTERM (a worker
    # finishes its step), the emulators and the broker by SIGKILL (nothing of theirs needs a
    # clean stop). All are started from this, the main, thread: the signal comes when the
    # thread that forked a child ends.
    product_preexec, emulator_preexec = die_with_parent(signal.SIGTERM), die_with_parent(signal.SIGKILL)

    def set_up(what: str, cmd: list[str]) -> None:
        code = subprocess.run(cmd, env=env, start_new_session=True, preexec_fn=product_preexec).returncode
        if code != 0:
            sys.exit(f"orchestrator dev: {what} failed ({_exit_text(code)}); nothing else was started")
        unless_stopped(f"{what} done")

    os.environ.setdefault("LOG_FORMAT", "text")  # a terminal, unless told otherwise
    settings = _settings("web.settings")  # the API child's too: it would only restart until dev gives up
    _logging(settings)
    env = dict(os.environ)
    # Flower and the console are never open, not even in dev: a documented default login
    env["FLOWER_BASIC_AUTH"] = env.get("FLOWER_BASIC_AUTH") or DEV_LOGIN
    env["CONSOLE_BASIC_AUTH"] = env.get("CONSOLE_BASIC_AUTH") or DEV_LOGIN
    env["ADMIN_TOKEN"] = env.get("ADMIN_TOKEN") or settings.admin_token or DEV_ADMIN_TOKEN  # /admin/*, bulk
    env.setdefault("EMULATOR_JOB_SECONDS", "2")
    children: list[tuple[str, list[str]]] = []
    claims = [PortClaim("the API", "PORT", settings.host, settings.port),
              PortClaim("Flower", "--flower-port", "127.0.0.1", args.flower_port)]
    base = args.emulator_port
    ports = {"VIDEO_DOWNLOADER_URL": base, "AUDIO_NORMALIZATION_URL": base + 1, "AUDIO_TRANSCRIBER_URL": base + 2}
    if not any(os.environ.get(name) for name in ports):
        for name, port in ports.items():
            env[name] = f"http://127.0.0.1:{port}"
            claims.append(PortClaim(f"the media emulator for {name}", "--emulator-port", "127.0.0.1", port))
        # Jobs in data/media outlive a restart of dev, as a real service's do: steps still polling them go on.
        children.append(("emulators", [sys.executable, "-m", "emulators.media", "--host", "127.0.0.1",
                                       "--ports", ",".join(str(p) for p in ports.values()),
                                       "--data", "data/media"]))
    raw_gitlab_port = os.environ.get("GITLAB_EMULATOR_PORT") or "8010"
    if not raw_gitlab_port.isdigit() or not 1 <= int(raw_gitlab_port) <= 65535:
        sys.exit(f"configuration error: GITLAB_EMULATOR_PORT: expected a port number (1-65535), "
                 f"got {raw_gitlab_port!r}")
    gitlab_port = int(raw_gitlab_port)
    from sagas.balance.settings import BalanceSettings

    balance = BalanceSettings.from_settings(settings)
    gitlab = not balance.gitlab_url or balance.gitlab_url.rstrip("/") in (f"http://127.0.0.1:{gitlab_port}",
                                                                           f"http://localhost:{gitlab_port}")
    if gitlab:
        claims.append(PortClaim("the GitLab emulator", "GITLAB_EMULATOR_PORT", "127.0.0.1", gitlab_port))
    bundled = not settings.kafka_brokers
    others = {c.port for c in claims}  # what a free port picked for the broker must not be
    broker_claim = PortClaim("the bundled Kafka broker", "--kafka-port (0: any free port) or KAFKA_BROKERS",
                             "127.0.0.1", args.kafka_port)
    if bundled:
        claims.append(broker_claim)
    data_lock = hold_data_folder()  # before the ports: a second dev on other ports passes their check
    if data_lock is None:
        sys.exit(f"orchestrator dev: another orchestrator dev{_data_holder()} runs on the data folder "
                 f"{os.path.abspath('data')}: stop it, or start this one in another folder "
                 "(dev keeps its state in ./data of the folder it starts in)")
    problems = port_problems(claims)
    if problems:  # before anything started: nothing to stop, nothing half-running
        sys.exit("orchestrator dev: " + "\norchestrator dev: ".join(problems))

    # The balance saga: a demo project in the local git backend, the GitLab emulator (used when
    # GITLAB_URL points at it) and the emulated calculation worker.
    # Run as a process of its own: nothing in the product imports the emulators.
    set_up("creating the demo project", [sys.executable, "-m", "emulators.demo", "--repos-dir", balance.git_repos_dir])
    from sagas.balance.calculations import prepare_embedded_calculation_queues

    prepare_embedded_calculation_queues(settings)  # before the processes that use them start together
    if gitlab:
        children.append(("gitlab", [sys.executable, "-m", "emulators.gitlab", "--port", str(gitlab_port),
                                    "--data", "data/gitlab", "--demo"]))
    children.append(("calculator", [sys.executable, "-m", "emulators.calculator", "--seconds", "2"]))
    # The execution service of the chat (seed 003): answers every message, never fails by default.
    env.setdefault("EXECUTION_FAILURE_RATE", "0")
    children.append(("execution", [sys.executable, "-m", "emulators.execution", "--concurrency", "8"]))
    py = [sys.executable, "-m", "orchestrator.entrypoints.cli"]
    broker = None
    if bundled:  # the bundled Kafka-protocol broker, stopped by PID at the end
        from .kafka_broker import BundledBroker
        from .ports import free_port

        port = args.kafka_port
        while not port or port in others:
            port = free_port()
        # Checked again just before the bind: another `orchestrator dev` started at the same
        # moment passes the first check too, and the readiness probe would then reach its broker.
        late = port_problems([replace(broker_claim, port=port)])
        if late:
            sys.exit("orchestrator dev: " + late[0])
        try:
            broker = BundledBroker(port=port).start()
        except RuntimeError as exc:
            sys.exit(f"orchestrator dev: {exc}")
        atexit.register(broker.stop)
        unless_stopped("the bundled Kafka broker started")
        env["KAFKA_BROKERS"] = broker.bootstrap
    if args.kafka_emulators:  # dev always runs the bridge: the services it talks to come with it
        children.append(("kafka-emulators", [sys.executable, "-m", "emulators.kafka_services",
                                             "--brokers", env.get("KAFKA_BROKERS") or settings.kafka_brokers]))
    # one metrics directory for every child, so the API's /metrics shows the bridge's too
    if not env.get("PROMETHEUS_MULTIPROC_DIR"):
        env["PROMETHEUS_MULTIPROC_DIR"] = _own_temporary_folder("orchestrator-metrics-")
    children += [
        ("calc-results", py + ["calc-results"]),
        ("bridge", py + ["bridge"]),
        ("api", py + ["api", "--workers", str(args.api_workers)]),
        ("worker", py + ["worker", "--concurrency", str(args.concurrency), "--name", "dev@%h"]),
        ("sweeper", py + ["sweeper"]),
        ("flower", py + ["flower", "--port", str(args.flower_port)]),
    ]
    set_up("orchestrator db upgrade", py + ["db", "upgrade"])
    commands = dict(children)
    procs: dict[str, subprocess.Popen[bytes]] = {}
    started: dict[str, float] = {}
    restarts = {name: 0 for name in commands}
    due: dict[str, float] = {}  # children waiting out their backoff before a restart

    def start(name: str) -> None:
        procs[name] = subprocess.Popen(commands[name], env=env, start_new_session=True,
                                       preexec_fn=emulator_preexec if name in DEV_EMULATORS else product_preexec)
        started[name] = time.monotonic()

    for name in commands:
        start(name)

    def login(name: str) -> str:  # dev's own default is shown, an operator's password never
        return env[name] if env[name] == DEV_LOGIN else f"{env[name].partition(':')[0]}:*** from {name}"

    say(f"orchestrator dev: API http://{settings.host}:{settings.port}  "
          f"Console http://{settings.host}:{settings.port}/ui/ ({login('CONSOLE_BASIC_AUTH')})  "
          f"Flower http://127.0.0.1:{args.flower_port} ({login('FLOWER_BASIC_AUTH')})  "
          f"{'X-Admin-Token ' + DEV_ADMIN_TOKEN + '  ' if env['ADMIN_TOKEN'] == DEV_ADMIN_TOKEN else ''}"
          f"Kafka {env.get('KAFKA_BROKERS') or settings.kafka_brokers}{' (bundled)' if broker else ''}  "
          "Ctrl-C stops all")
    say("orchestrator dev: pids " + ", ".join(f"{n}={p.pid}" for n, p in procs.items()))
    code = 0
    while not stopping.is_set():
        now = time.monotonic()
        for name, proc in procs.items():
            if name in due:
                if now >= due[name]:
                    del due[name]
                    start(name)
                    log.warning("%s restarted (pid %s)", name, procs[name].pid)
                continue
            if proc.poll() is None:
                continue
            # A child that dies (the Kafka consumer crashes when a topic it reads is deleted) is
            # started again; one that cannot stay up stops dev rather than leave it half-running.
            if now - started[name] > DEV_STABLE_SECONDS:
                restarts[name] = 0
            if restarts[name] >= DEV_RESTARTS:
                log.error("%s exited with %s, %d times in a row; stopping everything", name,
                          _exit_text(proc.returncode), restarts[name] + 1)
                code = 1
                stopping.set()
                break
            _kill_group(proc.pid, signal.SIGKILL)  # what it left behind (pool processes) would hold its ports
            restarts[name] += 1
            delay = min(30, 2 ** (restarts[name] - 1))
            log.warning("%s (pid %s) exited with %s; restarting it in %ss (restart %d of %d in a row)", name,
                        proc.pid, _exit_text(proc.returncode), delay, restarts[name], DEV_RESTARTS)
            due[name] = now + delay
        if broker is not None and broker.proc is not None and broker.proc.poll() is not None and not stopping.is_set():
            log.error("the bundled Kafka broker exited with %s (its topics are gone); stopping everything",
                      _exit_text(broker.proc.returncode))
            code = 1
            stopping.set()
        stopping.wait(0.5)
    # The product's processes first, then the emulators, then the broker: a worker in its warm
    # shutdown still polls the emulated services, and one gone under it would cost the running
    # step an attempt (a ConnectionError counted as a failed try, left in its error).
    product = {n: p for n, p in procs.items() if n not in DEV_EMULATORS}
    emulators = {n: p for n, p in procs.items() if n in DEV_EMULATORS}
    _stop_children(product, due, "the product's processes")
    _stop_children(emulators, due, "the emulators")
    if broker is not None:
        broker.stop()
        say("orchestrator dev: stopped the bundled Kafka broker")
    sys.exit(code)


def _stop_children(procs: dict[str, "subprocess.Popen[bytes]"], due: dict[str, float], what: str,
                   grace: float = 15.0) -> None:
    """SIGTERM every one of `procs` (their process groups), wait for them all up to `grace`
    seconds, then SIGKILL what is left; `due` (waiting to be restarted) are already stopped."""
    for name, proc in procs.items():
        if name not in due and proc.poll() is None:
            _kill_group(proc.pid, signal.SIGTERM)
    deadline = time.time() + grace
    for name, proc in procs.items():
        try:
            proc.wait(max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            say(f"orchestrator dev: {name} did not stop within {grace:g}s of SIGTERM; killing it",
                level=logging.WARNING)
            _kill_group(proc.pid, signal.SIGKILL)
            proc.wait()
        _kill_group(proc.pid, signal.SIGKILL)  # what it left behind in its group (pool processes)
    say(f"orchestrator dev: stopped {what} ({', '.join(procs)})")


def _number(low: int, high: int | None = None, zero: str = "") -> Any:
    """An argparse type: an integer from `low` to `high`, and 0 as well when `zero` says what it
    means. A flag out of range stops the command with a one-line usage error, as a bad variable
    does: a server told to run 0 workers starts and never answers, one told to bind port 99999
    fails inside gunicorn with a traceback."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if zero and value == 0:
            return value
        if value < low or (high is not None and value > high):
            span = f"{low}-{high}" if high is not None else f"at least {low}"
            raise argparse.ArgumentTypeError(f"expected {span}{' or 0 (' + zero + ')' if zero else ''}, got {value}")
        return value
    return parse


def _event_id(text: str) -> str:
    """An argparse type: an `event_id` header as the bridge takes it (kafka_bridge.event_id), so
    what it would dead-letter, or ignore when empty, is refused here instead."""
    if not text:
        raise argparse.ArgumentTypeError("must not be empty (the bridge ignores an empty event_id)")
    try:
        text.encode()
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError("is not valid UTF-8") from None
    problem = event_id_problem(text)
    if problem is not None:
        raise argparse.ArgumentTypeError(problem)
    return text


def _header(text: str) -> tuple[str, str]:
    """An argparse type: NAME=VALUE, a Kafka header."""
    name, eq, value = text.partition("=")
    if not eq or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    if name == "event_id":
        raise argparse.ArgumentTypeError("give the event_id with --event-id")
    try:
        value.encode()
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError(f"{name}: is not valid UTF-8") from None
    return name, value


#: A port to listen on; the media emulators take three from the one given.
PORT = _number(1, 65535)
COUNT = _number(1)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="orchestrator", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    db = sub.add_parser("db", help="database migrations")
    db.add_argument("action", choices=["upgrade", "downgrade"])
    db.add_argument("revision", nargs="?")
    db.set_defaults(func=cmd_db)

    api = sub.add_parser("api", help="the HTTP API (gunicorn)")
    api.add_argument("--host")
    api.add_argument("--port", type=PORT)
    api.add_argument("--workers", type=COUNT)
    api.add_argument("--threads", type=COUNT, help="threads per worker (API_THREADS, default 32)")
    api.add_argument("--access-log", action="store_true")
    api.set_defaults(func=cmd_api)

    worker = sub.add_parser("worker", help="a Celery worker for step tasks")
    worker.add_argument("--queues", default="default,media,engine")
    worker.add_argument("--concurrency", type=COUNT, default=2)
    # Celery's node name, unique per worker on a broker: a second worker of one host under the same
    # name lost the race for its control queue and stopped ("Unrecoverable error: ResourceLocked")
    worker.add_argument("--name", default=f"worker{os.getpid()}@%h",
                        help="Celery node name (default worker<pid>@<host>; %%h is the host name)")
    worker.add_argument("--pool", default="prefork")
    worker.set_defaults(func=cmd_worker)

    for name in ("sweeper", "beat"):
        sw = sub.add_parser(name, help="outbox relay, timers and lease sweeper" + (" (alias)" if name == "beat" else ""))
        sw.set_defaults(func=cmd_sweeper)

    calc = sub.add_parser("calc-results", help="turns calculation results from the reply queue into saga events")
    calc.set_defaults(func=cmd_calc_results)

    bridge = sub.add_parser("bridge", help="the Kafka bridge (consumer group CONSUMER_GROUP)")
    bridge.add_argument("--group", help="consumer group (default: CONSUMER_GROUP)")
    bridge.add_argument("--metrics-port", type=_number(1, 65535, zero="off"), default=0, help="serve /metrics on 127.0.0.1:PORT")
    bridge.set_defaults(func=cmd_bridge)

    produce = sub.add_parser("produce", help="produce one JSON event to a topic (KAFKA_BROKERS, else :9092)")
    produce.add_argument("topic")
    produce.add_argument("payload", help="the JSON payload")
    produce.add_argument("--key")
    produce.add_argument("--event-id", type=_event_id, metavar="ID",
                         help="the event_id header, by which the bridge de-duplicates: give the same ID to an "
                              f"event sent again (at most {EVENT_ID_MAX} characters; docs/kafka.md)")
    produce.add_argument("--header", type=_header, action="append", default=[], metavar="NAME=VALUE",
                         help="a header of the message (repeatable)")
    produce.set_defaults(func=cmd_produce)

    flower = sub.add_parser("flower", help="Flower with basic auth (FLOWER_BASIC_AUTH)")
    flower.add_argument("--port", type=PORT, default=5555)
    flower.add_argument("--address", default="127.0.0.1")
    flower.set_defaults(func=cmd_flower)

    dev = sub.add_parser("dev", help="all processes and the emulators together, in the foreground")
    dev.add_argument("--concurrency", type=COUNT, default=4)
    dev.add_argument("--api-workers", type=COUNT, default=2)
    dev.add_argument("--flower-port", type=PORT, default=5555)
    dev.add_argument("--emulator-port", type=_number(1, 65533), default=8001,
                     help="first of three ports for the media emulators (8001-8003)")
    dev.add_argument("--kafka-port", type=_number(1, 65535, zero="any free port"), default=9092,
                     help="port of the bundled Kafka broker when KAFKA_BROKERS is unset (0: any free port)")
    dev.add_argument("--kafka-emulators", action=argparse.BooleanOptionalAction, default=True,
                     help="run the emulated Kafka services (story, TTS, delivery prefetch, worker runner) against "
                          "the bundled broker or KAFKA_BROKERS (default); --no-kafka-emulators when real ones run")
    dev.set_defaults(func=cmd_dev)
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    set_service(args.command)
    try:
        args.func(args)
    except ConfigError as exc:  # a bad variable: one line naming it, not a traceback
        sys.exit(f"configuration error: {exc.message}")
    except KeyboardInterrupt:  # Ctrl-C before a command set its own handler: stop, no traceback
        sys.exit(130)


if __name__ == "__main__":
    main()
