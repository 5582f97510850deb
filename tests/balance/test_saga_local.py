"""The whole saga through HTTP on the local git backend (the default with no GitLab configured)."""
from __future__ import annotations

from balance_stack import git_repo, local_stack, new_project, wait_saga  # noqa: F401

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.e2e]


def test_smoke(local_stack):
    project = new_project(local_stack)
    r = local_stack.http("POST", "/saga/calculate-balance",
                         json={"project": project, "branch": "issue/42-new-calculation",
                               "dependencies": ["condenser", "evaporator"]})
    print(r.status_code, r.json())
    assert r.status_code == 200
