"""Names a user gives for the repository — file paths, projects, branches — that git or GitLab
would refuse are a 400 naming the field at once, on both backends, before anything is committed;
a project never resolves outside GIT_REPOS_DIR. And a calculation result that holds text the
database cannot store is dropped and logged by the result consumer, which goes on with the next."""
from __future__ import annotations

import json
import subprocess
import uuid
from pathlib import Path

import pytest
import requests
from balance_stack import (BRANCH, TOKEN, assert_branch_refused, git_repo, gitlab_stack,  # noqa: F401
                           local_stack, new_project, sent_task, start)
from balance_stack import calculation as stack_calculation
from conftest import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

BACKENDS = ["local_stack", "gitlab_stack"]
BAD_FILE_PATHS = [".git/config", "a//b.json", "./c.json", "dir/", "a/.git/x", "A/.GIT/hooks/pre-commit",
                  "/etc/passwd", "a\\b.json", "in/../../x.json", "tab\tname.json", "x" * 256 + ".json",
                  # listed as another name: a direction mark reorders it, a separator breaks it
                  "in/pump\u202enosj.json", "in/a\u2028b.json", "in/\u200bpump.json"]


def calculation(project: str, branch: str = "calc/names", **overrides):
    return stack_calculation(project, branch=branch, **overrides)


@pytest.mark.parametrize("backend", BACKENDS)
def test_file_paths_git_refuses_are_a_400_naming_files(request, backend):
    s = request.getfixturevalue(backend)
    project = new_project(s)
    for path in BAD_FILE_PATHS:
        r = s.http("POST", "/calculations", json=calculation(project, files={path: "x"}))
        assert r.status_code == 400, (path, r.status_code, r.text)
        assert r.json()["error"] == "invalid_input" and r.json()["field"] == "files", (path, r.json())
    # a file and a directory of the same name cannot be in one commit
    r = s.http("POST", "/calculations", json=calculation(project, files={"a": "1", "a/b.json": "2"}))
    assert r.status_code == 400 and r.json()["field"] == "files", r.text
    for output in (".git/config", "out/", "./out.json", "inputs/pump_input.json/x"):
        r = s.http("POST", "/calculations", json=calculation(project, output_file=output))
        assert r.status_code == 400 and r.json()["field"] == "output_file", (output, r.text)
    assert git_repo(s, project).head("calc/names") is None  # nothing was committed
    r = s.http("POST", "/calculations", json=calculation(project))  # a nested path is fine
    assert r.status_code == 201 and r.json()["input_commit"], r.text


@pytest.mark.parametrize("backend", BACKENDS)
def test_names_the_repository_already_holds_otherwise_are_a_400_and_nothing_starts(request, backend):
    """git keeps branch and file names as paths: no branch `issue` beside `issue/7-a` (nor
    `issue/7-a/x`), no file `balance_input.json/x` where balance_input.json is a file, no file
    where a directory is. Each was accepted, and the instance failed once git refused its commit
    (after 20 tries that each left a commit behind). Now each is a 400 naming the field, and no
    instance, branch or commit is made."""
    s = request.getfixturevalue(backend)
    project = new_project(s, extra={"inputs/old.json": "{}"})
    repo = git_repo(s, project)
    repo.create_branch("issue/7-a", "main")

    def instances() -> int:
        items = s.http("GET", "/sagas?limit=500").json()["items"]
        return sum(1 for i in items if (i["context"].get("input") or {}).get("project") == project)

    for branch in ("issue", "issue/7-a/x"):
        for r in (start(s, project, ["condenser"], branch=branch),
                  s.http("POST", "/calculations", json=calculation(project, branch=branch))):
            assert r.status_code == 400 and r.json()["field"] == "branch", (branch, r.text)
            assert "existing branch 'issue/7-a'" in r.json()["message"], r.text
    for files, output, field in (({"balance_input.json/x": "1"}, "out.json", "files"),
                                 ({"inputs": "1"}, "out.json", "files"),
                                 ({"in.json": "1"}, "balance_input.json/out.json", "output_file"),
                                 ({"in.json": "1"}, "inputs", "output_file")):
        r = s.http("POST", "/calculations", json=calculation(project, files=files, output_file=output))
        assert r.status_code == 400 and r.json()["field"] == field, (files, output, r.text)
    assert instances() == 0 and repo.branches() == ["issue/7-a", "main"]
    # on an existing branch, its own files count: inputs/pump_input.json is a file there now
    assert s.http("POST", "/calculations", json=calculation(project)).status_code == 201
    r = s.http("POST", "/calculations", json=calculation(project, files={"inputs/pump_input.json/x": "1"}))
    assert r.status_code == 400 and r.json()["field"] == "files" and "calc/names" in r.json()["message"], r.text
    assert instances() == 1
    assert repo.git("fsck", "--unreachable", "--no-reflogs").strip() == ""


def _calculation_state(s, calculation_id: str) -> str:
    return s.http("GET", f"/calculations/{calculation_id}").json()["status"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_calculation_must_fit_beside_what_calculations_still_running_on_its_branch_write(request, backend):
    """Only the repository's files were looked at: a second calculation whose input or output is
    in the way of a running one's output (`res` beside `res/out.json`) was accepted, and once
    the first output was committed the second's was refused for good, its task requeued by the
    calculator until the step's timeout. Now it is a 400 naming the field and saying why; and
    a calculator whose output the repository refuses (a file made in its way) answers failed."""
    s = request.getfixturevalue(backend)
    project = new_project(s)
    s.stop("calculator")  # the first calculation stays running
    try:
        first = s.http("POST", "/calculations", json=calculation(project, branch="calc/pending",
                                                                 output_file="res/out.json"))
        assert first.status_code == 201, first.text
        for files, output, field in (({"in2.json": "1"}, "res", "output_file"),
                                     ({"res/out.json/deeper.json": "1"}, "z.json", "files"),
                                     ({"res": "1"}, "z.json", "files")):
            r = s.http("POST", "/calculations", json=calculation(project, branch="calc/pending", files=files,
                                                                 output_file=output))
            assert r.status_code == 400 and r.json()["field"] == field, (files, output, r.text)
            assert "written by a calculation still running on the branch" in r.json()["message"], r.text
        beside = s.http("POST", "/calculations", json=calculation(project, branch="calc/pending", files={"b.json": "1"},
                                                                  output_file="res/other.json"))
        assert beside.status_code == 201, beside.text
        # a file made in the way of the first output meanwhile (another writer of the branch)
        repo = git_repo(s, project)
        repo.commit("calc/pending", {"res/out.json/x": "in the way"}, "another writer\n")
    finally:
        s.start("calculator")
    wait_for(lambda: _calculation_state(s, beside.json()["correlationId"]) == "completed", timeout=60,
             what="the calculation beside it to complete")
    cid = first.json()["correlationId"]
    wait_for(lambda: _calculation_state(s, cid) == "failed", timeout=60, what="the refused output to fail")
    error = s.http("GET", f"/calculations/{cid}").json()["error"]
    assert "output not committed" in error and "res/out.json" in error, error


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_calculation_of_many_files_is_one_commit_and_more_than_the_cap_a_400(request, backend):
    """No limit on the files of a calculation, and two git processes (and on GitLab a request)
    per file: 6,000 files held its step for half a minute. At most MAX_CALCULATION_FILES now,
    committed in one commit with a fixed number of git processes."""
    from sagas.balance import MAX_CALCULATION_FILES

    s = request.getfixturevalue(backend)
    project = new_project(s)
    many = {f"inputs/f{i}.json": {"i": i} for i in range(MAX_CALCULATION_FILES + 1)}
    r = s.http("POST", "/calculations", json=calculation(project, files=many))
    assert r.status_code == 400 and r.json()["field"] == "files" and "at most" in r.json()["message"], r.text
    many.pop(f"inputs/f{MAX_CALCULATION_FILES}.json")
    r = s.http("POST", "/calculations", json=calculation(project, files=many))
    assert r.status_code == 201 and r.json()["input_commit"], r.text
    commit = r.json()["input_commit"]
    listed = git_repo(s, project).git("ls-tree", "--name-only", f"{commit}:inputs").split()
    assert len(listed) == MAX_CALCULATION_FILES


@pytest.mark.parametrize("backend", BACKENDS)
def test_projects_and_branches_git_refuses_are_a_400_naming_the_field(request, backend):
    s = request.getfixturevalue(backend)
    project = new_project(s)
    for bad in (".", "./" + project, project + "/.git", "/" + project, project.replace("/", "//"),
                "team/-p", "team/.hidden"):
        for method, path, kwargs in (
                ("POST", "/calculations", {"json": calculation(bad)}),
                ("POST", "/saga/calculate-balance", {"json": {"project": bad, "branch": BRANCH}}),
                ("GET", "/geometries", {"params": {"project": bad}}),
                ("POST", "/merge-requests", {"json": {"project": bad, "source_branch": BRANCH, "title": "t"}})):
            r = s.http(method, path, **kwargs)
            assert r.status_code == 400 and r.json()["field"] == "project", (bad, path, r.status_code, r.text)
    for bad in ("a/.hidden", "x.lock/y", "@", "-x", "a\x7fb", "issue/1.", "HEAD", " HEAD ", "@{-1}", "a..b",
                "a b", "x.lock"):
        assert_branch_refused(s, project, bad)


def test_a_project_never_resolves_outside_git_repos_dir(local_stack, tmp_path):
    from sagas.balance.repository import GitRepo

    s = local_stack
    outside = tmp_path / "outside"
    GitRepo.init(outside).commit("main", {"balance_input.json": json.dumps({"condenser": {"a": 1}})}, "init\n")
    link = Path(s.env["GIT_REPOS_DIR"]) / "team" / f"link{uuid.uuid4().hex[:6]}"
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(outside)
    project = f"team/{link.name}"
    r = start(s, project, ["condenser"])
    assert r.status_code == 404 and r.json()["field"] == "project", r.text
    r = s.http("POST", "/calculations", json=calculation(project))
    assert r.status_code == 404 and r.json()["field"] == "project", r.text
    assert GitRepo(outside).branches() == ["main"]


def _publish_result(stack, body: bytes) -> None:
    from kombu import Connection, Exchange, Producer

    queue = "orchestrator.calculation-results"
    with Connection(stack.env["CELERY_BROKER_URL"]) as conn:
        Producer(conn).publish(body, exchange=Exchange(queue, type="direct", durable=True), routing_key=queue,
                               serializer=None, content_type="application/json", delivery_mode=2)


def test_a_result_with_unstorable_text_is_dropped_and_the_next_result_is_applied(local_stack):
    s = local_stack
    s.stop("calculator")  # this test answers the task itself
    try:
        project = new_project(s)
        r = s.http("POST", "/calculations", json=calculation(project))
        assert r.status_code == 201, r.text
        cid = r.json()["correlationId"]
        task = wait_for(lambda: sent_task(s, cid),
                        timeout=30, what="the task sent")
        for bad in ({"version": 1, "correlationId": task, "status": "failed", "error": "diverged\u0000"},
                    {"version": 1, "correlationId": task, "status": "succeeded", "outputCommit": "\ud800"}):
            _publish_result(s, json.dumps(bad).encode())
        _publish_result(s, b'{"correlationId": "' + task.encode() + b'", "status": "failed", "error": "\xff"}')
        _publish_result(s, json.dumps({"version": 1, "correlationId": task, "status": "failed",
                                       "error": "did not converge"}).encode())
        done = wait_for(lambda: (lambda b: b if b["status"] != "running" else None)(
            s.http("GET", f"/calculations/{cid}").json()), timeout=30, what="the valid result applied")
        assert done["status"] == "failed" and "did not converge" in done["error"], done
        log = s.procs["calc-results"].output()
        assert "error: contains a NUL character" in log and "outputCommit: contains a lone" in log, log[-3000:]
        assert "body: is not UTF-8 text" in log and "requeued" not in log, log[-3000:]
        assert s.procs["calc-results"].proc.poll() is None
    finally:
        s.start("calculator")


BRANCH_NAMES = ["HEAD", "head", "x/HEAD", "HEAD/x", "FETCH_HEAD", "-", "-x", "a/-x", "@", "@x", "a@b", "@{-1}",
                "a@{1}", "a.lock", "a/.lock", "a.lock/b", "a./b", "x.", "a/b.", ".a", "a/.b", "a..b", "a//b", "/a",
                "a/", "a b", "a\x7f", "a\x01b", "a~1", "a^", "a:b", "a?", "a*", "a[", "a\\b", "a{b}", "é/ü",
                "issue/42-new-calculation", "x" * 200, "x" * 201]


@pytest.mark.parametrize("name", BRANCH_NAMES)
def test_the_branch_rule_refuses_what_git_check_ref_format_branch_refuses(name, tmp_path):
    """`git check-ref-format --branch` is the reference (it expands '@' to the current branch, which the
    rule refuses as a name; and GitLab limits names the rule caps at 200 characters)."""
    from sagas.balance.repository import InvalidInput, check_branch_name

    git = subprocess.run(["git", "check-ref-format", "--branch", name], capture_output=True, cwd=tmp_path)
    try:
        check_branch_name(name)
        ours = True
    except InvalidInput as e:
        assert e.field == "branch"
        ours = False
    if name != "@" and len(name) <= 200:
        assert ours == (git.returncode == 0), (name, git.stderr)
    else:
        assert not ours, name


def test_git_itself_refuses_what_the_rule_refuses(tmp_path):
    """The rule is not stricter than needed where it matters: git's own index refuses these."""
    from sagas.balance.repository import GitRepo

    repo = GitRepo.init(tmp_path / "r")
    for path in (".git/config", "a/.git/x", "./c.json", "a//b.json", "a/../b.json"):
        proc = subprocess.run(["git", "-C", str(repo.path), "update-index", "--add", "--cacheinfo",
                               f"100644,{'e69de29bb2d1d6434b8b29ae775ad8c2e48c5391'},{path}"],
                              capture_output=True, env={"GIT_INDEX_FILE": str(tmp_path / "index"), "PATH": "/usr/bin:/bin"})
        assert proc.returncode != 0, path


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_balance_saga_refuses_the_default_branch_naming_branch(request, backend):
    """The saga works on an issue branch: started on the default branch it committed its
    hydration there, and every later saga on an issue branch then found the input in place and
    answered without the hydration commit the README shows."""
    s = request.getfixturevalue(backend)
    project = new_project(s)
    head = git_repo(s, project).head("main")
    sagas = s.http("GET", "/sagas", params={"type": "calculate-balance"}).json()["total"]
    r = s.http("POST", "/saga/calculate-balance", json={"project": project, "branch": "main"})
    assert r.status_code == 400 and r.json()["field"] == "branch", r.text
    assert "default branch" in r.json()["message"], r.text
    assert git_repo(s, project).head("main") == head  # nothing was committed, no saga started
    assert s.http("GET", "/sagas", params={"type": "calculate-balance"}).json()["total"] == sagas


def merge_requests(s, project: str) -> list:
    """The project's merge requests, as the backend stores them."""
    if s.backend == "gitlab":
        return requests.get(f"{s.gitlab.url}/api/v4/projects/{project.replace('/', '%2F')}/merge_requests",
                            headers={"PRIVATE-TOKEN": TOKEN}, timeout=5).json()
    return git_repo(s, project).merge_requests()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_merge_request_from_the_default_branch_into_itself_is_a_400_naming_source_branch(request, backend):
    """Without target_branch a merge request goes to the default branch: from that branch it was
    created main -> main (201), while the same request with target_branch main was refused."""
    s = request.getfixturevalue(backend)
    project = new_project(s)
    body = {"project": project, "source_branch": "main", "title": "x"}
    r = s.http("POST", "/merge-requests", json=body)
    assert r.status_code == 400 and r.json()["field"] == "source_branch", r.text
    assert "default branch" in r.json()["message"], r.text
    r = s.http("POST", "/merge-requests", json={**body, "target_branch": "main"})
    assert r.status_code == 400 and r.json()["field"] == "target_branch", r.text
    assert merge_requests(s, project) == []
    # from main into another branch is a merge request like any other
    git_repo(s, project).create_branch("release", "main")
    r = s.http("POST", "/merge-requests", json={**body, "target_branch": "release"})
    assert r.status_code == 201 and r.json()["target_branch"] == "release", r.text
