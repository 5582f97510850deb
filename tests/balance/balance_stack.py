"""A whole balance stack per backend: its own PostgreSQL database and RabbitMQ vhost, and real
processes — API, Celery worker, sweeper, result consumer and the emulated calculation worker —
talking to the GitLab emulator (through python-gitlab) or to local git repositories."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest
import requests
from sqlalchemy import text

from conftest import AMQP, FAST, PG_ADMIN, REDIS, ROOT, Process, _admin_engine, _rabbitmqctl, wait_for
from orchestrator.entrypoints.ports import free_port

TOKEN = "test-token"
DEMO_BALANCE = {
    "plant": "test",
    "condenser": {"pressure_kpa": 7.5, "flow_kg_s": 1200},
    "evaporator": {"pressure_kpa": 350, "flow_kg_s": 42},
}
MANIFEST = {"geometries": [{"id": "g1", "name": "Shell", "file": "geometry/shell.step"}]}


class Stack:
    """The processes of one backend, startable and stoppable as a whole."""

    def __init__(self, backend: str, env: dict[str, str], port: int, tmp: Path, gitlab: Any = None) -> None:
        self.backend, self.env, self.port, self.tmp, self.gitlab = backend, env, port, tmp, gitlab
        self.url = f"http://127.0.0.1:{port}"
        self.procs: dict[str, Process] = {}

    def start(self, *names: str) -> None:
        commands = {
            "api": ["api", "--port", str(self.port), "--workers", "1", "--host", "127.0.0.1"],
            "worker": ["worker", "--concurrency", "2", "--name", f"bal{uuid.uuid4().hex[:6]}@%h"],
            "sweeper": ["sweeper"],
            "calc-results": ["calc-results"],
        }
        for name in names or ("api", "worker", "sweeper", "calc-results", "calculator"):
            if name == "calculator":
                self.procs[name] = CalculatorProcess(self.env).start()
            else:
                self.procs[name] = Process(f"{self.backend}-{name}", commands[name], self.env).start()
        if "api" in (names or ("api",)):
            wait_for(lambda: _up(f"{self.url}/healthz"), timeout=60, what="the API")

    def stop(self, *names: str) -> None:
        for name in names or list(self.procs):
            proc = self.procs.pop(name, None)
            if proc is not None:
                proc.stop()

    def kill(self, name: str) -> None:
        proc = self.procs.pop(name)
        proc.kill()

    def http(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", 60)
        return requests.request(method, f"{self.url}{path}", **kwargs)

    def logs(self) -> str:
        return "\n".join(f"--- {n}\n{p.output()[-3000:]}" for n, p in self.procs.items())


class CalculatorProcess(Process):
    def __init__(self, env: dict[str, str]) -> None:
        super().__init__("calculator", [], env)

    def start(self) -> "CalculatorProcess":
        out = self.log.open("ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "emulators.calculator", "--seconds", "0.2"],
                                     env=self.env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        return self


def _up(url: str) -> bool:
    try:
        return requests.get(url, timeout=1).status_code == 200
    except requests.RequestException:
        return False


def _stack(backend: str, tmp: Path) -> Iterator[Stack]:
    from orchestrator.migrate import upgrade

    name = f"orch_bal_{uuid.uuid4().hex[:8]}"
    admin = _admin_engine()
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    db_url = PG_ADMIN.rsplit("/", 1)[0] + "/" + name
    upgrade(db_url)
    vhost = f"orch-bal-{uuid.uuid4().hex[:8]}"
    assert _rabbitmqctl("add_vhost", vhost) and _rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    base = {k: v for k, v in os.environ.items() if not k.startswith(("CELERY_", "DATABASE_", "POSTGRES_", "GIT"))}
    env = {**base, **FAST, "DATABASE_URL": db_url, "CELERY_BROKER_URL": f"{AMQP}/{vhost}",
           "CELERY_RESULT_BACKEND": REDIS, "REDIS_URL": REDIS, "PYTHONPATH": str(ROOT),
           "WORKFLOW_MODULES": "sagas,tasks", "GITLAB_TIMEOUT": "2.5", "STEP_LEASE_SECONDS": "20"}
    gitlab = None
    if backend == "gitlab":
        from emulators.gitlab import GitLabEmulator

        gitlab = GitLabEmulator(tmp / "gitlab", TOKEN).start()
        env.update(GITLAB_URL=gitlab.url, GITLAB_TOKEN=TOKEN)
    else:
        env["GIT_REPOS_DIR"] = str(tmp / "repos")
    stack = Stack(backend, env, free_port(), tmp, gitlab)
    stack.start()
    try:
        yield stack
    finally:
        stack.stop()
        if gitlab is not None:
            gitlab.stop()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
        _rabbitmqctl("delete_vhost", vhost)


@pytest.fixture(scope="module")
def gitlab_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    yield from _stack("gitlab", tmp_path_factory.mktemp("gitlab-stack"))


@pytest.fixture(scope="module")
def local_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    yield from _stack("local", tmp_path_factory.mktemp("local-stack"))


def new_project(stack: Stack, balance: Any = None, manifest: Any = None, extra: dict[str, str] | None = None) -> str:
    """A fresh project with balance_input.json (and the manifest) on main; its path."""
    path = f"team/p{uuid.uuid4().hex[:8]}"
    files = {"balance_input.json": json.dumps(DEMO_BALANCE if balance is None else balance, indent=2)}
    files["geometries_manifest.json"] = manifest if isinstance(manifest, str) else json.dumps(manifest or MANIFEST)
    files.update(extra or {})
    if stack.backend == "gitlab":
        r = requests.post(f"{stack.gitlab.url}/_emulator/projects", json={"path": path, "files": files}, timeout=10)
        assert r.status_code == 201, r.text
    else:
        from sagas.balance.repository import GitRepo

        GitRepo.init(Path(stack.env["GIT_REPOS_DIR"]) / path).commit("main", files, "Initial commit\n")
    return path


def git_repo(stack: Stack, project: str) -> Any:
    """The project's git repository on disk (the emulator stores real repositories too)."""
    from sagas.balance.repository import GitRepo

    if stack.backend == "gitlab":
        return GitRepo(stack.tmp / "gitlab" / f"{project}.git")
    return GitRepo(Path(stack.env["GIT_REPOS_DIR"]) / project)


def facade(stack: Stack) -> Any:
    from orchestrator.config import load_settings
    from sagas.balance.repository import open_repository

    return open_repository(load_settings(environ=stack.env, dotenv="/nonexistent"))


def wait_saga(stack: Stack, saga_id: str, *states: str, timeout: float = 60) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        body = stack.http("GET", f"/sagas/{saga_id}").json()
        return body if body["state"] in states else None

    try:
        return wait_for(check, timeout=timeout, interval=0.1, what=f"saga {saga_id} to reach {states}")
    except AssertionError:
        print(json.dumps(stack.http("GET", f"/sagas/{saga_id}").json(), indent=1)[-4000:])
        print(stack.logs())
        raise


def sent_task(stack: Stack, calculation_id: str) -> str | None:
    """The correlationId of a simple calculation's task once its step has published it (the
    step's data in the engine's view; the calculation's answer shows the task before that)."""
    steps = stack.http("GET", f"/sagas/{calculation_id}").json()["steps"]
    return next((st["data"].get("correlation_id") for st in steps if st["name"] == "calculation"), None)


BRANCH = "issue/42-new-calculation"
USER_CONDENSER = {"pressure_kpa": 8, "flow_kg_s": 1000}


def start(stack: Stack, project: str, chain: list[str] | None = None, branch: str = BRANCH,
          headers: dict[str, str] | None = None) -> requests.Response:
    body: dict[str, Any] = {"project": project, "branch": branch}
    if chain is not None:
        body["dependencies"] = chain
    return stack.http("POST", "/saga/calculate-balance", json=body, headers=headers or {})


def calculation(project: str, branch: str = "calc/rules", **overrides: Any) -> dict[str, Any]:
    """A POST /calculations body of one pump input on `branch`."""
    return {"project": project, "branch": branch, "files": {"inputs/pump_input.json": {"head_m": 3}},
            "output_file": "pump_output.json", "calculation": "pump", **overrides}


def assert_branch_refused(stack: Stack, project: str, bad: str) -> requests.Response:
    """Every route that takes a branch name answers 400 naming its field for `bad`, and no branch
    was created; the saga start's answer is returned."""
    started = start(stack, project, ["condenser"], branch=bad)
    assert started.status_code == 400 and started.json()["field"] == "branch", (bad, started.status_code, started.text)
    for method, path, kwargs, field in (
            ("POST", "/calculations", {"json": calculation(project, branch=bad)}, "branch"),
            ("POST", "/merge-requests", {"json": {"project": project, "source_branch": bad, "title": "t"}},
             "source_branch"),
            ("GET", "/geometries", {"params": {"project": project, "ref": bad}}, "ref")):
        r = stack.http(method, path, **kwargs)
        assert r.status_code == 400 and r.json()["field"] == field, (bad, path, r.status_code, r.text)
    assert git_repo(stack, project).branches() == ["main"]
    return started


def submit(stack: Stack, saga_id: str, body: dict[str, Any]) -> requests.Response:
    return stack.http("POST", f"/sagas/{saga_id}/events/submit_input", json=body)


def file_json(stack: Stack, project: str, path: str, ref: str = BRANCH) -> Any:
    data = git_repo(stack, project).read(ref, path)
    return None if data is None else json.loads(data)


def run_whole_saga(stack: Stack) -> None:
    """Start -> hydrate -> user input -> calculation -> merge -> next -> final, through HTTP."""
    from emulators.calculator import compute

    project = new_project(stack)
    repo = git_repo(stack, project)
    main_head = repo.head("main")

    r = start(stack, project, ["condenser", "evaporator"])
    assert r.status_code == 200, r.text
    body = r.json()
    saga_id = body["saga_id"]
    hydration = body["commit"]
    assert body == {"saga_id": saga_id, "status": "user_input_required", "state": "AWAIT_USER_CONDENSER_INPUT",
                    "next_step": "CONDENSER_CALCULATION", "commit": hydration}
    # the hydration commit: condenser_input.json from balance_input.json["condenser"], on the new branch
    assert repo.head(BRANCH) == hydration
    assert repo.log(hydration, 2)[1]["id"] == main_head
    assert file_json(stack, project, "condenser_input.json") == DEMO_BALANCE["condenser"]
    assert f"Orchestrator-Step: {saga_id}:check_condenser:0" in repo.log(hydration, 1)[0]["message"]

    # the same call again returns the running saga, and commits nothing
    again = start(stack, project, ["condenser", "evaporator"])
    assert again.status_code == 200 and again.json() == body
    assert repo.head(BRANCH) == hydration

    # the user's input: committed, then the calculation runs
    r = submit(stack, saga_id, {"step": "CONDENSER", "content": USER_CONDENSER})
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["status"] in ("running", "user_input_required"), answer
    user_commit = answer["commit"] if answer["status"] == "running" else None
    snap = wait_saga(stack, saga_id, "AWAIT_USER_EVAPORATOR_INPUT")
    commits = {c["state"]: c["commit"] for c in snap["context"]["commits"]}
    user_commit = user_commit or commits["SAVE_CONDENSER_INPUT"]
    assert commits["SAVE_CONDENSER_INPUT"] == user_commit
    assert json.loads(repo.read(user_commit, "condenser_input.json")) == USER_CONDENSER
    condenser_out = compute("condenser", {"condenser_input.json": USER_CONDENSER})
    assert json.loads(repo.read(commits["CONDENSER_CALCULATION"], "condenser_output.json")) == condenser_out
    merged = json.loads(repo.read(commits["SYNC_CONDENSER_RESULT"], "balance_input.json"))
    assert merged == {**DEMO_BALANCE, "condenser_result": condenser_out}

    status = stack.http("GET", f"/saga/calculate-balance/{saga_id}").json()
    assert status["status"] == "user_input_required" and status["next_step"] == "EVAPORATOR_CALCULATION"
    assert status["commit"] == commits["CHECK_EVAPORATOR"]

    r = submit(stack, saga_id, {"step": "EVAPORATOR", "use_hydrated": True})
    assert r.status_code == 200 and r.json()["commit"] is None, r.text
    snap = wait_saga(stack, saga_id, "COMPLETED", "FAILED")
    assert snap["state"] == "COMPLETED", snap["context"]
    evaporator_out = compute("evaporator", {"evaporator_input.json": DEMO_BALANCE["evaporator"]})
    final_input = {**DEMO_BALANCE, "condenser_result": condenser_out, "evaporator_result": evaporator_out}
    final = compute("balance", {"balance_input.json": final_input})
    assert snap["context"]["result"] == final
    assert file_json(stack, project, "balance_output.json") == final
    assert file_json(stack, project, "balance_input.json") == final_input

    # every step with its commit and the calculations' correlation ids
    steps = {s["name"]: s for s in snap["steps"]}
    assert list(steps) == ["check_condenser", "save_condenser_input", "condenser_calculation",
                           "sync_condenser_result", "check_evaporator", "save_evaporator_input",
                           "evaporator_calculation", "sync_evaporator_result", "balance_calculation",
                           "sync_balance_result"]
    assert all(s["status"] == "completed" for s in steps.values())
    for calc in ("condenser_calculation", "evaporator_calculation", "balance_calculation"):
        data = steps[calc]["data"]
        assert len(data["correlation_id"]) == 36 and data["output"]["commit"] == repo.log(data["output"]["commit"], 1)[0]["id"]
    assert steps["check_condenser"]["data"]["output"]["commit"] == hydration
    # one commit per step that writes, nothing else: 2 hydrations, 1 user file, 3 outputs, 2 merges
    history = repo.log(BRANCH, 50)
    assert len(history) == 9 and history[-1]["id"] == main_head
    ours = [c for c in history if "Orchestrator-Step:" in c["message"]]
    assert len(ours) == 8
    assert len({c["message"].splitlines()[-1] for c in ours}) == 8  # every marker once
    events = [h["event"] for h in snap["history"]]
    assert events[:4] == ["create", "start", "checked", "submit_input"] and events[-1] == "finished"
