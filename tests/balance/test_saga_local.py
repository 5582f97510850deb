"""The whole saga through HTTP on the local git backend (the default with no GitLab configured)."""
from __future__ import annotations

import pytest
from balance_stack import local_stack, run_whole_saga  # noqa: F401

pytestmark = [pytest.mark.integration, pytest.mark.e2e]


def test_whole_saga_on_local_git_backend(local_stack):
    run_whole_saga(local_stack)


def test_concurrent_starts_make_one_saga_and_one_commit(local_stack):
    from concurrent.futures import ThreadPoolExecutor

    from balance_stack import BRANCH, git_repo, new_project, start

    project = new_project(local_stack)
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: start(local_stack, project, ["condenser"]), range(4)))
    assert {a.status_code for a in answers} == {200}
    assert len({a.json()["saga_id"] for a in answers}) == 1
    commits = [c for c in git_repo(local_stack, project).log(BRANCH, 20) if "Orchestrator-Step:" in c["message"]]
    assert len(commits) == 1
