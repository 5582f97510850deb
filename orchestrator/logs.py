"""Structured logs: one JSON object per line, carrying the id of the workflow a line is about and
the correlation id of the request or event that caused it (`LOG_FORMAT=text` for a terminal).

Secrets never reach a log line: URLs are rendered with their password masked (`mask_url`), and
every handler `configure` installs carries a `RedactFilter` that replaces the process's secret
values (`Settings.secrets()`: ADMIN_TOKEN, GITLAB_TOKEN, URL passwords, basic-auth passwords) with
`***` in the message and the traceback, whatever logged them (our code, Celery, a driver's error).

The correlation id comes in as an HTTP `X-Correlation-ID` header (or is made up), travels with
every outbox message the request's transaction writes (a Celery header, a Kafka header), and is
taken up again by the task or the bridge that handles the message; so `grep <id>` over the logs
of every process follows one request through the workflow.
"""
from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import threading
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any, Callable, Iterator

from . import ids

#: The Celery and Kafka header that carries the correlation id.
HEADER = "orchestrator_correlation_id"

_workflow: contextvars.ContextVar[str | None] = contextvars.ContextVar("workflow_id", default=None)
_correlation: contextvars.ContextVar[str | None] = contextvars.ContextVar("correlation_id", default=None)


def correlation_id() -> str | None:
    return _correlation.get()


def new_correlation_id() -> str:
    return ids.uuid4().hex


#: The longest correlation id kept (the instances' and outbox's column): a longer one is cut.
CORRELATION_ID_MAX = 64


def given_correlation_id(value: str | None) -> str | None:
    """The correlation id a request or event gives (HTTP `X-Correlation-ID` or `X-Request-ID`,
    the Kafka header HEADER): stripped and cut to CORRELATION_ID_MAX characters; None when
    blank or absent (one is made up or carried on). Its entry point refuses one with a hidden
    character in it first (a 400 over HTTP, a dead letter on Kafka)."""
    return (value or "").strip()[:CORRELATION_ID_MAX] or None


def bind(workflow_id: str | None = None, correlation_id: str | None = None) -> Callable[[], None]:
    """Lines logged from here on carry these ids (None keeps the current one); call the result
    to go back to what was before."""
    tokens: list[tuple[contextvars.ContextVar[str | None], contextvars.Token[str | None]]] = []
    if workflow_id is not None:
        tokens.append((_workflow, _workflow.set(workflow_id)))
    if correlation_id is not None:
        tokens.append((_correlation, _correlation.set(correlation_id)))

    def unbind() -> None:
        for var, token in reversed(tokens):
            try:
                var.reset(token)
            except (RuntimeError, ValueError):  # used already, or from another context (a stream's)
                var.set(None)

    return unbind


@contextmanager
def context(workflow_id: str | None = None, correlation_id: str | None = None) -> Iterator[None]:
    """Lines logged inside carry these ids (None keeps what the outer context has)."""
    unbind = bind(workflow_id, correlation_id)
    try:
        yield
    finally:
        unbind()


#: What a secret is replaced with.
MASK = "***"
#: Secrets shorter than this are not searched for in free text (masking "admin" would garble
#: every "/admin/..." path); URL passwords are masked at any length by `mask_url`.
MIN_SECRET_LENGTH = 8
_URL_CREDENTIALS = re.compile(r"(?P<head>[a-z][a-z0-9+.-]*://[^:/@\s'\"]*:)[^@\s'\"]+@", re.I)
_secrets: tuple[str, ...] = ()


def mask_url(url: str) -> str:
    """`url` (or any text holding URLs) with the password of every `scheme://user:password@host`
    replaced by `***`: the form in which a URL may be logged or answered."""
    return _URL_CREDENTIALS.sub(lambda m: m.group("head") + MASK + "@", url)


def set_secrets(secrets: "list[str] | tuple[str, ...]") -> None:
    """The secret values `redact` masks in this process (long enough ones: MIN_SECRET_LENGTH)."""
    global _secrets
    _secrets = tuple(sorted({s for s in secrets if len(s) >= MIN_SECRET_LENGTH}, key=len, reverse=True))


def redact(text: str) -> str:
    """`text` with URL passwords and this process's secrets (`set_secrets`) masked."""
    text = mask_url(text)
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, MASK)
    return text


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of an error's text, secrets masked (`redact`), at most `limit` characters:
    SQLAlchemy and others add the statement, a traceback or a link on further lines."""
    return redact(str(exc)).strip().split("\n", 1)[0][:limit]


class RedactFilter(logging.Filter):
    """Masks secrets (`redact`) in a record's message and traceback before any formatter sees it."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, ()
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


class ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.workflow_id = getattr(record, "workflow_id", None) or _workflow.get()
        record.correlation_id = getattr(record, "correlation_id", None) or _correlation.get()
        return True


#: The command this process runs (`api`, `worker`, `sweeper`, `bridge`, ...), set by the CLI: the
#: `service` of its JSON lines, so that one pipeline of every process's lines tells them apart.
_service: str | None = None


def set_service(name: str) -> None:
    """Name this process's lines (`service` in JSON) after the command it runs."""
    global _service
    _service = name


class JsonFormatter(logging.Formatter):
    """One JSON object per record: `ts`, `level`, `logger`, `service` (the command: api, worker,
    ...), `pid`, `process` (Celery's and billiard's name: MainProcess, ForkPoolWorker-1),
    `message`, and `workflow_id`, `correlation_id`, `exc` when there are."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "service": _service,
            "pid": record.process,
            "process": record.processName,
            "message": record.getMessage(),
        }
        for key in ("workflow_id", "correlation_id"):
            value = getattr(record, key, None)
            if value:
                out[key] = value
        if record.exc_text or record.exc_info:
            out["exc"] = record.exc_text or self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(processName)s %(name)s%(ids)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        ids = [f"{k}={v}" for k in ("workflow_id", "correlation_id") if (v := getattr(record, k, None))]
        record.ids = f" [{' '.join(ids)}]" if ids else ""
        return super().format(record)


class OneLineFilter(logging.Filter):
    """A record with a traceback becomes one line: its message and the exception. For retry
    loops of libraries that log a whole traceback at every try (RETRY_LOGGERS)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            record.msg = f"{record.getMessage().rstrip()} ({type(exc).__name__}: {exc})"
            record.args = None
            record.exc_info = record.exc_text = None
        return True


#: kombu's ConsumerMixin (calc-results, the calculator emulator) logs a traceback each time it
#: tries the broker again, about once a second while it is down or refuses the vhost.
RETRY_LOGGERS = ("kombu.mixins",)


def shorten_retry_tracebacks() -> None:
    """RETRY_LOGGERS log one line per try (OneLineFilter), not a traceback."""
    for name in RETRY_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, OneLineFilter) for f in logger.filters):
            logger.addFilter(OneLineFilter())


def log_uncaught_errors() -> None:
    """An exception nothing caught (in the main thread or another one) and a Python warning are
    logged through the root logger, as one line of the process's format, instead of a traceback
    or a warning text printed on stderr past the formatter."""
    logging.captureWarnings(True)  # warnings.warn(...) -> the "py.warnings" logger

    def main_thread(kind: type[BaseException], value: BaseException, tb: Any) -> None:
        if issubclass(kind, KeyboardInterrupt):
            sys.__excepthook__(kind, value, tb)
            return
        logging.getLogger("orchestrator").critical("uncaught %s: %s", kind.__name__, value,
                                                   exc_info=(kind, value, tb))

    def other_thread(args: threading.ExceptHookArgs) -> None:
        if args.exc_type is SystemExit:
            return
        name = args.thread.name if args.thread is not None else "?"
        logging.getLogger("orchestrator").error("uncaught %s in thread %s: %s", args.exc_type.__name__, name,
                                                args.exc_value, exc_info=(args.exc_type, args.exc_value,
                                                                          args.exc_traceback))

    sys.excepthook = main_thread
    threading.excepthook = other_thread


#: The format `configure` set up last in this process ("json" or "text"; None: not set up).
_format: str | None = None


def say(message: str, logger: str = "orchestrator", level: int = logging.INFO) -> None:
    """Tell the operator `message` (a command's progress: `database upgraded: ...`, dev's pids):
    a line of its own on stdout, as a terminal wants it, unless this process logs JSON
    (`configure(fmt="json")`), where every line is a JSON object: then a record of `logger` at
    `level` (INFO unless told)."""
    if _format == "json":
        logging.getLogger(logger).log(level, "%s", message)
    else:
        print(message, flush=True)


def configure(level: str, fmt: str, secrets: "list[str] | tuple[str, ...]" = ()) -> None:
    """The root logger of this process writes `fmt` ("json" or "text") lines to stderr, with
    `secrets` (and URL passwords) masked in every line; Python warnings and uncaught exceptions
    go through it too (`log_uncaught_errors`)."""
    global _format
    set_secrets(secrets)
    _format = fmt
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(ContextFilter())
    handler.addFilter(RedactFilter())
    handler.setFormatter(TextFormatter() if fmt == "text" else JsonFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    shorten_retry_tracebacks()
    log_uncaught_errors()
