"""Canonical JSON and digests (history payload digests, request fingerprints)."""
from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from typing import Any


def canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def digest(value: Any) -> str:
    return hashlib.sha256(canonical(value).encode()).hexdigest()


def iso(value: datetime | None) -> str | None:
    """ISO 8601 in UTC without offset, as the seeds' clients expect ("2025-10-29T10:00:00")."""
    if value is None:
        return None
    return value.astimezone(timezone.utc).replace(tzinfo=None).isoformat(timespec="seconds")
