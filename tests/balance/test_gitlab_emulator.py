"""The GitLab emulator answers python-gitlab the way GitLab does: shapes, status codes, error bodies."""
from __future__ import annotations

import base64

import gitlab
import pytest
import requests

from emulators.gitlab import GitLabEmulator
from orchestrator.errors import NotFound, UpstreamError
from sagas.balance.repository import GitLabRepository, commit_once, geometries


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    em = GitLabEmulator(tmp_path_factory.mktemp("gitlab"), "tok", "alice").start()
    requests.post(f"{em.url}/_emulator/projects", json={"path": "grp/proj", "files": {
        "balance_input.json": '{"condenser": {"a": 1}}', "geometries_manifest.json": '{"geometries": []}'}},
        timeout=5)
    yield em
    em.stop()


@pytest.fixture
def gl(emulator):
    return gitlab.Gitlab(emulator.url, private_token="tok", retry_transient_errors=False)


def test_wrong_or_missing_token_is_401(emulator):
    bad = gitlab.Gitlab(emulator.url, private_token="nope")
    with pytest.raises(gitlab.exceptions.GitlabAuthenticationError) as err:
        bad.auth()
    assert err.value.response_code == 401
    r = requests.get(f"{emulator.url}/api/v4/projects/grp%2Fproj", timeout=5)
    assert r.status_code == 401 and r.json() == {"message": "401 Unauthorized"}
    with pytest.raises(UpstreamError) as up:
        GitLabRepository(emulator.url, "nope", 2).project("grp/proj")
    assert up.value.upstream_status == 401 and not up.value.retryable and up.value.status == 502


def test_projects_files_branches_commits(gl, emulator):
    gl.auth()
    assert gl.user.username == "alice"
    p = gl.projects.get("grp/proj")
    assert (p.path_with_namespace, p.default_branch) == ("grp/proj", "main")
    assert gl.projects.get(p.id).path_with_namespace == "grp/proj"
    with pytest.raises(gitlab.exceptions.GitlabGetError) as err:
        gl.projects.get("grp/none")
    assert err.value.response_code == 404 and err.value.error_message == "404 Project Not Found"
    f = p.files.get("balance_input.json", ref="main")
    assert f.decode() == b'{"condenser": {"a": 1}}' and f.encoding == "base64"
    assert p.files.raw("balance_input.json", ref="main") == b'{"condenser": {"a": 1}}'
    with pytest.raises(gitlab.exceptions.GitlabGetError) as err:
        p.files.get("nope.json", ref="main")
    assert err.value.error_message == "404 File Not Found"
    c = p.commits.create({"branch": "feature/x", "start_branch": "main", "commit_message": "two files",
                          "actions": [{"action": "create", "file_path": "dir/a.json", "content": "{}"},
                                      {"action": "update", "file_path": "balance_input.json", "content": "{}"},
                                      {"action": "create", "file_path": "b.txt",
                                       "content": base64.b64encode(b"hi").decode(), "encoding": "base64"}]})
    assert p.branches.get("feature/x").commit["id"] == c.id
    assert p.files.raw("b.txt", ref="feature/x") == b"hi"
    assert [x.id for x in p.commits.list(ref_name="feature/x", get_all=False)][0] == c.id
    with pytest.raises(gitlab.exceptions.GitlabCreateError) as err:  # the file exists now
        p.commits.create({"branch": "feature/x", "commit_message": "again",
                          "actions": [{"action": "create", "file_path": "dir/a.json", "content": "{}"}]})
    assert err.value.response_code == 400 and "already exists" in err.value.error_message
    with pytest.raises(gitlab.exceptions.GitlabCreateError):  # no such branch and no start_branch
        p.commits.create({"branch": "other", "commit_message": "m",
                          "actions": [{"action": "create", "file_path": "z", "content": ""}]})
    with pytest.raises(gitlab.exceptions.GitlabGetError) as err:
        p.branches.get("nope")
    assert err.value.error_message == "404 Branch Not Found"
    b = p.branches.create({"branch": "feature/y", "ref": "main"})
    assert b.name == "feature/y"


def test_merge_requests_and_issues(gl, emulator):
    p = gl.projects.get("grp/proj")
    p.branches.create({"branch": "mr/1", "ref": "main"})
    mr = p.mergerequests.create({"source_branch": "mr/1", "target_branch": "main", "title": "One"})
    assert mr.state == "opened" and mr.iid >= 1
    with pytest.raises(gitlab.exceptions.GitlabCreateError) as err:
        p.mergerequests.create({"source_branch": "mr/1", "target_branch": "main", "title": "Two"})
    assert err.value.response_code == 409
    assert [m.iid for m in p.mergerequests.list(source_branch="mr/1", state="opened", get_all=False)] == [mr.iid]
    requests.post(f"{emulator.url}/_emulator/issues", json={"project": "grp/proj", "title": "Mine", "assignee": "bob"},
                  timeout=5)
    assert [i.title for i in gl.issues.list(scope="all", assignee_username="bob", get_all=False)] == ["Mine"]
    assert gl.issues.list(scope="all", assignee_username="carol", get_all=False) == []


def test_facade_over_the_emulator(emulator):
    repo = GitLabRepository(emulator.url, "tok", 2)
    with pytest.raises(NotFound):
        repo.project("grp/none")
    one = commit_once(repo, "grp/proj", "facade/1", {"x.json": "1", "y.json": "2"}, "m", "k:1")
    two = commit_once(repo, "grp/proj", "facade/1", {"x.json": "3"}, "m", "k:1")
    assert one.created and not two.created and one.sha == two.sha
    assert geometries(repo, "grp/proj") == []
    requests.post(f"{emulator.url}/_emulator/faults", json={"faults": [
        {"method": "GET", "path": "repository/files", "status": 500, "times": 1}]}, timeout=5)
    with pytest.raises(UpstreamError) as err:
        repo.read_file("grp/proj", "x.json", "facade/1")
    assert err.value.retryable and err.value.upstream_status == 500
    assert repo.read_file("grp/proj", "x.json", "facade/1").text == "1"  # the fault was for one call


def test_tree_listing_branch_search_and_names_git_keeps_as_paths(gl, emulator):
    """GitLab's repository tree (one directory, paginated: python-gitlab follows the `Link`
    header), branch search (`^term`: names that begin with it), and 400 for a branch or a file
    that git cannot create beside an existing one (`a` beside `a/b`)."""
    p = gl.projects.get("grp/proj")
    files = [{"action": "create", "file_path": f"many/f{i:02d}.json", "content": "{}"} for i in range(45)]
    p.commits.create({"branch": "tree/x", "start_branch": "main", "commit_message": "45 files", "actions": files})
    listed = p.repository_tree(path="many", ref="tree/x", get_all=True)
    assert sorted(e["path"] for e in listed) == [f"many/f{i:02d}.json" for i in range(45)]
    assert {e["type"] for e in listed} == {"blob"}
    r = requests.get(f"{emulator.url}/api/v4/projects/grp%2Fproj/repository/tree",
                     params={"path": "many", "ref": "tree/x", "per_page": 20}, headers={"PRIVATE-TOKEN": "tok"},
                     timeout=5)
    assert len(r.json()) == 20 and r.headers["X-Next-Page"] == "2" and 'rel="next"' in r.headers["Link"]
    root = {e["path"]: e["type"] for e in p.repository_tree(ref="tree/x", get_all=True)}
    assert root["many"] == "tree" and root["balance_input.json"] == "blob"
    for path in ("many/f00.json", "nothing"):  # a file or nothing: no directory to list
        with pytest.raises(gitlab.exceptions.GitlabGetError) as err:
            p.repository_tree(path=path, ref="tree/x", get_all=True)
        assert err.value.response_code == 404 and err.value.error_message == "404 Tree Not Found"
    assert [b.name for b in p.branches.list(search="^tree/", get_all=True)] == ["tree/x"]
    assert [b.name for b in p.branches.list(search="^ree/", get_all=True)] == []
    for name in ("tree", "tree/x/y"):
        with pytest.raises(gitlab.exceptions.GitlabCreateError) as err:
            p.branches.create({"branch": name, "ref": "main"})
        assert err.value.response_code == 400 and "Failed to create branch" in err.value.error_message
    for path in ("balance_input.json/x", "many"):
        with pytest.raises(gitlab.exceptions.GitlabCreateError) as err:
            p.commits.create({"branch": "tree/x", "commit_message": "m",
                              "actions": [{"action": "create", "file_path": path, "content": "{}"}]})
        assert err.value.response_code == 400, path
    repo = GitLabRepository(emulator.url, "tok")
    assert repo.branch_clash("grp/proj", "tree") == "tree/x" and repo.branch_clash("grp/proj", "tree/x/y") == "tree/x"
    assert repo.branch_clash("grp/proj", "tree/x") is None and repo.branch_clash("grp/proj", "tree2") is None
    assert repo.path_kinds("grp/proj", "tree/x", {"many", "many/f01.json", "many/none", "x/y"}) == {
        "many": "tree", "many/f01.json": "blob"}
