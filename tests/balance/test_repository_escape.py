"""A project name can never reach a folder outside GIT_REPOS_DIR, however it is spelled over HTTP:
'..' segments, absolute paths, backslashes, percent-encoded and double-encoded slashes and dots,
a symbolic link inside the folder that points out of it. Each is a 400 or 404 naming `project`,
and the repository outside is never read or written."""
from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
import requests
from balance_stack import BRANCH, local_stack  # noqa: F401

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

#: Spelled as they reach the API after the HTTP layer decodes them once.
HOSTILE = ["../outside", "team/../../outside", "..", "team/..", "./outside", "/tmp", "{outside}",
           "..\\outside", "team\\..\\..\\outside", "..%2Foutside", "%2e%2e/outside", "team/%2e%2e/%2e%2e/outside",
           "team/.git", "team//outside", "~/outside", "team/./p", "outside\x00", "team/p\n"]
#: Sent raw in the query string: the server decodes them (encoded slashes and dots, double encoding).
RAW_QUERIES = ["..%2Foutside", "team%2F..%2F..%2Foutside", "%2E%2E%2Foutside", "..%252Foutside",
               "%2Ftmp", "team%5C..%5C..%5Coutside", "%2e%2e", "team%2f%2e%2e%2f%2e%2e%2foutside"]


@pytest.fixture(scope="module")
def outside(local_stack):  # noqa: F811
    """A git repository beside GIT_REPOS_DIR (its '../outside'), and a link to it inside."""
    from balance_stack import DEMO_BALANCE, MANIFEST

    from sagas.balance.repository import GitRepo

    repos = Path(local_stack.env["GIT_REPOS_DIR"])
    path = repos.parent / "outside"
    GitRepo.init(path).commit("main", {"balance_input.json": json.dumps(DEMO_BALANCE),
                                       "geometries_manifest.json": json.dumps(MANIFEST)}, "init\n")
    link = repos / "team" / f"link{uuid.uuid4().hex[:6]}"
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(path)
    return path, f"team/{link.name}"


def refused(r: requests.Response, what: str) -> None:
    assert r.status_code in (400, 404), (what, r.status_code, r.text)
    assert r.json()["field"] == "project", (what, r.text)


def test_no_spelling_of_a_project_leaves_git_repos_dir(local_stack, outside):  # noqa: F811
    from sagas.balance.repository import GitRepo

    s = local_stack
    path, link = outside
    names = [n.replace("{outside}", str(path)) for n in HOSTILE] + [link, str(path)]
    for name in names:
        refused(s.http("POST", "/saga/calculate-balance", json={"project": name, "branch": BRANCH}), name)
        refused(s.http("POST", "/calculations", json={
            "project": name, "branch": "calc/escape", "files": {"inputs/x.json": "{}"},
            "output_file": "out.json", "calculation": "pump"}), name)
        refused(s.http("GET", "/geometries", params={"project": name}), name)
        refused(s.http("POST", "/merge-requests", json={"project": name, "source_branch": BRANCH, "title": "t"}), name)
    for raw in RAW_QUERIES:
        refused(requests.get(f"{s.url}/geometries?project={raw}", timeout=10), raw)
    assert GitRepo(path).branches() == ["main"]  # nothing was written outside
