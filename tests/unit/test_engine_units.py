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
    policy = table["downloading"].policy(Settings(http_max_retries=3, retry_backoff_base_seconds=1.5))
    assert policy.attempts == 4 and policy.backoff == 1.5


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


def test_config_defaults_are_the_seeds():
    s = load_settings(environ={}, dotenv="/nonexistent")
    assert (s.port, s.workers, s.poll_interval, s.max_poll_attempts) == (8000, 4, 3.0, 600)
    assert (s.http_max_retries, s.retry_backoff_base_seconds) == (3, 1.5)
    assert (s.cache_ttl_hours, s.job_timeout_minutes) == (24.0, 60.0)
    assert s.video_downloader_url == "http://localhost:8001"
    assert (s.video_downloader_timeout, s.audio_normalization_timeout, s.audio_transcriber_timeout) == (300, 180, 600)
    assert s.default_language == "auto" and s.default_remove_noise and s.default_convert_mono
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
                                         ("FLOWER_BASIC_AUTH", "nopassword"), ("POLL_INTERVAL", "0"),
                                         ("DATABASE_PREPARED_STATEMENTS", "sometimes")])
def test_misconfiguration_names_the_variable(name, value):
    with pytest.raises(ConfigError) as err:
        load_settings(environ={name: value}, dotenv="/nonexistent")
    assert err.value.variable == name and name in str(err.value)


def test_dotenv_is_read_and_environment_wins(tmp_path):
    f = tmp_path / ".env"
    f.write_text("# comment\nPORT=9000\nexport POLL_INTERVAL=5 # seconds\nWORKERS='2'\n")
    s = load_settings(environ={"PORT": "9100"}, dotenv=f)
    assert (s.port, s.poll_interval, s.workers) == (9100, 5.0, 2)


def test_media_input_defaults_and_validation():
    s = Settings(default_language="pt", default_remove_noise=False)
    out = MediaPipeline.validate_input({"youtube_url": " https://youtu.be/x "}, s)
    assert out == {"youtube_url": "https://youtu.be/x", "language": "pt", "language_out": None,
                   "remove_noise": False, "convert_to_mono": True, "apply_highpass_filter": False,
                   "set_sample_rate_16k": True, "isolate_vocals": False}
    with pytest.raises(InvalidInput) as err:
        MediaPipeline.validate_input({"youtube_url": "https://youtu.be/x", "remove_noise": "no"}, s)
    assert err.value.field == "remove_noise"
    assert MediaPipeline.timeout(Settings(job_timeout_minutes=60)) == timedelta(minutes=60)
    assert MediaPipeline.reuse_within(Settings(cache_ttl_hours=0)) is None
