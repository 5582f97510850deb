"""The chat's settings (seed 003): message and configuration limits, timeouts, the callback
channel and stream and their consumers, and the Redis it uses.

Read from the same variables as the core settings (`ChatSettings.from_settings(settings)`);
`load_settings` checks them at start-up once this module is imported.
"""
from __future__ import annotations

from typing import Annotated

from pydantic import Field, field_validator

from orchestrator.config import AreaSettings, AtLeastOne, Count, env_names


class ChatSettings(AreaSettings):
    """Variables: CHAT_ + the field name in upper case (CHAT_MAX_MESSAGE_CHARS, ...), and REDIS_URL."""

    model_config = env_names("CHAT_")

    max_message_chars: AtLeastOne = 4000
    max_config_bytes: Annotated[int, Field(ge=2)] = 16384
    task_timeout_seconds: Annotated[float, Field(ge=0.1)] = 300.0
    heartbeat_seconds: Annotated[float, Field(ge=0.1)] = 15.0
    #: names the callback channel `callback:<id>` the execution service publishes to
    consumer_id: str = "orchestrator"
    callback_consumers: Count = 1
    #: a stream entry read by a consumer that has not acknowledged it this long is claimed by another
    callback_claim_idle_seconds: Annotated[float, Field(ge=0.1)] = 30.0
    #: deliveries of one stream entry that failed to store before it is dead-lettered
    callback_max_deliveries: AtLeastOne = 10
    #: the largest callback accepted (bytes of JSON); larger ones are rejected as `too_large`
    max_callback_bytes: Annotated[int, Field(ge=64)] = 1048576
    hot_ttl_seconds: AtLeastOne = 3600
    redis_url: str = Field("redis://127.0.0.1:6379/0", validation_alias="REDIS_URL")

    @field_validator("consumer_id")
    @classmethod
    def _consumer_id(cls, value: str) -> str:
        if len(value) > 64 or not all(c.isalnum() or c in "-_." for c in value):
            raise ValueError("expected up to 64 letters, digits, '-', '_' or '.'")
        return value

    @property
    def callback_channel(self) -> str:
        """The seed's pub/sub channel: kept for producers that publish there (nothing is kept
        for absent subscribers)."""
        return f"callback:{self.consumer_id}"

    @property
    def callback_stream(self) -> str:
        """The durable path: a Redis Stream read by the consumer group CALLBACK_GROUP."""
        return f"chat:callbacks:{self.consumer_id}"

    @property
    def callback_dead_letters(self) -> str:
        """Stream entries that failed to store CHAT_CALLBACK_MAX_DELIVERIES times."""
        return f"chat:callbacks:{self.consumer_id}:dead"


#: The consumer group of the API processes on the callback stream.
CALLBACK_GROUP = "orchestrator-api"
