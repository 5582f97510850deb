"""The route content workflow's settings (seed 000): how long its waits on the story and TTS
services may take.

Read from the same variables as the core settings (`RouteSettings.from_settings(settings)`);
`load_settings` checks them at start-up once this module is imported.
"""
from __future__ import annotations

from typing import Annotated

from pydantic import Field

from orchestrator.config import AreaSettings, env_names


class RouteSettings(AreaSettings):
    """Variables: ROUTE_ + the field name in upper case (ROUTE_TTS_TIMEOUT_SECONDS)."""

    model_config = env_names("ROUTE_")

    #: how long one attempt of the tts_batch step waits for its tts.completed replies; then the
    #: attempt fails as timed out (the route goes to tts_failed) and can be restarted
    tts_timeout_seconds: Annotated[float, Field(ge=0.1)] = 600.0
    #: how long one attempt of the story_generate step waits for its story.generate.completed;
    #: then the attempt fails as timed out (the route goes to story_failed) and can be restarted
    story_timeout_seconds: Annotated[float, Field(ge=0.1)] = 600.0
    #: how long an attempt of tts_batch or story_generate must have waited before
    #: POST /workflows/<route_id>/restart abandons it (its replies taken for lost); a restart of
    #: a younger attempt is a 409, so restarts sent together restart once
    restart_running_after_seconds: Annotated[float, Field(ge=0)] = 30.0
