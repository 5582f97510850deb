"""The balance saga's machine, answers, contracts and the local git backend, without services."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from emulators.calculator import compute, failure_reason
from sagas.balance.calculations import correlation_id, parse_result, task_message
from orchestrator.errors import InvalidInput, NotFound
from sagas.balance.repository import (
    FileContent, FileMissing, GitRepo, LocalRepository, check_branch_name, commit_once, read_at_branch,
    validate_manifest,
)
from sagas.balance import CATALOG, BalanceSaga
from statemachine.exceptions import TransitionNotAllowed


def machine(chain):
    model = SimpleNamespace(id="s1", state=None, context={"input": {"project": "p", "branch": "b",
                                                                    "dependencies": chain}})
    return model, BalanceSaga(model=model)


def test_machine_follows_the_requested_chain():
    model, m = machine(["evaporator", "condenser"])
    seen = []
    for event, payload in [("start", {}), ("checked", {"commit": "h1"}),
                           ("submit_input", {"step": "EVAPORATOR", "use_hydrated": True}), ("input_saved", {}),
                           ("calculated", {"commit": "o1"}), ("synced", {"commit": "m1"}),
                           ("checked", {"commit": None}), ("submit_input", {"step": "condenser", "content": {"a": 1}}),
                           ("input_saved", {"commit": "u2"}), ("calculated", {"commit": "o2"}),
                           ("synced", {"commit": "m2"}), ("calculated", {"commit": "o3"}),
                           ("finished", {"result": {"value": 1}})]:
        m.send(event, payload=payload)
        seen.append(model.state)
    assert seen == ["CHECK_EVAPORATOR", "AWAIT_USER_EVAPORATOR_INPUT", "SAVE_EVAPORATOR_INPUT",
                    "EVAPORATOR_CALCULATION", "SYNC_EVAPORATOR_RESULT", "CHECK_CONDENSER",
                    "AWAIT_USER_CONDENSER_INPUT", "SAVE_CONDENSER_INPUT", "CONDENSER_CALCULATION",
                    "SYNC_CONDENSER_RESULT", "BALANCE_CALCULATION", "SYNC_BALANCE_RESULT", "COMPLETED"]
    ctx = model.context
    assert [c["commit"] for c in ctx["commits"]] == ["h1", "o1", "m1", "u2", "o2", "m2", "o3"]
    assert ctx["submissions"] == {"evaporator": {"use_hydrated": True}, "condenser": {"content": {"a": 1}}}
    assert ctx["result"] == {"value": 1}


def test_input_for_another_dependency_is_refused_by_the_machine():
    model, m = machine(["condenser"])
    m.send("start", payload={})
    m.send("checked", payload={})
    with pytest.raises(TransitionNotAllowed):
        m.send("submit_input", payload={"step": "EVAPORATOR"})
    assert model.state == "AWAIT_USER_CONDENSER_INPUT"


def test_restart_goes_back_to_the_failed_step():
    model, m = machine(["condenser"])
    for event in ("start", "checked"):
        m.send(event, payload={})
    m.send("submit_input", payload={"step": "CONDENSER", "use_hydrated": True})
    m.send("input_saved", payload={})
    m.send("fail", payload={"step": "condenser_calculation", "error": "boom"})
    assert model.state == "FAILED" and model.context["error"] == "boom"
    m.send("restart", payload={"step": "condenser_calculation"})
    assert model.state == "CONDENSER_CALCULATION" and "error" not in model.context


def test_start_input_is_validated():
    v = BalanceSaga.validate_input
    assert v({"project": "demo/balance", "branch": "issue/1"}, None)["dependencies"] == list(CATALOG)
    for body, field in (({"branch": "b"}, "project"), ({"project": "p"}, "branch"),
                        ({"project": "p", "branch": "a b"}, "branch"), ({"project": "../x", "branch": "b"}, "project"),
                        ({"project": "p", "branch": "b", "dependencies": "condenser"}, "dependencies"),
                        ({"project": "p", "branch": "b", "dependencies": ["condenser", "condenser"]}, "dependencies"),
                        ({"project": "p", "branch": "b", "nope": 1}, "nope")):
        with pytest.raises(InvalidInput) as err:
            v(body, None)
        assert err.value.field == field, body


def test_branch_names():
    assert check_branch_name("issue/42-new-calculation") == "issue/42-new-calculation"
    for bad in ("", "a..b", "a b", "x.lock", "/a", "a:b", None, 5):
        with pytest.raises(InvalidInput):
            check_branch_name(bad)


def test_manifest_validation_names_the_place():
    assert validate_manifest({"geometries": [{"id": "a", "name": "A", "file": "a.step", "extra": 1}]})[0]["id"] == "a"
    for data, where in (([], "$"), ({}, "geometries"), ({"geometries": [1]}, "geometries[0]"),
                        ({"geometries": [{"id": "a", "name": "A"}]}, "geometries[0].file"),
                        ({"geometries": [{"id": "a", "name": "A", "file": "f"}] * 2}, "geometries[1].id")):
        with pytest.raises(InvalidInput) as err:
            validate_manifest(data)
        assert err.value.field == f"geometries_manifest.json:{where}" and err.value.status == 422


def test_result_contract():
    ok = parse_result(json.dumps({"correlationId": "c", "status": "succeeded", "outputCommit": "abc"}).encode())
    assert ok == {"correlationId": "c", "status": "succeeded", "outputCommit": "abc", "error": None}
    assert parse_result({"correlationId": "c", "status": "failed", "error": "x"})["error"] == "x"
    for raw, field in (("nope", "body"), ([], "body"), ({"status": "failed"}, "correlationId"),
                       ({"correlationId": "c", "status": "done"}, "status"),
                       ({"correlationId": "c", "status": "succeeded"}, "outputCommit")):
        with pytest.raises(InvalidInput) as err:
            parse_result(raw)
        assert err.value.field == field
    msg = task_message("c", "file:///r", "b", "h", ["i.json"], "o.json")
    assert set(msg) == {"version", "correlationId", "repoUrl", "branch", "commitHash", "input_files", "output_file"}
    assert correlation_id("s:x_calculation:0") == correlation_id("s:x_calculation:0") != correlation_id("s:x_calculation:1")


def test_emulated_calculation_is_deterministic():
    a = compute("condenser", {"x.json": {"b": 2, "a": [1, 2.5, True, "s"]}})
    assert a == compute("condenser", {"x.json": {"a": [1, 2.5, True, "s"], "b": 2}})
    assert a["value"] == 5.5
    assert failure_reason({"x.json": {"deep": {"emulator_fail": "no"}}}) == "no"


def test_local_backend_commits_once_per_marker(tmp_path):
    GitRepo.init(tmp_path / "team" / "p").commit("main", {"balance_input.json": "{}"}, "init\n")
    repo = LocalRepository(tmp_path)
    assert repo.project("team/p").default_branch == "main"
    with pytest.raises(NotFound):
        repo.project("team/none")
    assert isinstance(read_at_branch(repo, "team/p", "balance_input.json", "issue/1"), FileContent)
    assert read_at_branch(repo, "team/p", "x.json", "issue/1") == FileMissing("x.json", "main")
    first = commit_once(repo, "team/p", "issue/1", {"a.json": "1", "b/c.json": "2"}, "Two files", "s:step:0")
    again = commit_once(repo, "team/p", "issue/1", {"a.json": "changed"}, "Two files", "s:step:0")
    assert first.created and not again.created and first.sha == again.sha
    assert repo.read_file("team/p", "b/c.json", "issue/1").text == "2"
    assert repo.branch_head("team/p", "main") != first.sha  # main untouched
    assert repo.ensure_branch("team/p", "issue/1") == first.sha
    mr = repo.create_merge_request("team/p", "issue/1", None, "t")
    assert mr.created and not repo.create_merge_request("team/p", "issue/1", None, "t").created


def test_a_commit_git_refuses_fails_at_once_and_writes_nothing(tmp_path):
    """A branch that an existing one stands in the way of, or a file where a directory of it is
    a file: NameClash naming the field at once. It used to be taken for a moved branch, tried 20
    times, each leaving an unreachable commit; and a file written where a file of its directory
    was replaced that file silently."""
    from sagas.balance.repository import GitRepo, NameClash

    repo = GitRepo.init(tmp_path / "p")
    repo.commit("main", {"a.json": "{}", "d/x.json": "{}"}, "init\n")
    repo.create_branch("issue/1-a", "main")
    for branch in ("issue", "issue/1-a/x"):
        with pytest.raises(NameClash) as err:
            repo.commit(branch, {"b.json": "1"}, "m\n")
        assert err.value.field == "branch" and "'issue/1-a'" in err.value.problem
    for files in ({"a.json/x": "1"}, {"d": "1"}):
        with pytest.raises(NameClash) as err:
            repo.commit("issue/1-a", files, "m\n")
        assert err.value.field == "files" and err.value.status == 422
    assert repo.git("fsck", "--unreachable", "--no-reflogs").strip() == ""
    assert repo.head("issue/1-a") == repo.head("main") and repo.branches() == ["issue/1-a", "main"]
    assert repo.branch_clash("issue") == "issue/1-a" and repo.branch_clash("issue/1-a/x") == "issue/1-a"
    assert repo.branch_clash("issue/1-a") is None and repo.branch_clash("issue/2") is None


def test_a_commit_of_many_files_is_one_commit_with_each(tmp_path):
    """Files are hashed and staged in one git process each (not two per file): 600 files, one
    commit holding every one; a None deletes."""
    from sagas.balance.repository import GitRepo

    repo = GitRepo.init(tmp_path / "p")
    repo.commit("main", {"keep.json": "1", "gone.json": "2"}, "init\n")
    files = {f"in/{i // 100}/f{i}.json": json.dumps({"i": i}) for i in range(600)}
    sha = repo.commit("main", {**files, "gone.json": None}, "many\n")
    listed = repo.git("ls-tree", "-r", "--name-only", sha).split()
    assert sorted(listed) == sorted([*files, "keep.json"])
    assert json.loads(repo.read("main", "in/5/f599.json")) == {"i": 599}
    assert repo.git("rev-list", "--count", "main").strip() == "2"
