"""The chat's settings (seed 003): message and configuration limits, timeouts, the callback
channel and its consumers, and the Redis it uses.

Read from the same variables as the core settings (`ChatSettings.from_settings(settings)`);
`load_settings` checks them at start-up once this module is imported.
"""
from __future__ import annotations

from typing import Annotated

from pydantic import Field, field_validator

from orchestrator.config import AreaSettings, env_names


class ChatSettings(AreaSettings):
    """Variables: CHAT_ + the field name in upper case (CHAT_MAX_MESSAGE_CHARS, ...), and REDIS_URL."""

    model_config = env_names("CHAT_")

    max_message_chars: Annotated[int, Field(ge=1)] = 4000
    max_config_bytes: Annotated[int, Field(ge=2)] = 16384
    task_timeout_seconds: Annotated[float, Field(ge=0.1)] = 300.0
    heartbeat_seconds: Annotated[float, Field(ge=0.1)] = 15.0
    #: names the callback channel `callback:<id>` the execution service publishes to
    consumer_id: str = "orchestrator"
    callback_consumers: Annotated[int, Field(ge=0)] = 1
    hot_ttl_seconds: Annotated[int, Field(ge=1)] = 3600
    redis_url: str = Field("redis://127.0.0.1:6379/0", validation_alias="REDIS_URL")

    @field_validator("consumer_id")
    @classmethod
    def _consumer_id(cls, value: str) -> str:
        if len(value) > 64 or not all(c.isalnum() or c in "-_." for c in value):
            raise ValueError("expected up to 64 letters, digits, '-', '_' or '.'")
        return value

    @property
    def callback_channel(self) -> str:
        return f"callback:{self.consumer_id}"
