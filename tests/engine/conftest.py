"""In-process engine tests: no broker, no server, SQLite in a temporary file (see inprocess.py)."""
from __future__ import annotations

from typing import Iterator

import pytest

from engine import workflows  # noqa: F401  (registers the workflows and their tasks)
from engine.inprocess import InProcess


@pytest.fixture
def inproc(tmp_path) -> Iterator[InProcess]:
    ip = InProcess(str(tmp_path / "engine.db"))
    try:
        yield ip
    finally:
        ip.db.dispose()
