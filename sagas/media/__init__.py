"""Media pipeline (seed 004): download -> normalization -> transcription.

Each stage is one step task that submits to its microservice, then polls it through timer rows
(POLL_INTERVAL apart, at most MAX_POLL_ATTEMPTS), then reports its outcome.
"""
from __future__ import annotations

from datetime import timedelta
from typing import Annotated, Any

from pydantic import AfterValidator, WithJsonSchema
from statemachine import State

from orchestrator.config import Settings
from orchestrator.schemas import (LANGUAGE_PATTERN, MAX_LANGUAGE_LENGTH, MAX_URL_LENGTH, Closed, check_language,
                                  check_url, omittable, parse)
from orchestrator.workflow import Retry, Step, Workflow, register

from .settings import MediaSettings

STAGES = ("download", "normalization", "transcription")

#: The stages' Celery task names, written once: tasks/media.py registers its tasks under them.
DOWNLOAD_TASK, NORMALIZE_TASK, TRANSCRIBE_TASK = "media.download", "media.normalize", "media.transcribe"

_BOOL_FIELDS = ("remove_noise", "convert_to_mono", "apply_highpass_filter", "set_sample_rate_16k",
                "isolate_vocals")


def _http_url(value: str) -> str:
    return check_url(value, ("http", "https"))


def _language(value: str | None) -> str | None:
    # the transcriber takes a code; anything else failed there, after the download
    return None if value is None else check_language(value)


_LANGUAGE_SCHEMA = {"pattern": f"^({LANGUAGE_PATTERN})$", "minLength": 2, "maxLength": MAX_LANGUAGE_LENGTH}
Language = Annotated[str, AfterValidator(_language), WithJsonSchema({"type": "string", **_LANGUAGE_SCHEMA})]
#: `language_out` may be null: seed 004's request sends it so.
NullableLanguage = Annotated[str | None, AfterValidator(_language),
                             WithJsonSchema({"type": ["string", "null"], **_LANGUAGE_SCHEMA})]


class PipelineRequest(Closed):
    """POST /pipeline (seed 004). Unknown fields are refused. An absent option takes its
    configured default (DEFAULT_LANGUAGE, DEFAULT_REMOVE_NOISE, ...); `null` is refused naming
    the field (booleans are JSON booleans), except for `language_out`, which the seed sends null."""

    youtube_url: Annotated[str, AfterValidator(_http_url),
                           WithJsonSchema({"type": "string", "format": "uri", "maxLength": MAX_URL_LENGTH})]
    language: Language = omittable(description="a language code such as auto, en or pt-BR")
    language_out: NullableLanguage = None
    remove_noise: bool = omittable()
    convert_to_mono: bool = omittable()
    apply_highpass_filter: bool = omittable()
    set_sample_rate_16k: bool = omittable()
    isolate_vocals: bool = omittable()


def _http_retry(settings: Settings) -> Retry:
    media = MediaSettings.from_settings(settings)
    return Retry(attempts=media.http_max_retries + 1, backoff=media.retry_backoff_base_seconds,
                 factor=2.0, jitter=0.1)


@register
class MediaPipeline(Workflow):
    type = "media"
    start_event = "start"
    success_states = frozenset({"completed"})
    failure_states = frozenset({"failed"})
    # No user signals: stages report their own outcome; restart and cancel have their endpoints.
    signals: dict[str, Any] = {}

    queued = State(initial=True)
    downloading = State()
    normalizing = State()
    transcribing = State()
    completed = State(final=True)
    failed = State()
    cancelled = State(final=True)

    start = queued.to(downloading)
    downloaded = downloading.to(normalizing)
    normalized = normalizing.to(transcribing)
    transcribed = transcribing.to(completed)
    fail = queued.to(failed) | downloading.to(failed) | normalizing.to(failed) | transcribing.to(failed)
    restart = failed.to(downloading, normalizing, transcribing, cond="is_restart_target")
    cancel = (queued.to(cancelled) | downloading.to(cancelled) | normalizing.to(cancelled)
              | transcribing.to(cancelled) | failed.to(cancelled))

    steps = {
        downloading: Step(DOWNLOAD_TASK, name="download", retry=_http_retry),
        normalizing: Step(NORMALIZE_TASK, name="normalization", retry=_http_retry),
        transcribing: Step(TRANSCRIBE_TASK, name="transcription", retry=_http_retry),
    }

    def on_enter_failed(self, payload: dict[str, Any] | None = None) -> None:
        self.context["error"] = (payload or {}).get("error")

    def on_exit_failed(self) -> None:
        self.context.pop("error", None)

    @classmethod
    def validate_input(cls, data: Any, settings: Settings) -> dict[str, Any]:
        req = parse(PipelineRequest, data)
        media = MediaSettings.from_settings(settings)
        out: dict[str, Any] = {"youtube_url": req.youtube_url,
                               "language": req.language or media.default_language,
                               "language_out": req.language_out}
        defaults = {"remove_noise": media.default_remove_noise,
                    "convert_to_mono": media.default_convert_mono,
                    "apply_highpass_filter": False,
                    "set_sample_rate_16k": media.default_sample_rate_16k,
                    "isolate_vocals": False}
        for name in _BOOL_FIELDS:
            value = getattr(req, name)
            out[name] = defaults[name] if value is None else value
        return out

    @classmethod
    def timeout(cls, settings: Settings) -> timedelta | None:
        minutes = MediaSettings.from_settings(settings).job_timeout_minutes
        return timedelta(minutes=minutes) if minutes > 0 else None

    @classmethod
    def reuse_within(cls, settings: Settings) -> timedelta | None:
        hours = MediaSettings.from_settings(settings).cache_ttl_hours
        return timedelta(hours=hours) if hours > 0 else None
