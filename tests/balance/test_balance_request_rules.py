"""What the balance endpoints refuse or answer, as a client meets it over HTTP against the GitLab
emulator: an input file that is not a JSON object, a simple calculation on the default branch or
with an over-long type, the task the calculation answer shows, an over-long X-User on /issues,
and branch names holding invisible Unicode characters."""
from __future__ import annotations

import pytest
from balance_stack import (BRANCH, USER_CONDENSER, assert_branch_refused, calculation, git_repo,  # noqa: F401
                           gitlab_stack, new_project, start, submit)
from conftest import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.e2e]


def count(s, type_name: str) -> int:
    return s.http("GET", "/sagas", params={"type": type_name, "limit": 1}).json()["total"]


def test_submitted_input_that_is_not_a_json_object_is_a_400_naming_content(gitlab_stack):
    """A string, number or array was committed as condenser_input.json, "calculated" to 0.0 and
    merged into balance_input.json; only null was refused."""
    s = gitlab_stack
    project = new_project(s)
    r = start(s, project, ["condenser"])
    assert r.status_code == 200 and r.json()["status"] == "user_input_required", r.text
    saga_id, hydration = r.json()["saga_id"], r.json()["commit"]
    for content in ("hello", 42, 1.5, [1], [], True, None):
        r = submit(s, saga_id, {"step": "CONDENSER", "content": content})
        assert r.status_code == 400, (content, r.status_code, r.text)
        assert r.json()["field"] == "content" and "must be an object" in r.json()["message"], (content, r.text)
    assert git_repo(s, project).head(BRANCH) == hydration  # nothing was committed
    assert s.http("GET", f"/saga/calculate-balance/{saga_id}").json()["state"] == "AWAIT_USER_CONDENSER_INPUT"
    r = submit(s, saga_id, {"step": "CONDENSER", "content": USER_CONDENSER})
    assert r.status_code == 200 and r.json()["state"] != "AWAIT_USER_CONDENSER_INPUT", r.text


def test_a_calculation_on_the_default_branch_is_a_400_naming_branch(gitlab_stack):
    """Its input commit landed on main, and every issue branch made afterwards carried it; the
    balance saga already refused the default branch."""
    s = gitlab_stack
    project = new_project(s)
    head = git_repo(s, project).head("main")
    before = count(s, "simple-calculation")
    r = s.http("POST", "/calculations", json=calculation(project, branch="main"))
    assert r.status_code == 400 and r.json()["field"] == "branch", r.text
    assert "default branch" in r.json()["message"], r.text
    assert git_repo(s, project).head("main") == head
    assert count(s, "simple-calculation") == before


def test_a_calculation_type_over_64_characters_is_a_400_naming_calculation(gitlab_stack):
    s = gitlab_stack
    project = new_project(s)
    before = count(s, "simple-calculation")
    for calc in ("p" * 65, "p" * 1000):
        r = s.http("POST", "/calculations", json=calculation(project, calculation=calc))
        assert r.status_code == 400 and r.json()["field"] == "calculation", r.text
        assert "at most 64" in r.json()["message"], r.text
    assert count(s, "simple-calculation") == before
    assert git_repo(s, project).head("calc/rules") is None
    r = s.http("POST", "/calculations", json=calculation(project, calculation="p" * 64))
    assert r.status_code == 201, r.text


def test_the_calculation_answer_shows_the_task_it_sends(gitlab_stack):
    """The POST answer had a task of nulls although every value was known: the correlationId, the
    input commit just written, the files and the output file."""
    s = gitlab_stack
    project = new_project(s)
    body = calculation(project, files={"b.json": {"x": 1}, "a/in.json": {"y": 2}})
    r = s.http("POST", "/calculations", json=body)
    assert r.status_code == 201, r.text
    answer = r.json()
    cid, commit = answer["correlationId"], answer["input_commit"]
    assert commit and git_repo(s, project).head("calc/rules") == commit
    task = {"correlation_id": cid, "commit": commit, "input_files": ["a/in.json", "b.json"],
            "output_file": "pump_output.json"}
    assert answer["task"] == task, answer
    done = wait_for(lambda: (lambda b: b if b["status"] != "running" else None)(
        s.http("GET", f"/calculations/{cid}").json()), timeout=30, what="the calculation")
    assert done["status"] == "completed" and done["task"] == task, done


def test_issues_with_an_x_user_over_128_characters_is_a_400_naming_x_user(gitlab_stack):
    s = gitlab_stack
    r = s.http("GET", "/issues", headers={"X-User": "u" * 129})
    assert r.status_code == 400 and r.json()["field"] == "X-User", r.text
    assert "at most 128" in r.json()["message"], r.text
    r = s.http("GET", "/issues", headers={"X-User": "u" * 128})
    assert r.status_code == 200 and r.json()["issues"] == [], r.text


#: Names git accepts that display as another name or break a line: a right-to-left override
#: (`issue/\u202e24` shows as `issue/42`), other format characters (Cf), a C1 control (Cc), line
#: and paragraph separators (Zl, Zp).
INVISIBLE = ["issue/\u202e24", "issue/\u202d42", "issue/4\u200b2", "issue/\ufeff42", "issue/\u2066x\u2069",
             "issue/\u061c42", "issue/\u008542", "issue/\u009b42", "issue/4\u20282", "issue/4\u20292"]


@pytest.mark.parametrize("bad", INVISIBLE)
def test_branch_names_with_control_or_format_characters_are_a_400_naming_the_field(gitlab_stack, bad):
    s = gitlab_stack
    project = new_project(s)
    sagas = count(s, "calculate-balance")
    r = assert_branch_refused(s, project, bad)
    assert f"U+{ord(next(c for c in bad[6:] if not c.isalnum() or not c.isascii())):04X}" in r.json()["message"]
    assert count(s, "calculate-balance") == sagas
