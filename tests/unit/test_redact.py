"""Secrets masked at the source (URLs) and in every log line (RedactFilter), and the list of
secrets a process's settings hold."""
from __future__ import annotations

import io
import logging

import pytest

from orchestrator import logs
from orchestrator.config import load_settings


@pytest.mark.parametrize("url, shown", [
    ("postgresql+psycopg2://app:s3cr%40t@db:5432/app", "postgresql+psycopg2://app:***@db:5432/app"),
    ("amqp://guest:guest@127.0.0.1:5672//", "amqp://guest:***@127.0.0.1:5672//"),
    ("redis://:pw@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),
    ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
    ("sqlite:///data/orchestrator.db", "sqlite:///data/orchestrator.db"),
    ("connect to amqp://u:p@h// failed; then redis://:x@r/1", "connect to amqp://u:***@h// failed; then redis://:***@r/1"),
])
def test_a_url_is_shown_with_its_password_masked(url, shown):
    assert logs.mask_url(url) == shown


def test_settings_list_every_secret_they_hold():
    s = load_settings(environ={
        "DATABASE_URL": "postgresql://app:db-pass-123@db/app", "CELERY_BROKER_URL": "amqp://u:mq-pass-456@mq//",
        "REDIS_URL": "redis://:rd-pass-789@r/0", "ADMIN_TOKEN": "admin-token-1", "GITLAB_TOKEN": "gitlab-token-2",
        "CONSOLE_BASIC_AUTH": "op:console-pass", "FLOWER_BASIC_AUTH": "fl:flower-pass", "LOG_LEVEL": "INFO"},
        dotenv="/nonexistent")
    assert set(s.secrets()) >= {"db-pass-123", "mq-pass-456", "rd-pass-789", "admin-token-1", "gitlab-token-2",
                                "console-pass", "flower-pass"}
    assert "INFO" not in s.secrets() and "op" not in s.secrets()
    several = load_settings(environ={"FLOWER_BASIC_AUTH": "a:first-pass,b:second-pass"}, dotenv="/nonexistent")
    assert {"first-pass", "second-pass"} <= set(several.secrets())  # each login's password alone


def test_every_log_line_has_the_secrets_masked():
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.addFilter(logs.RedactFilter())
    handler.setFormatter(logs.JsonFormatter())
    log = logging.getLogger("test.redact")
    log.addHandler(handler)
    log.propagate = False
    logs.set_secrets(["token-abcdef-123", "short"])
    try:
        log.warning("calling with %s at %s", "token-abcdef-123", "amqp://u:short@h//")
        try:
            raise RuntimeError("failed with token-abcdef-123")
        except RuntimeError:
            log.exception("boom")
        log.warning("a short secret is left in free text: short")
    finally:
        logs.set_secrets([])
        log.removeHandler(handler)
    text = out.getvalue()
    assert "token-abcdef-123" not in text and "u:short@" not in text, text
    assert text.count("***") >= 3 and "free text: short" in text
