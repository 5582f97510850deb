"""The whole saga through HTTP on the local git backend (the default with no GitLab configured)."""
from __future__ import annotations

import pytest
from balance_stack import local_stack, run_whole_saga  # noqa: F401

pytestmark = [pytest.mark.integration, pytest.mark.e2e]


def test_whole_saga_on_local_git_backend(local_stack):
    run_whole_saga(local_stack)
