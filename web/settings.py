"""The HTTP API's own limits, read from the same variables as the core settings.

`load_settings` checks them at start-up once `web` is imported (the API process does)."""
from __future__ import annotations

from typing import Annotated

from pydantic import Field

from orchestrator.config import AreaSettings, PositiveSeconds, env_names


class HttpSettings(AreaSettings):
    """Variables: API_ + the field name in upper case (API_MAX_BODY_BYTES)."""

    model_config = env_names("API_")

    #: the largest request body in bytes; a larger one is answered 413 naming the limit
    max_body_bytes: Annotated[int, Field(ge=1024)] = 1024 * 1024
    #: how long the API waits for the next bytes of a request (its request line, headers or body)
    #: before it answers 408 and closes the connection: a client that stalls must not hold a thread
    #: (until then it does: 70 stalled bodies kept the API from answering for 30 s, the old default)
    read_timeout_seconds: PositiveSeconds = 10.0
