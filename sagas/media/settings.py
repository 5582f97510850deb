"""The media pipeline's settings (seed 004): its services, polling, retries, cache and defaults.

Read from the same variables as the core settings (`MediaSettings.from_settings(settings)`);
`load_settings` checks them at start-up once this module is imported.
"""
from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator

from orchestrator.config import AreaSettings, AtLeastOne, Count, HttpUrl, PositiveSeconds, Seconds
from orchestrator.schemas import check_language


class MediaSettings(AreaSettings):
    """Variables: the field names in upper case (VIDEO_DOWNLOADER_URL, POLL_INTERVAL, ...)."""

    # Polling and retry (seed 004)
    poll_interval: PositiveSeconds = 3.0
    max_poll_attempts: AtLeastOne = 600
    http_max_retries: Count = 3
    retry_backoff_base_seconds: Seconds = 1.5
    # Cache and job lifetime (seed 004); 0 turns each off
    cache_ttl_hours: Seconds = 24.0
    job_timeout_minutes: Seconds = 60.0
    # The media microservices (seed 004)
    video_downloader_url: HttpUrl = "http://localhost:8001"
    audio_normalization_url: HttpUrl = "http://localhost:8002"
    audio_transcriber_url: HttpUrl = "http://localhost:8003"
    # a request timeout of 0 fails every request before it is sent
    video_downloader_timeout: PositiveSeconds = 300.0
    audio_normalization_timeout: PositiveSeconds = 180.0
    audio_transcriber_timeout: PositiveSeconds = 600.0
    # Defaults of a pipeline request's options
    # checked like a request's `language`: the default goes to the transcriber the same way
    default_language: Annotated[str, AfterValidator(check_language)] = "auto"
    default_remove_noise: bool = True
    default_convert_mono: bool = True
    default_sample_rate_16k: bool = True

    def service_timeout(self, service: str) -> float:
        """Seconds one request to `service` ("video-downloader", ...) may take."""
        return {
            "video-downloader": self.video_downloader_timeout,
            "audio-normalization": self.audio_normalization_timeout,
            "audio-transcriber": self.audio_transcriber_timeout,
        }[service]

    def service_url(self, service: str) -> str:
        """The base URL of `service`, without a trailing slash."""
        return {
            "video-downloader": self.video_downloader_url,
            "audio-normalization": self.audio_normalization_url,
            "audio-transcriber": self.audio_transcriber_url,
        }[service].rstrip("/")
