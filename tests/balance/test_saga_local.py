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


def test_starts_record_the_gateways_x_user_and_refuse_one_over_128_characters(local_stack):
    """POST /saga/calculate-balance and POST /calculations record the gateway's X-User as the
    actor of the start, as the saga's input does; 129 characters is a 400 naming X-User, and
    nothing is started or committed."""
    from balance_stack import new_project, start

    s = local_stack
    project = new_project(s)
    calc = {"project": project, "branch": "calc/actor", "files": {"inputs/pump_input.json": {"head_m": 3}},
            "output_file": "pump_output.json", "calculation": "pump"}

    def count(type_name: str) -> int:
        return s.http("GET", "/sagas", params={"type": type_name, "limit": 1}).json()["total"]

    for type_name, send in (("calculate-balance", lambda h: start(s, project, ["condenser"], headers=h)),
                            ("simple-calculation", lambda h: s.http("POST", "/calculations", json=calc, headers=h))):
        before = count(type_name)
        r = send({"X-User": "u" * 129})
        assert r.status_code == 400 and r.json()["field"] == "X-User", (type_name, r.status_code, r.text)
        assert count(type_name) == before, type_name
        r = send({"X-User": "alice"})
        assert r.status_code in (200, 201), (type_name, r.text)
        saga_id = r.json().get("saga_id") or r.json()["correlationId"]
        history = s.http("GET", f"/sagas/{saga_id}").json()["history"]
        assert history[0]["actor"] == "alice", (type_name, history)
