"""The engine's pure parts, no I/O: machines, guards, retry arithmetic, configuration, input."""
from __future__ import annotations

import random
from datetime import timedelta

import pytest
from statemachine.exceptions import TransitionNotAllowed

from orchestrator.config import Settings, load_settings, normalize_database_url
from orchestrator.errors import ConfigError, InvalidInput, UpstreamError
from orchestrator.workflow import Retry
from sagas.media import MediaPipeline
from sagas.media.settings import MediaSettings


class Row:
    def __init__(self, state=None):
        self.state = state
        self.context = {"input": {}}
        self.id = "row"


def machine(state=None):
    row = Row(state)
    return row, MediaPipeline(model=row)


def test_media_machine_walks_its_diagram():
    row, m = machine()
    assert row.state == "queued"
    for event, state in [("start", "downloading"), ("downloaded", "normalizing"),
                         ("normalized", "transcribing"), ("transcribed", "completed")]:
        m.send(event, payload={})
        assert row.state == state


@pytest.mark.parametrize("state, event", [("queued", "downloaded"), ("completed", "fail"),
                                          ("downloading", "transcribed"), ("cancelled", "start")])
def test_illegal_events_raise(state, event):
    _, m = machine(state)
    with pytest.raises(TransitionNotAllowed):
        m.send(event, payload={})


def test_unknown_event_raises():
    _, m = machine("queued")
    with pytest.raises(TransitionNotAllowed):
        m.send("explode")


def test_restart_guard_goes_back_to_the_named_step():
    row, m = machine("failed")
    m.send("restart", payload={"step": "normalization"})
    assert row.state == "normalizing"
    row, m = machine("failed")
    with pytest.raises(TransitionNotAllowed):
        m.send("restart", payload={"step": "nonsense"})


def test_failed_state_records_and_clears_the_error():
    row, m = machine("transcribing")
    m.send("fail", payload={"error": "boom"})
    assert row.context["error"] == "boom"
    m.send("restart", payload={"step": "transcription"})
    assert "error" not in row.context


def test_step_table_names_and_policies():
    table = MediaPipeline.step_table()
    assert [s.name for s in table.values()] == ["download", "normalization", "transcription"]
    assert table["downloading"].task == "media.download"
    policy = table["downloading"].policy(settings(HTTP_MAX_RETRIES="5", RETRY_BACKOFF_BASE_SECONDS="2.5"))
    assert policy.attempts == 6 and policy.backoff == 2.5


def test_retry_delay_is_exponential_with_bounded_jitter():
    r = Retry(attempts=5, backoff=2.0, factor=2.0, jitter=0.0)
    assert [r.delay(n) for n in (1, 2, 3, 4)] == [2.0, 4.0, 8.0, 16.0]
    capped = Retry(backoff=10, factor=10, max_delay=60, jitter=0)
    assert capped.delay(5) == 60
    jittery = Retry(backoff=1.0, jitter=0.25)
    rng = random.Random(7)
    delays = [jittery.delay(3, rng) for _ in range(200)]
    assert all(3.0 <= d <= 5.0 for d in delays) and len(set(delays)) > 100


def test_retry_decision():
    r = Retry(attempts=3)
    assert r.should_retry(1, True) and r.should_retry(2, True)
    assert not r.should_retry(3, True)
    assert not r.should_retry(1, False)


def test_upstream_errors_retry_on_5xx_and_connection_only():
    assert UpstreamError("s", "x", 500).retryable
    assert UpstreamError("s", "x", None).retryable
    assert not UpstreamError("s", "x", 404).retryable
    assert not UpstreamError("s", "x", 400).retryable


def settings(**env: str) -> Settings:
    return load_settings(environ=env, dotenv="/nonexistent")


def test_config_defaults_are_the_seeds():
    s = load_settings(environ={}, dotenv="/nonexistent")
    m = MediaSettings.from_settings(s)
    assert (s.port, s.workers, m.poll_interval, m.max_poll_attempts) == (8000, 4, 3.0, 600)
    assert (m.http_max_retries, m.retry_backoff_base_seconds) == (3, 1.5)
    assert (m.cache_ttl_hours, m.job_timeout_minutes) == (24.0, 60.0)
    assert m.video_downloader_url == "http://localhost:8001"
    assert (m.video_downloader_timeout, m.audio_normalization_timeout, m.audio_transcriber_timeout) == (300, 180, 600)
    assert m.default_language == "auto" and m.default_remove_noise and m.default_convert_mono
    assert s.database_url.startswith("sqlite") and s.broker_url.startswith("sqla+sqlite")
    assert s.database_prepared_statements
    off = load_settings(environ={"DATABASE_PREPARED_STATEMENTS": "false"}, dotenv="/nonexistent")
    assert not off.database_prepared_statements


def test_config_aliases_and_driver_mapping():
    s = load_settings(environ={"POSTGRES_DSN": "postgresql+asyncpg://u:p@db:5432/x",
                               "KAFKA_BOOTSTRAP_SERVERS": "k:9092"}, dotenv="/nonexistent")
    assert s.database_url == "postgresql+psycopg2://u:p@db:5432/x"
    assert s.kafka_brokers == "k:9092"
    assert s.broker_url.startswith("amqp://")
    assert normalize_database_url("postgres://a@b/c") == "postgresql+psycopg2://a@b/c"
    env = {"DATABASE_URL": "postgresql://a@b/c", "POSTGRES_DSN": "postgresql://z@z/z"}
    assert load_settings(environ=env, dotenv="/nonexistent").database_url == "postgresql+psycopg2://a@b/c"


@pytest.mark.parametrize("name, value", [("POLL_INTERVAL", "soon"), ("PORT", "eighty"), ("WORKERS", "-1"),
                                         ("DEFAULT_REMOVE_NOISE", "maybe"), ("DATABASE_URL", "mysql://x"),
                                         ("VIDEO_DOWNLOADER_URL", "localhost:8001"),
                                         ("FLOWER_BASIC_AUTH", "nopassword"), ("CONSOLE_BASIC_AUTH", "nopassword"),
                                         # an empty password or user let anyone in who sent it
                                         ("CONSOLE_BASIC_AUTH", "admin:"), ("CONSOLE_BASIC_AUTH", ":pw"),
                                         ("CONSOLE_BASIC_AUTH", "admin: "), ("FLOWER_BASIC_AUTH", "admin:"),
                                         ("FLOWER_BASIC_AUTH", "ops:pw,admin:"), ("CONSOLE_BASIC_AUTH", "ops:pw,admin:"),
                                         ("POLL_INTERVAL", "0"),
                                         ("DATABASE_PREPARED_STATEMENTS", "sometimes")])
def test_misconfiguration_names_the_variable(name, value):
    with pytest.raises(ConfigError) as err:
        load_settings(environ={name: value}, dotenv="/nonexistent")
    assert err.value.variable == name and name in str(err.value)


def test_dotenv_is_read_and_environment_wins(tmp_path):
    f = tmp_path / ".env"
    f.write_text("# comment\nPORT=9000\nexport POLL_INTERVAL=5 # seconds\nWORKERS='2'\n")
    s = load_settings(environ={"PORT": "9100"}, dotenv=f)
    assert (s.port, MediaSettings.from_settings(s).poll_interval, s.workers) == (9100, 5.0, 2)


def test_media_input_defaults_and_validation():
    s = settings(DEFAULT_LANGUAGE="pt", DEFAULT_REMOVE_NOISE="false")
    out = MediaPipeline.validate_input({"youtube_url": " https://youtu.be/x "}, s)
    assert out == {"youtube_url": "https://youtu.be/x", "language": "pt", "language_out": None,
                   "remove_noise": False, "convert_to_mono": True, "apply_highpass_filter": False,
                   "set_sample_rate_16k": True, "isolate_vocals": False}
    with pytest.raises(InvalidInput) as err:
        MediaPipeline.validate_input({"youtube_url": "https://youtu.be/x", "remove_noise": "no"}, s)
    assert err.value.field == "remove_noise"
    assert MediaPipeline.timeout(settings(JOB_TIMEOUT_MINUTES="60")) == timedelta(minutes=60)
    assert MediaPipeline.reuse_within(settings(CACHE_TTL_HOURS="0")) is None


def test_empty_variable_is_unset_even_over_dotenv(tmp_path):
    f = tmp_path / ".env"
    f.write_text("PORT=9000\nCONSUMER_GROUP=from-file\n")
    s = load_settings(environ={"PORT": "", "CONSUMER_GROUP": " "}, dotenv=f)
    assert (s.port, s.consumer_group) == (8000, "")  # empty: the default; blank: stripped, as before
    assert load_settings(environ={"DATABASE_URL": "", "POSTGRES_DSN": "postgres://a@b/c"},
                         dotenv=f).database_url == "postgresql+psycopg2://a@b/c"


@pytest.mark.parametrize("raw, value", [("yes", True), ("ON", True), ("1", True), ("no", False), ("off", False),
                                        ("0", False), ("False", False)])
def test_boolean_spellings(raw, value):
    assert settings(DATABASE_PREPARED_STATEMENTS=raw).database_prepared_statements is value


def test_settings_made_in_code_read_no_environment(monkeypatch):
    monkeypatch.setenv("PORT", "1234")
    monkeypatch.setenv("DATABASE_URL", "mysql://nope")
    assert Settings().port == 8000 and Settings(port=9).port == 9


def test_a_variable_that_resembles_a_setting_is_named_with_the_setting_and_no_other_is():
    import sagas  # noqa: F401  (registers every workflow's settings, as the entry points do)

    typos = {"DATABSE_URL": "DATABASE_URL", "CELERY_BROKER_ULR": "CELERY_BROKER_URL", "SWEEP_INTERVL": "SWEEP_INTERVAL",
             "log_level": "LOG_LEVEL", "KAFKA_BROKER": "KAFKA_BROKERS", "POLL_INTERVALL": "POLL_INTERVAL",
             "GITLAB_TOKN": "GITLAB_TOKEN"}
    others = ["PATH", "HOME", "PYTHONPATH", "HOST", "PORT", "HOSTNAME", "USER", "LANG", "TERM", "PWD", "TZ",
              "POSTGRES_DSN", "KAFKA_BOOTSTRAP_SERVERS", "POSTGRES_DB", "POSTGRES_PASSWORD", "OTEL_EXPORTER_OTLP_HEADERS",
              "OTEL_SERVICE_NAME", "PROMETHEUS_MULTIPROC_DIR", "GITLAB_EMULATOR_PORT", "VIRTUAL_ENV", "HTTP_PROXY"]
    s = load_settings(environ={**{name: "1" for name in others}, **{name: "x" for name in typos},
                               "POSTGRES_DSN": "postgres://a@b/c"}, dotenv="/nonexistent")
    assert dict(s.misspelled_variables()) == typos


@pytest.mark.parametrize("name, value, problem", [
    ("API_THREADS", "0", "must be at least 1"), ("WORKERS", "0", "must be at least 1"),
    ("PORT", "65536", "must be at most 65535"), ("BULK_LEASE_SECONDS", "0", "must be greater than zero"),
    ("GITLAB_URL", "gitlab.example.com", "expected an http:// or https:// URL"),
    ("GITLAB_TIMEOUT", "soon", "expected a number"), ("MAX_POLL_ATTEMPTS", "0", "must be at least 1"),
    ("CHAT_MAX_MESSAGE_CHARS", "lots", "expected a number"), ("CHAT_HEARTBEAT_SECONDS", "0", "must be at least 0.1"),
    ("LOG_FORMAT", "xml", "expected 'json' or 'text'"), ("KAFKA_BOOTSTRAP_SERVERS", "", None)])
def test_every_area_is_checked_when_settings_load(name, value, problem):
    """The workflows' own settings (media, balance, chat) are checked by load_settings, naming the
    variable, as the core ones are: a process stops at start-up, not on the first request."""
    import sagas  # noqa: F401  (registers every workflow's settings, as the entry points do)

    if problem is None:
        assert load_settings(environ={name: value}, dotenv="/nonexistent").kafka_brokers == ""
        return
    with pytest.raises(ConfigError) as err:
        load_settings(environ={name: value}, dotenv="/nonexistent")
    assert err.value.variable == name and problem in err.value.message


def test_workflow_settings_are_typed_and_beside_their_workflow():
    from sagas.balance.settings import BalanceSettings
    from sagas.chat.settings import ChatSettings

    s = settings(WORKFLOW_MODULES="sagas", GIT_REPOS_DIR="/srv/git", CALCULATION_EXCHANGE="calc",
                 CHAT_CALLBACK_CONSUMERS="3", REDIS_URL="redis://r:6379/1", VIDEO_DOWNLOADER_URL="http://v:1/")
    assert s.workflow_modules == "sagas" and not hasattr(s, "git_repos_dir")
    b = BalanceSettings.from_settings(s)
    assert (b.git_repos_dir, b.calculation_exchange, b.calculation_results_queue) == (
        "/srv/git", "calc", "orchestrator.calculation-results")
    c = ChatSettings.from_settings(s)
    assert (c.callback_consumers, c.redis_url) == (3, "redis://r:6379/1")
    assert MediaSettings.from_settings(s).service_url("video-downloader") == "http://v:1"
    assert MediaSettings.from_settings(s) is MediaSettings.from_settings(s)  # read once


def test_a_row_as_read_back_has_its_json_as_json_gives_it_and_is_found_by_its_unique_key():
    """What a local successor is handed instead of a read (`Record.as_read`): its JSON values as
    the database would give them back, and a step row whose id was never read is updated by its
    unique (instance, name)."""
    from orchestrator.engine import RUNS
    from orchestrator.rows import Record

    run = Record({"instance_id": "i", "name": "s", "data": {"pair": (1, 2), 3: "x"}, "error": None}, new=True)
    assert run.as_read(RUNS) == {"id": None, "instance_id": "i", "name": "s", "data": {"pair": [1, 2], "3": "x"},
                                 "error": None}
    assert run.row_key(RUNS) == {"instance_id": "i", "name": "s"}
    assert Record({"id": 7, "instance_id": "i", "name": "s"}).row_key(RUNS) == {"id": 7}
