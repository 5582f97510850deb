"""Media pipeline (seed 004): download -> normalization -> transcription.

Each stage is one step task that submits to its microservice, then polls it through timer rows
(POLL_INTERVAL apart, at most MAX_POLL_ATTEMPTS), then reports its outcome.
"""
from __future__ import annotations

from datetime import timedelta
from typing import Any
from urllib.parse import urlparse

from statemachine import State

from orchestrator.config import Settings
from orchestrator.errors import InvalidInput
from orchestrator.workflow import Retry, Step, Workflow, register

from .settings import MediaSettings

STAGES = ("download", "normalization", "transcription")

_BOOL_FIELDS = ("remove_noise", "convert_to_mono", "apply_highpass_filter", "set_sample_rate_16k",
                "isolate_vocals")
FIELDS = ("youtube_url", "language", "language_out", *_BOOL_FIELDS)


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
        downloading: Step("media.download", name="download", retry=_http_retry),
        normalizing: Step("media.normalize", name="normalization", retry=_http_retry),
        transcribing: Step("media.transcribe", name="transcription", retry=_http_retry),
    }

    def on_enter_failed(self, payload: dict[str, Any] | None = None) -> None:
        self.context["error"] = (payload or {}).get("error")

    def on_exit_failed(self) -> None:
        self.context.pop("error", None)

    @classmethod
    def validate_input(cls, data: Any, settings: Settings) -> dict[str, Any]:
        if not isinstance(data, dict):
            raise InvalidInput("body", "must be a JSON object")
        unknown = sorted(set(data) - set(FIELDS))
        if unknown:
            raise InvalidInput(unknown[0], f"unknown field; accepted fields: {', '.join(FIELDS)}")
        url = data.get("youtube_url")
        if url is None:
            raise InvalidInput("youtube_url", "is required")
        if not isinstance(url, str):
            raise InvalidInput("youtube_url", "must be a string")
        parsed = urlparse(url.strip())
        if parsed.scheme not in ("http", "https") or not parsed.netloc or len(url) > 2048:
            raise InvalidInput("youtube_url", "must be an http(s) URL")
        out: dict[str, Any] = {"youtube_url": url.strip()}
        media = MediaSettings.from_settings(settings)
        for name, default in (("language", media.default_language), ("language_out", None)):
            value = data.get(name, default)
            if value is None and name == "language":
                value = media.default_language
            if value is not None and (not isinstance(value, str) or not value.strip() or len(value) > 16):
                raise InvalidInput(name, "must be a language code such as 'auto', 'pt' or 'en'")
            out[name] = value
        defaults = {"remove_noise": media.default_remove_noise,
                    "convert_to_mono": media.default_convert_mono,
                    "apply_highpass_filter": False,
                    "set_sample_rate_16k": media.default_sample_rate_16k,
                    "isolate_vocals": False}
        for name in _BOOL_FIELDS:
            value = data.get(name, defaults[name])
            if value is None:
                value = defaults[name]
            if not isinstance(value, bool):
                raise InvalidInput(name, "must be true or false")
            out[name] = value
        return out

    @classmethod
    def timeout(cls, settings: Settings) -> timedelta | None:
        minutes = MediaSettings.from_settings(settings).job_timeout_minutes
        return timedelta(minutes=minutes) if minutes > 0 else None

    @classmethod
    def reuse_within(cls, settings: Settings) -> timedelta | None:
        hours = MediaSettings.from_settings(settings).cache_ttl_hours
        return timedelta(hours=hours) if hours > 0 else None
