"""Configuration: one object read from the environment (and an optional `.env`) at start-up.

The seeds' variable names are accepted as aliases. A malformed variable stops start-up with a
message naming it. Nothing here connects to anything.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Mapping

from .errors import ConfigError

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _read_dotenv(path: Path) -> dict[str, str]:
    values: dict[str, str] = {}
    if not path.is_file():
        return values
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        name, _, value = line.partition("=")
        value = value.split(" #", 1)[0].strip().strip("'\"")
        values[name.strip().removeprefix("export ").strip()] = value
    return values


def normalize_database_url(url: str) -> str:
    """Map the seeds' DSN forms (asyncpg, psycopg 3, postgres://) to the driver we ship."""
    url = url.strip()
    url = re.sub(r"^postgres(ql)?(\+[a-z0-9_]+)?://", "postgresql+psycopg2://", url)
    url = re.sub(r"^sqlite\+[a-z0-9_]+://", "sqlite://", url)
    return url


@dataclass(frozen=True)
class Settings:
    # State, broker, result backend
    database_url: str = "sqlite:///data/orchestrator.db"
    broker_url: str = ""
    result_backend: str = ""
    redis_url: str = ""
    # API server (seed 004)
    host: str = "0.0.0.0"
    port: int = 8000
    workers: int = 4
    # Polling and retry (seed 004)
    poll_interval: float = 3.0
    max_poll_attempts: int = 600
    http_max_retries: int = 3
    retry_backoff_base_seconds: float = 1.5
    # Cache and job lifetime (seed 004)
    cache_ttl_hours: float = 24.0
    job_timeout_minutes: float = 60.0
    # Media microservices (seed 004)
    video_downloader_url: str = "http://localhost:8001"
    audio_normalization_url: str = "http://localhost:8002"
    audio_transcriber_url: str = "http://localhost:8003"
    video_downloader_timeout: float = 300.0
    audio_normalization_timeout: float = 180.0
    audio_transcriber_timeout: float = 600.0
    default_language: str = "auto"
    default_remove_noise: bool = True
    default_convert_mono: bool = True
    default_sample_rate_16k: bool = True
    # Engine
    # Off behind a pooler that moves a session between server connections (PgBouncer in
    # transaction mode): the engine's statements are then planned on every call.
    database_prepared_statements: bool = True
    sweep_interval: float = 1.0
    step_lease_seconds: float = 600.0
    environment: str = "development"
    # Secrets
    admin_token: str = ""
    flower_basic_auth: str = ""
    # Later workflows and telemetry (accepted now so a shared .env does not fail)
    kafka_brokers: str = ""
    consumer_group: str = "orchestrator"
    gitlab_url: str = ""
    gitlab_token: str = ""
    gitlab_timeout: float = 10.0
    # Local git repositories served when no GitLab is configured (project path = folder path)
    git_repos_dir: str = "./data/repos"
    # The balance saga's calculation workers (docs/balance.md)
    calculation_exchange: str = "orchestrator.calculations"
    calculation_results_queue: str = "orchestrator.calculation-results"
    log_level: str = "INFO"
    log_format: str = "json"  # or "text" (the dev runner's default)
    otel_exporter_otlp_endpoint: str = ""
    extra: Mapping[str, str] = field(default_factory=dict)

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    def service_timeout(self, service: str) -> float:
        return {
            "video-downloader": self.video_downloader_timeout,
            "audio-normalization": self.audio_normalization_timeout,
            "audio-transcriber": self.audio_transcriber_timeout,
        }[service]

    def service_url(self, service: str) -> str:
        return {
            "video-downloader": self.video_downloader_url,
            "audio-normalization": self.audio_normalization_url,
            "audio-transcriber": self.audio_transcriber_url,
        }[service].rstrip("/")


# variable name(s), first wins -> field name. Aliases are the seeds' names.
_VARIABLES: dict[str, tuple[str, ...]] = {
    "database_url": ("DATABASE_URL", "POSTGRES_DSN"),
    "broker_url": ("CELERY_BROKER_URL",),
    "result_backend": ("CELERY_RESULT_BACKEND",),
    "redis_url": ("REDIS_URL",),
    "kafka_brokers": ("KAFKA_BROKERS", "KAFKA_BOOTSTRAP_SERVERS"),
    "admin_token": ("ADMIN_TOKEN",),
    "flower_basic_auth": ("FLOWER_BASIC_AUTH",),
}


def _parse(name: str, kind: type, raw: str) -> Any:
    if kind is bool:
        low = raw.strip().lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ConfigError(name, f"expected true or false, got {raw!r}")
    if kind in (int, float):
        try:
            value = kind(raw)
        except ValueError:
            raise ConfigError(name, f"expected a number, got {raw!r}") from None
        if value < 0:
            raise ConfigError(name, f"must not be negative, got {raw!r}")
        return value
    return raw.strip()


def load_settings(environ: Mapping[str, str] | None = None, dotenv: str | Path = ".env") -> Settings:
    """Read Settings from `environ` (default os.environ) over an optional .env file."""
    env: dict[str, str] = dict(_read_dotenv(Path(dotenv)))
    env.update(os.environ if environ is None else environ)
    values: dict[str, Any] = {}
    hints: dict[str, Callable[..., Any]] = {"str": str, "int": int, "float": float, "bool": bool}
    for f in fields(Settings):
        if f.name == "extra":
            continue
        names = _VARIABLES.get(f.name, (f.name.upper(),))
        for name in names:
            raw = env.get(name)
            if raw is not None and raw != "":
                values[f.name] = _parse(name, hints[str(f.type)], raw)
                break
    if "database_url" in values:
        values["database_url"] = normalize_database_url(values["database_url"])
        if not re.match(r"^(postgresql\+psycopg2|sqlite)://", values["database_url"]):
            raise ConfigError("DATABASE_URL", "expected a postgresql:// or sqlite:// URL")
    settings = Settings(**values, extra=env)
    if settings.poll_interval <= 0:
        raise ConfigError("POLL_INTERVAL", "must be greater than zero")
    if settings.max_poll_attempts < 1:
        raise ConfigError("MAX_POLL_ATTEMPTS", "must be at least 1")
    if settings.log_format not in ("json", "text"):
        raise ConfigError("LOG_FORMAT", f"expected json or text, got {settings.log_format!r}")
    if settings.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ConfigError("LOG_LEVEL", f"expected DEBUG, INFO, WARNING, ERROR or CRITICAL, got {settings.log_level!r}")
    if settings.flower_basic_auth and ":" not in settings.flower_basic_auth:
        raise ConfigError("FLOWER_BASIC_AUTH", "expected user:password")
    for name in ("VIDEO_DOWNLOADER_URL", "AUDIO_NORMALIZATION_URL", "AUDIO_TRANSCRIBER_URL"):
        if not re.match(r"^https?://[^/\s]+", getattr(settings, name.lower())):
            raise ConfigError(name, "expected an http:// or https:// URL")
    if settings.gitlab_url and not re.match(r"^https?://[^/\s]+", settings.gitlab_url):
        raise ConfigError("GITLAB_URL", "expected an http:// or https:// URL")
    return _with_broker_defaults(settings)


def _with_broker_defaults(s: Settings) -> Settings:
    """Embedded defaults: with nothing configured everything runs on SQLite files."""
    from dataclasses import replace

    broker = s.broker_url
    backend = s.result_backend
    if not broker:
        broker = "sqla+sqlite:///data/broker.db" if s.is_sqlite else "amqp://guest:guest@127.0.0.1:5672//"
    if not backend:
        if s.redis_url:
            backend = s.redis_url
        else:
            backend = "db+" + s.database_url
    return replace(s, broker_url=broker, result_backend=backend)
