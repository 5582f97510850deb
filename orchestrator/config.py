"""Configuration: typed settings read from the environment (and an optional `.env`) at start-up,
with pydantic-settings.

`Settings` holds what the engine core and its processes need. A workflow's own variables live in
an `AreaSettings` class beside the workflow (sagas/media/settings.py, sagas/balance/settings.py,
sagas/chat/settings.py) and are read from the same variables; `load_settings` checks every area
whose module is imported, and the entry points import the workflow modules first, so a bad value
stops start-up wherever its class lives.

The rules (README, "Configuration"):
- `.env` in the working directory is read, and the environment wins over it;
- a variable set to the empty string counts as unset: its default applies;
- names are exact (upper case); the seeds' names are aliases (`POSTGRES_DSN`, `KAFKA_BOOTSTRAP_SERVERS`),
  and the first one set wins;
- booleans are true/false, 1/0, yes/no, on/off; numbers must be finite and not negative, and each has the
  bounds its use needs (a port 1-65535, a count of processes at least 1, a lease or timeout above
  zero), so a value no process could run with stops start-up instead of a server that never answers;
- a malformed value raises ConfigError naming the variable. Nothing here connects to anything.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import unquote
from typing import Annotated, Any, ClassVar, Literal, Mapping, TypeVar

from dotenv import dotenv_values
from pydantic import (AliasChoices, AliasGenerator, AfterValidator, Field, PrivateAttr, ValidationError, ValidationInfo,
                      field_validator)
from pydantic_settings import BaseSettings, EnvSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict

from .errors import ConfigError

#: The password of a URL: scheme://user:PASSWORD@host
_URL_PASSWORD = re.compile(r"[a-z][a-z0-9+.-]*://[^:/@\s]*:([^@\s/]+)@", re.I)

#: A count or a duration: a negative value is refused, and a duration is finite (`inf` would pass
#: every bound check and then never expire; `nan` compares false with everything).
Count = Annotated[int, Field(ge=0)]
Seconds = Annotated[float, Field(ge=0, allow_inf_nan=False)]
#: A count where 0 would leave nothing to do the work (API workers): at least 1.
AtLeastOne = Annotated[int, Field(ge=1)]
#: A duration where 0 cannot work (a lease that has expired when taken, a request timeout that
#: fails before it is sent): greater than zero.
PositiveSeconds = Annotated[float, Field(gt=0, allow_inf_nan=False)]
#: A TCP port a server listens on: the kernel takes 1-65535 (bind() of a larger one raises
#: OverflowError inside the server, after start-up reported nothing wrong).
Port = Annotated[int, Field(ge=1, le=65535)]


def _http_url(value: str) -> str:
    if value and not re.match(r"^https?://[^/\s]+", value):
        raise ValueError("expected an http:// or https:// URL")
    return value


#: An http(s) URL (or empty where the variable is optional).
HttpUrl = Annotated[str, AfterValidator(_http_url)]


def env_names(prefix: str = "") -> SettingsConfigDict:
    """The model_config of a settings class whose variables are `prefix` + the field name in upper
    case (a field's own `validation_alias` overrides that, for the seeds' names)."""
    return SettingsConfigDict(
        case_sensitive=True, env_ignore_empty=True, extra="ignore", frozen=True, str_strip_whitespace=True,
        allow_inf_nan=False,  # every number setting is finite, not only those of the types above
        validate_by_name=True, validate_by_alias=True,
        alias_generator=AliasGenerator(validation_alias=lambda name: prefix + name.upper()))


class _Variables(EnvSettingsSource):
    """pydantic-settings' environment source over the variables `load_settings` gathered (the
    `.env` file under the environment), instead of os.environ."""

    def __init__(self, settings_cls: type[BaseSettings], variables: Mapping[str, str]) -> None:
        self._variables = variables
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        # Variable names are exact and upper case: a lower-case `log_level` would otherwise match
        # the field's own name (validate_by_name, which settings made in code need).
        return {k: v for k, v in self._variables.items() if v != "" and k.isupper()}


def _problem(error: dict[str, Any]) -> str:
    """One pydantic error in the words the loader has always used."""
    kind, got, ctx = error["type"], error.get("input"), error.get("ctx") or {}
    if kind == "finite_number":
        return f"must be a finite number, got {got!r}"
    if kind in ("int_parsing", "float_parsing", "int_from_float"):
        return f"expected a number, got {got!r}"
    if kind == "bool_parsing":
        return f"expected true or false, got {got!r}"
    if kind == "greater_than_equal":
        return f"must not be negative, got {got!r}" if ctx.get("ge") == 0 else f"must be at least {ctx['ge']}, got {got!r}"
    if kind == "less_than_equal":
        return f"must be at most {ctx['le']}, got {got!r}"
    if kind == "greater_than":
        return "must be greater than zero" if ctx.get("gt") == 0 else f"must be greater than {ctx['gt']}"
    if kind == "literal_error":
        return f"expected {ctx.get('expected')}, got {got!r}"
    if kind == "value_error":
        return str(ctx.get("error") or error["msg"])
    return str(error["msg"])


Area = TypeVar("Area", bound="AreaSettings")


class EnvSettings(BaseSettings):
    """Base of every settings class: read only from the variables `from_variables` is given (made
    in code, one reads nothing from the process environment), errors as ConfigError."""

    model_config = env_names()

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
                                   **_: PydanticBaseSettingsSource) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings,)

    @classmethod
    def variable(cls, field: str) -> str:
        """The (first) variable name of `field`."""
        alias = cls.model_fields[field].validation_alias
        if isinstance(alias, AliasChoices):
            return str(alias.choices[0])
        return str(alias or field)

    @classmethod
    def variable_names(cls) -> list[str]:
        """Every variable name this class reads (a field's aliases included)."""
        names: list[str] = []
        for field, info in cls.model_fields.items():
            alias = info.validation_alias
            names += [str(a) for a in alias.choices] if isinstance(alias, AliasChoices) else [cls.variable(field)]
        return names

    @classmethod
    def from_variables(cls, variables: Mapping[str, str]):  # type: ignore[no-untyped-def]
        """An instance from `variables` (name -> raw value). Raises ConfigError naming the variable."""
        values = _Variables(cls, variables)()
        try:
            return cls(**values)
        except ValidationError as exc:
            error = exc.errors()[0]
            loc = str(error["loc"][0]) if error["loc"] else ""
            name = cls.variable(loc) if loc in cls.model_fields else loc
            raise ConfigError(name, _problem(dict(error))) from None


def normalize_database_url(url: str) -> str:
    """Map the seeds' DSN forms (asyncpg, psycopg 3, postgres://) to the driver we ship."""
    url = url.strip()
    url = re.sub(r"^postgres(ql)?(\+[a-z0-9_]+)?://", "postgresql+psycopg2://", url)
    url = re.sub(r"^sqlite\+[a-z0-9_]+://", "sqlite://", url)
    return url


class Settings(EnvSettings):
    """The engine core's and its processes' settings (README, "Configuration"). Frozen."""

    # State, broker, result backend
    database_url: str = Field("sqlite:///data/orchestrator.db", validation_alias=AliasChoices("DATABASE_URL", "POSTGRES_DSN"))
    broker_url: str = Field("", validation_alias="CELERY_BROKER_URL")
    result_backend: str = Field("", validation_alias="CELERY_RESULT_BACKEND")
    redis_url: str = ""
    # API server (seed 004)
    host: str = "0.0.0.0"
    port: Port = 8000
    workers: AtLeastOne = 4
    # threads per API worker: each open chat WebSocket or event stream holds one
    api_threads: AtLeastOne = 32
    # Engine
    # Off behind a pooler that moves a session between server connections (PgBouncer in
    # transaction mode): the engine's statements are then planned on every call.
    database_prepared_statements: bool = True
    # 0 would make the sweeper spin without a pause and every step's lease expire as it is taken
    sweep_interval: PositiveSeconds = 1.0
    step_lease_seconds: PositiveSeconds = 600.0
    # How many successive steps one delivery may run in its worker when each step's successor is
    # a task that worker consumes (no broker hop; see docs/performance.md); 0: every step goes
    # through the broker.
    local_continuation_steps: Count = 16
    # How long a sweeper holds a bulk operation it drives before another may take it over.
    bulk_lease_seconds: PositiveSeconds = 30.0
    environment: str = "development"
    #: How long a process waits at start-up for PostgreSQL, RabbitMQ and Redis before it gives up
    #: (0: for ever), retrying with backoff (orchestrator/runtime.py, `wait_for_services`).
    startup_wait_seconds: Seconds = 0.0
    #: Modules imported to register workflows, their tasks and their settings. The engine imports
    #: none of them by name itself.
    workflow_modules: str = "sagas,tasks"
    # Secrets
    admin_token: str = ""
    flower_basic_auth: str = ""
    # The operator console at /ui/ (user:password); unset, the console answers 403.
    console_basic_auth: str = ""
    # Kafka (the bridge and the outbox publisher)
    kafka_brokers: str = Field("", validation_alias=AliasChoices("KAFKA_BROKERS", "KAFKA_BOOTSTRAP_SERVERS"))
    consumer_group: str = "orchestrator"
    log_level: str = "INFO"
    log_format: Literal["json", "text"] = "json"  # "text" is the dev runner's default
    otel_exporter_otlp_endpoint: str = ""
    otel_exporter_otlp_protocol: str = ""

    #: the variables these settings were read from, for the per-area settings
    _variables: Mapping[str, str] = PrivateAttr(default_factory=dict)
    _areas: dict[type, Any] = PrivateAttr(default_factory=dict)

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, value: str) -> str:
        value = normalize_database_url(value)
        if not re.match(r"^(postgresql\+psycopg2|sqlite)://", value):
            raise ValueError("expected a postgresql:// or sqlite:// URL")
        from sqlalchemy.engine import make_url

        try:  # SQLAlchemy's own parse, which a bad port (`:notaport`, `[::1`) failed only on first use
            make_url(value)
        except Exception as exc:
            raise ValueError(f"not a database URL SQLAlchemy can read ({exc})") from None
        return value

    @field_validator("broker_url", "result_backend")
    @classmethod
    def _celery_url(cls, value: str, info: ValidationInfo) -> str:
        # Read by the libraries that will use them (kombu's transports, Celery's backends): a
        # process waited for ever on `amqpp://` or a port that is no number, and a worker stopped
        # on `CELERY_RESULT_BACKEND=garbage` with exit status 0.
        if not value:
            return value
        if "://" not in value:
            raise ValueError("expected a URL (scheme://...)")
        from kombu.utils.url import parse_url

        try:
            parse_url(value)
            if info.field_name == "broker_url":
                from kombu import Connection

                Connection(value).transport_cls  # noqa: B018  (resolves the transport by its scheme)
            else:
                from celery.app.backends import by_url

                by_url(value)
        except (ValueError, KeyError, ImportError) as exc:
            why = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc  # a KeyError's str is quoted
            raise ValueError(f"cannot be used: {why}") from None
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str) -> str:
        if value:
            from redis.connection import parse_url

            try:
                parse_url(value)
            except ValueError as exc:
                raise ValueError(str(exc)) from None
        return value

    @field_validator("log_level")
    @classmethod
    def _log_level(cls, value: str) -> str:
        if value.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise ValueError(f"expected DEBUG, INFO, WARNING, ERROR or CRITICAL, got {value!r}")
        return value

    @field_validator("otel_exporter_otlp_protocol")
    @classmethod
    def _otlp_protocol(cls, value: str) -> str:
        if value.strip() not in ("", "grpc", "http/protobuf"):
            raise ValueError(f"expected grpc or http/protobuf, got {value!r}")
        return value.strip()

    @field_validator("flower_basic_auth", "console_basic_auth")
    @classmethod
    def _basic_auth(cls, value: str) -> str:
        # A login with an empty user or password would let in anyone who sends that user, or no
        # user at all.
        for login in value.split(",") if value else []:
            user, colon, password = login.partition(":")
            if not colon:
                raise ValueError("expected user:password (several separated by commas)")
            empty = "user" if not user.strip() else "password" if not password.strip() else None
            if empty:
                raise ValueError(f"expected user:password, got an empty {empty}")
        return value

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    def secrets(self) -> list[str]:
        """The secret values these settings were read with, for redacting logs and answers:
        every variable named *_TOKEN, *_PASSWORD, *_SECRET or *_KEY (ADMIN_TOKEN, GITLAB_TOKEN...),
        the password part of *_BASIC_AUTH, and the password of every URL-valued variable
        (DATABASE_URL, CELERY_BROKER_URL, REDIS_URL...). Longest first; never empty strings."""
        found: set[str] = set()
        for name, value in {**self._variables, "DATABASE_URL": self.database_url,
                            "CELERY_BROKER_URL": self.broker_url, "CELERY_RESULT_BACKEND": self.result_backend,
                            "REDIS_URL": self.redis_url, "ADMIN_TOKEN": self.admin_token,
                            "CONSOLE_BASIC_AUTH": self.console_basic_auth,
                            "FLOWER_BASIC_AUTH": self.flower_basic_auth}.items():
            upper = name.upper()
            if not value:
                continue
            if upper.endswith(("_TOKEN", "_PASSWORD", "_SECRET", "_KEY")):
                found.add(value)
            elif upper.endswith("_BASIC_AUTH"):  # user:password, several separated by commas
                found.update(login.partition(":")[2] for login in value.split(","))
            for m in _URL_PASSWORD.finditer(value):
                found.update((m.group(1), unquote(m.group(1))))  # as written and as a client decodes it
        return sorted((s for s in found if s), key=len, reverse=True)

    @property
    def variables(self) -> Mapping[str, str]:
        """Every variable these settings were read from (environment over `.env`)."""
        return self._variables

    def area(self, cls: type[Area]) -> Area:
        """The settings of one area (a workflow's own), read from the same variables; made once."""
        found = self._areas.get(cls)
        if found is None:
            found = self._areas[cls] = cls.from_variables(self._variables)
        return found

    def misspelled_variables(self) -> list[tuple[str, str]]:
        """(variable, the setting it likely means) for each variable these settings were read
        from that is no setting but closely resembles one (`close_setting_name`): a typo such as
        DATABSE_URL is otherwise ignored, and the process runs on the default. The settings are
        Settings' and every registered area's (their modules imported by then)."""
        names = setting_names()
        found = []
        for variable in sorted(self._variables):
            meant = close_setting_name(variable, names)
            if meant is not None:
                found.append((variable, meant))
        return found

    def check_areas(self) -> "Settings":
        """Read every registered area's settings now, so a bad value stops start-up (ConfigError)."""
        for cls in AreaSettings.registered:
            self.area(cls)
        return self


class AreaSettings(EnvSettings):
    """A workflow's own settings, declared beside it. Subclasses register themselves, so
    `load_settings` checks them at start-up once their module is imported."""

    registered: ClassVar[list[type["AreaSettings"]]] = []

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        AreaSettings.registered.append(cls)

    @classmethod
    def from_settings(cls: type[Area], settings: Settings) -> Area:
        """This area's settings, read from the variables `settings` came from."""
        return settings.area(cls)


#: Variables read outside the settings classes, or by other programs, that resemble a setting's
#: name without being a typo of it: the OpenTelemetry SDK's own (OTEL_EXPORTER_OTLP_HEADERS...),
#: dev's and the emulators', and the postgres image's, often set beside ours (POSTGRES_DB is
#: not POSTGRES_DSN misspelled).
NOT_SETTINGS_PREFIXES = ("OTEL_",)
NOT_SETTINGS = frozenset({"PROMETHEUS_MULTIPROC_DIR", "GITLAB_EMULATOR_PORT", "GITLAB_EMULATOR_DATA",
                          "POSTGRES_DB", "POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_HOST", "POSTGRES_PORT"})
#: How alike (difflib's ratio, over upper-case names) a variable must be to a setting's name to
#: be taken for a typo of it: DATABSE_URL and SWEEP_INTERVL are about 0.96, PORTS 0.89, while
#: HOME and HOST (0.75) or HOSTNAME and HOST (0.67) are different words.
CLOSE_NAME_CUTOFF = 0.85


def setting_names() -> list[str]:
    """The variable names of Settings and of every registered AreaSettings class."""
    names = Settings.variable_names()
    for cls in AreaSettings.registered:
        names += cls.variable_names()
    return sorted(set(names))


def close_setting_name(variable: str, names: "list[str] | None" = None) -> str | None:
    """The setting name (of `names`, default `setting_names()`) that `variable` is likely a
    misspelling of, compared without regard to case; None when `variable` is a setting's exact
    name, is read elsewhere (NOT_SETTINGS), or resembles none (PATH, HOME, PYTHONPATH)."""
    import difflib

    names = setting_names() if names is None else names
    if variable in names or variable in NOT_SETTINGS or variable.upper().startswith(NOT_SETTINGS_PREFIXES):
        return None
    by_upper = {name.upper(): name for name in names}
    if variable.upper() in by_upper:  # log_level: names are exact, upper case
        return by_upper[variable.upper()]
    close = difflib.get_close_matches(variable.upper(), list(by_upper), n=1, cutoff=CLOSE_NAME_CUTOFF)
    return by_upper[close[0]] if close else None


def read_variables(environ: Mapping[str, str] | None = None, dotenv: str | Path = ".env") -> dict[str, str]:
    """The variables to read: `dotenv` (if it is a file) under `environ` (default os.environ)."""
    values = {k: v for k, v in dotenv_values(dotenv).items() if v is not None} if Path(dotenv).is_file() else {}
    values.update(os.environ if environ is None else environ)
    return values


def load_settings(environ: Mapping[str, str] | None = None, dotenv: str | Path = ".env") -> Settings:
    """Read Settings from `environ` (default os.environ) over an optional .env file, and check
    every registered area's settings. Raises ConfigError naming the first bad variable."""
    variables = read_variables(environ, dotenv)
    settings = _with_broker_defaults(Settings.from_variables(variables))
    settings._variables = variables
    return settings.check_areas()


def _with_broker_defaults(s: Settings) -> Settings:
    """Embedded defaults: with nothing configured everything runs on SQLite files."""
    broker = s.broker_url
    backend = s.result_backend
    if not broker:
        broker = "sqla+sqlite:///data/broker.db" if s.is_sqlite else "amqp://guest:guest@127.0.0.1:5672//"
    if not backend:
        if s.redis_url:
            backend = s.redis_url
        else:
            backend = "db+" + s.database_url
    return s.model_copy(update={"broker_url": broker, "result_backend": backend})
