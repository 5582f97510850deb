"""The balance saga against the GitLab emulator through python-gitlab: the whole saga, crashes,
duplicates, GitLab failures, bad input, cancel, restart of a failed calculation, and a stop of
every process."""
from __future__ import annotations

import json

import pytest
import requests
from balance_stack import (  # noqa: F401
    BRANCH, DEMO_BALANCE, TOKEN, USER_CONDENSER, file_json, git_repo, gitlab_stack, new_project,
    run_whole_saga, start, submit, wait_saga,
)
from conftest import drained, queued_messages, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.e2e]


@pytest.fixture
def faults(gitlab_stack):
    url = gitlab_stack.gitlab.url

    def set_plan(*plan):
        r = requests.post(f"{url}/_emulator/faults", json={"faults": list(plan)}, timeout=5)
        assert r.status_code == 200

    yield set_plan
    requests.delete(f"{url}/_emulator/faults", timeout=5)


def markers(stack, project, branch=BRANCH):
    return [line for c in git_repo(stack, project).log(branch, 100) for line in c["message"].splitlines()
            if line.startswith("Orchestrator-Step:")]


def test_whole_saga_through_python_gitlab(gitlab_stack):
    run_whole_saga(gitlab_stack)


def test_bad_input_is_a_4xx_naming_the_field(gitlab_stack):
    s = gitlab_stack
    project = new_project(s)
    r = s.http("POST", "/saga/calculate-balance", json={"project": project})
    assert r.status_code == 400 and r.json()["field"] == "branch"
    r = start(s, project, ["condenser", "boiler"])
    assert r.status_code == 400 and r.json()["field"] == "dependencies" and "boiler" in r.json()["message"]
    r = s.http("POST", "/saga/calculate-balance", json={"project": project, "branch": "x", "extra": 1})
    assert r.status_code == 400 and r.json()["field"] == "extra"
    # a value of the wrong type is named as such, not as missing
    r = s.http("POST", "/saga/calculate-balance", json={"project": project, "branch": 12345})
    assert r.status_code == 400 and r.json()["message"] == "branch: must be a string, got integer", r.text
    r = s.http("POST", "/saga/calculate-balance", json={"project": ["team", "p"], "branch": "x"})
    assert r.status_code == 400 and r.json()["message"] == "project: must be a string or an integer, got array"
    r = s.http("POST", "/saga/calculate-balance", data="{", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["field"] == "body"
    r = start(s, project, branch="bad..branch")
    assert r.status_code == 400 and r.json()["field"] == "branch"
    r = start(s, "team/does-not-exist")
    assert r.status_code == 404 and r.json()["field"] == "project"
    # a dependency missing from balance_input.json: 422 naming the key, nothing committed
    no_evaporator = new_project(s, balance={"condenser": {"a": 1}})
    r = start(s, no_evaporator, ["evaporator"])
    assert r.status_code == 422 and r.json()["field"] == "evaporator", r.text
    assert r.json()["status"] == "failed" and r.json()["saga_id"]
    assert git_repo(s, no_evaporator).head(BRANCH) is None


def test_input_for_a_saga_not_waiting_for_it_is_409(gitlab_stack):
    s = gitlab_stack
    project = new_project(s)
    saga = start(s, project, ["condenser", "evaporator"]).json()
    r = submit(s, saga["saga_id"], {"step": "EVAPORATOR", "use_hydrated": True})
    assert r.status_code == 409 and r.json()["state"] == "AWAIT_USER_CONDENSER_INPUT"
    for bad, field in (({"step": "CONDENSER"}, "content"), ({"use_hydrated": True}, "step"),
                       ({"step": "CONDENSER", "use_hydrated": "yes"}, "use_hydrated"),
                       ({"step": "CONDENSER", "content": {}, "use_hydrated": None}, "use_hydrated"),
                       ({"step": "COMPRESSOR", "use_hydrated": True}, "step"),
                       ({"step": "CONDENSER", "content": {}, "x": 1}, "x")):
        r = submit(s, saga["saga_id"], bad)
        assert r.status_code == 400 and r.json()["field"] == field, (bad, r.text)
    # a dependency that does not exist is named, not taken for a missing one
    r = submit(s, saga["saga_id"], {"step": "NOPE", "use_hydrated": True})
    assert r.json()["message"] == ("step: unknown dependency 'NOPE': the dependency the input is for, one of "
                                   "CONDENSER, EVAPORATOR"), r.text
    # the saga's own events are not signals: the generic endpoint refuses them and nothing moves
    before = s.http("GET", f"/sagas/{saga['saga_id']}").json()
    for event, body in (("input_saved", {}), ("calculated", {"commit": "0" * 40}), ("finished", {"result": {}}),
                        ("restart", {"step": "check_condenser"}), ("cancel", {})):
        r = s.http("POST", f"/sagas/{saga['saga_id']}/events/{event}", json=body)
        assert r.status_code == 400 and r.json()["field"] == "event", (event, r.text)
    assert s.http("GET", f"/sagas/{saga['saga_id']}").json() == before
    # cancel: stops cleanly; input afterwards is refused with the state
    r = s.http("POST", f"/sagas/{saga['saga_id']}/cancel")
    assert r.status_code == 200 and r.json()["state"] == "CANCELLED"
    r = submit(s, saga["saga_id"], {"step": "CONDENSER", "use_hydrated": True})
    assert r.status_code == 409 and r.json()["state"] == "CANCELLED"
    assert s.http("GET", f"/saga/calculate-balance/{saga['saga_id']}").json()["status"] == "cancelled"
    # a cancelled saga is not running: the same start makes a new one
    again = start(s, project, ["condenser", "evaporator"]).json()
    assert again["saga_id"] != saga["saga_id"] and again["status"] == "user_input_required"
    assert again["commit"] is None  # condenser_input.json is already on the branch
    assert s.http("POST", "/sagas/00000000-0000-0000-0000-000000000000/events/submit_input",
                  json={"step": "CONDENSER", "use_hydrated": True}).status_code == 404


def test_idempotent_start_with_header(gitlab_stack):
    s = gitlab_stack
    project = new_project(s)
    h = {"Idempotency-Key": f"k-{project}"}
    a = start(s, project, ["condenser"], headers=h).json()
    b = start(s, project, ["condenser"], headers=h).json()
    assert a == b
    assert len(markers(s, project)) == 1
    # the key is looked at before a branch's running saga: used for `a`, it is not answered with
    # the saga already running on another branch (one key, two sagas), but refused
    other = start(s, project, ["condenser"], branch="issue/43-other").json()
    r = start(s, project, ["condenser"], branch="issue/43-other", headers=h)
    assert r.status_code == 409 and r.json()["field"] == "Idempotency-Key", r.text
    assert r.json()["instance_id"] == a["saga_id"] != other["saga_id"]
    assert start(s, project, ["condenser"], headers=h).json()["saga_id"] == a["saga_id"]


def test_gitlab_401_404_and_5xx_then_success(gitlab_stack, faults):
    s = gitlab_stack
    project = new_project(s)
    faults({"path": f"projects/{project}", "status": 401, "message": "401 Unauthorized", "times": 1})
    r = start(s, project)
    assert r.status_code == 502 and r.json()["upstream_status"] == 401 and "GITLAB_TOKEN" in r.json()["message"]
    items = s.http("GET", "/sagas?type=calculate-balance&limit=500").json()["items"]
    assert all(i["context"]["input"]["project"] != project for i in items)  # no saga was created
    assert git_repo(s, project).head(BRANCH) is None  # and nothing written
    # 5xx twice on the hydration commit, then success: one commit, the saga goes on
    faults({"method": "POST", "path": "repository/commits", "status": 502, "times": 2})
    r = start(s, project, ["condenser"])
    assert r.status_code == 200, r.text
    assert r.json()["state"] == "AWAIT_USER_CONDENSER_INPUT" and r.json()["commit"]
    assert len(markers(s, project)) == 1
    snap = s.http("GET", f"/sagas/{r.json()['saga_id']}").json()
    check = next(x for x in snap["steps"] if x["name"] == "check_condenser")
    assert check["attempt"] == 3  # two retries after the 502s
    # merge requests: GitLab down -> 502 with the reason, nothing created
    faults({"method": "POST", "path": "merge_requests", "status": 503, "times": 1})
    r = s.http("POST", "/merge-requests", json={"project": project, "source_branch": BRANCH, "title": "Balance"})
    assert r.status_code == 502 and "503" in r.json()["message"]
    assert requests.get(f"{s.gitlab.url}/api/v4/projects/{project.replace('/', '%2F')}/merge_requests",
                        headers={"PRIVATE-TOKEN": TOKEN}, timeout=5).json() == []


def test_gitlab_timeouts(gitlab_stack, faults):
    s = gitlab_stack
    project = new_project(s)
    faults({"method": "GET", "path": "issues", "kind": "hang", "seconds": 4, "times": 1})
    r = s.http("GET", "/issues", headers={"X-User": "alice"})
    assert r.status_code == 502 and "timed out" in r.json()["message"]
    # a commit that times out after GitLab applied it: the retry finds it by its marker
    faults({"method": "POST", "path": "repository/commits", "kind": "hang_after", "seconds": 4, "times": 1})
    r = start(s, project, ["condenser"])
    body = r.json()
    if r.status_code == 202:  # still retrying when the answer was due
        wait_saga(s, body["saga_id"], "AWAIT_USER_CONDENSER_INPUT")
        body = s.http("GET", f"/saga/calculate-balance/{body['saga_id']}").json()
    assert body["state"] == "AWAIT_USER_CONDENSER_INPUT" and body["commit"]
    assert markers(s, project) == [f"Orchestrator-Step: {body['saga_id']}:check_condenser:0"]


def test_crash_between_commit_and_database_update(gitlab_stack, faults):
    """The worker dies after GitLab applied the hydration commit and before the saga recorded it."""
    s = gitlab_stack
    project = new_project(s)
    stats = lambda: requests.get(f"{s.gitlab.url}/_emulator/stats", timeout=5).json()  # noqa: E731
    faults({"method": "POST", "path": "repository/commits", "kind": "hang_after", "seconds": 2.0, "times": 1})
    before = stats()["commits"].get(project, 0)
    import threading

    answers = []
    t = threading.Thread(target=lambda: answers.append(start(s, project, ["condenser"])))
    t.start()
    wait_for(lambda: stats()["commits"].get(project, 0) > before, timeout=20, interval=0.02, what="the commit")
    s.kill("worker")  # inside the late answer: committed in GitLab, not in the database
    s.start("worker")
    t.join(60)
    saga_id = answers[0].json()["saga_id"]
    snap = wait_saga(s, saga_id, "AWAIT_USER_CONDENSER_INPUT")
    assert markers(s, project) == [f"Orchestrator-Step: {saga_id}:check_condenser:0"]
    commit = next(c["commit"] for c in snap["context"]["commits"] if c["state"] == "CHECK_CONDENSER")
    assert commit == git_repo(s, project).head(BRANCH)
    # and the saga continues
    assert submit(s, saga_id, {"step": "CONDENSER", "use_hydrated": True}).status_code == 200
    snap = wait_saga(s, saga_id, "COMPLETED", "FAILED")
    assert snap["state"] == "COMPLETED"


def _publish(stack, queue: str, body: dict, routing_key: str | None = None, exchange: str | None = None):
    from kombu import Connection, Exchange, Producer

    with Connection(stack.env["CELERY_BROKER_URL"]) as conn:
        Producer(conn).publish(json.dumps(body), exchange=Exchange(exchange or queue, type="direct" if not exchange else "topic", durable=True),
                               routing_key=routing_key or queue, serializer=None,
                               content_type="application/json", delivery_mode=2,
                               reply_to="orchestrator.calculation-results")


def test_duplicated_task_and_result_have_one_effect(gitlab_stack):
    s = gitlab_stack
    project = new_project(s)
    saga_id = start(s, project, ["condenser"]).json()["saga_id"]
    submit(s, saga_id, {"step": "CONDENSER", "use_hydrated": True})
    snap = wait_saga(s, saga_id, "COMPLETED", "FAILED")
    assert snap["state"] == "COMPLETED"
    calc = next(x for x in snap["steps"] if x["name"] == "condenser_calculation")
    cid, commit = calc["data"]["correlation_id"], calc["data"]["output"]["commit"]
    head, n_history = git_repo(s, project).head(BRANCH), len(snap["history"])
    # the same result again, and the same task again (the worker answers from its marker)
    _publish(s, "orchestrator.calculation-results",
             {"version": 1, "correlationId": cid, "status": "succeeded", "outputCommit": commit, "error": None})
    task = {"version": 1, "correlationId": cid, "repoUrl": f"{s.gitlab.url}/{project}.git", "branch": BRANCH,
            "commitHash": calc["data"]["commit"], "input_files": ["condenser_input.json"],
            "output_file": "condenser_output.json"}
    _publish(s, "orchestrator.calculations", task, routing_key="calculation.condenser",
             exchange="orchestrator.calculations")
    _publish(s, "orchestrator.calculation-results", {"correlationId": cid, "status": "bogus"})  # malformed
    # The calculator replies before it acknowledges the task, and the results consumer
    # acknowledges after its effect: both queues empty means all three were handled.
    wait_for(lambda: drained(s.env["CELERY_BROKER_URL"], "orchestrator.calculations",
                             "orchestrator.calculation-results"),
             timeout=60, interval=0.5, what="the duplicated task and results to be handled")
    after = s.http("GET", f"/sagas/{saga_id}").json()
    assert len(after["history"]) == n_history and after["state"] == "COMPLETED"
    assert git_repo(s, project).head(BRANCH) == head


def test_a_calculation_out_with_its_calculator_is_waiting_and_sent_again_when_its_lease_runs_out(gitlab_stack):
    """While its task is out, the calculation step is `waiting` (it showed `queued`, as if no
    worker had run it, and `step_status=waiting` did not find it); its lease still sends the
    task again when no result comes (STEP_LEASE_SECONDS is 20 in this stack)."""
    s = gitlab_stack
    s.stop("calculator")
    try:
        project = new_project(s)
        saga_id = start(s, project, ["condenser"]).json()["saga_id"]
        submit(s, saga_id, {"step": "CONDENSER", "use_hydrated": True})

        def calc() -> dict:
            steps = s.http("GET", f"/sagas/{saga_id}").json()["steps"]
            return next((x for x in steps if x["name"] == "condenser_calculation"), {})

        wait_for(lambda: calc().get("status") == "waiting", timeout=30, what="the calculation to wait for its result")
        out = calc()
        assert out["started_at"] is not None and out["data"]["correlation_id"], out
        listed = s.http("GET", "/sagas", params={"type": "calculate-balance", "step": "condenser_calculation",
                                                 "step_status": "waiting"}).json()["items"]
        assert saga_id in [i["id"] for i in listed], listed
        calculations = lambda: queued_messages(s.env["CELERY_BROKER_URL"]).get("orchestrator.calculations", 0)  # noqa: E731
        assert calculations() == 1
        wait_for(lambda: calculations() == 2, timeout=60, interval=1, what="the task sent again after the lease")
        wait_for(lambda: calc().get("status") == "waiting", timeout=30, what="the step to wait again")
        assert calc()["attempt"] == out["attempt"] and calc()["data"]["correlation_id"] == out["data"]["correlation_id"]
    finally:
        s.start("calculator")
    snap = wait_saga(s, saga_id, "COMPLETED", "FAILED")
    assert snap["state"] == "COMPLETED", snap["context"]
    cid = out["data"]["correlation_id"]  # both tasks, one output commit (the calculator's marker)
    log = [c["message"] for c in git_repo(s, project).log(BRANCH, 100)]
    assert sum(f"calculation:{cid}" in m for m in log) == 1, log


def test_failed_calculation_is_restarted(gitlab_stack):
    s = gitlab_stack
    project = new_project(s)
    saga_id = start(s, project, ["condenser"]).json()["saga_id"]
    submit(s, saga_id, {"step": "CONDENSER", "content": {"pressure_kpa": 1, "emulator_fail": "did not converge"}})
    snap = wait_saga(s, saga_id, "FAILED", "COMPLETED")
    status = s.http("GET", f"/saga/calculate-balance/{saga_id}").json()
    assert status["status"] == "failed" and status["failed_step"] == "condenser_calculation"
    assert "did not converge" in status["error"]
    # the user fixes the input on the branch, then restarts the calculation
    from balance_stack import facade
    from sagas.balance.repository import commit_once

    commit_once(facade(s), project, BRANCH, {"condenser_input.json": json.dumps({"pressure_kpa": 1})},
                "Fix the condenser input", "test:fix")
    r = s.http("POST", f"/sagas/{saga_id}/restart?step=condenser_calculation")
    assert r.status_code == 200, r.text
    snap = wait_saga(s, saga_id, "COMPLETED", "FAILED")
    assert snap["state"] == "COMPLETED", snap["context"]
    calc = next(x for x in snap["steps"] if x["name"] == "condenser_calculation")
    assert calc["restarts"] == 1
    assert file_json(s, project, "condenser_output.json")["value"] == 1.0


def test_frontend_endpoints(gitlab_stack):
    s = gitlab_stack
    project = new_project(s)
    requests.post(f"{s.gitlab.url}/_emulator/issues", json={"project": project, "title": "New calc",
                                                            "assignee": "alice"}, timeout=5)
    r = s.http("GET", "/issues", headers={"X-User": "alice"})
    assert r.status_code == 200 and any(i["title"] == "New calc" for i in r.json()["issues"])
    assert s.http("GET", "/issues").status_code == 401
    r = s.http("GET", f"/geometries?project={project}")
    assert r.status_code == 200 and r.json()["geometries"][0]["id"] == "g1"
    assert s.http("GET", "/geometries").json()["field"] == "project"
    # a branch that does not exist is named as the fault, not the manifest
    r = s.http("GET", f"/geometries?project={project}&ref=no-such-branch")
    assert r.status_code == 404 and r.json()["field"] == "ref", r.text
    bad = new_project(s, manifest={"geometries": [{"id": "g1", "name": "x"}]})
    r = s.http("GET", f"/geometries?project={bad}")
    assert r.status_code == 422 and r.json()["field"] == "geometries_manifest.json:geometries[0].file"
    broken = new_project(s, manifest="{not json")
    r = s.http("GET", f"/geometries?project={broken}")
    assert r.status_code == 422 and r.json()["field"] == "geometries_manifest.json"
    # merge request: twice -> one
    start(s, project, ["condenser"])
    body = {"project": project, "source_branch": BRANCH, "title": "Balance for issue 42"}
    a = s.http("POST", "/merge-requests", json=body)
    b = s.http("POST", "/merge-requests", json=body)
    assert a.status_code == 201 and b.status_code == 200 and a.json()["iid"] == b.json()["iid"]
    assert s.http("POST", "/merge-requests", json={**body, "title": ""}).json()["field"] == "title"
    r = s.http("POST", "/merge-requests", json={**body, "source_branch": "no-such-branch"})
    assert r.status_code == 422 and r.json()["field"] == "source_branch"


def test_simple_calculation(gitlab_stack):
    s = gitlab_stack
    project = new_project(s)
    body = {"project": project, "branch": "calc/1", "files": {"pump_input.json": {"head_m": 30, "flow": 2}},
            "output_file": "pump_output.json", "calculation": "pump"}
    r = s.http("POST", "/calculations", json=body, headers={"Idempotency-Key": f"calc-{project}"})
    assert r.status_code == 201, r.text
    cid = r.json()["correlationId"]
    assert r.json()["input_commit"]
    again = s.http("POST", "/calculations", json=body, headers={"Idempotency-Key": f"calc-{project}"})
    assert again.status_code == 200 and again.json()["correlationId"] == cid
    done = wait_for(lambda: (lambda b: b if b["status"] != "running" else None)(
        s.http("GET", f"/calculations/{cid}").json()), timeout=30, what="the calculation")
    assert done["status"] == "completed" and done["output_commit"]
    assert done["task"]["correlation_id"] == cid
    assert file_json(s, project, "pump_output.json", "calc/1")["value"] == 32.0
    assert s.http("GET", "/calculations/nope").status_code == 404
    assert s.http("POST", "/calculations", json={**body, "output_file": None}).json()["field"] == "output_file"


def test_stop_every_process_and_restart_continues(gitlab_stack):
    s = gitlab_stack
    project = new_project(s)
    saga_id = start(s, project, ["condenser", "evaporator"]).json()["saga_id"]
    assert submit(s, saga_id, {"step": "CONDENSER", "use_hydrated": True}).status_code == 200
    s.stop()  # everything, in the middle of the condenser calculation
    s.start()
    snap = wait_saga(s, saga_id, "AWAIT_USER_EVAPORATOR_INPUT", "FAILED")
    assert snap["state"] == "AWAIT_USER_EVAPORATOR_INPUT"
    s.stop()
    s.start()
    assert submit(s, saga_id, {"step": "EVAPORATOR", "use_hydrated": True}).status_code == 200
    snap = wait_saga(s, saga_id, "COMPLETED", "FAILED")
    assert snap["state"] == "COMPLETED"
    assert len(markers(s, project)) == 7  # 2 hydrations, 2 merges, 3 outputs: nothing twice
