"""The balance saga's endpoints (seed 002) and the frontend's GitLab endpoints.

    POST /saga/calculate-balance                  start (or return the running saga of project+branch)
    GET  /saga/calculate-balance/<saga_id>        the saga's status in the start answer's shape
    POST /sagas/<saga_id>/events/submit_input     the user's input; answers the next status
    POST /calculations, GET /calculations/<id>    simple calculations (FR-ORCH-3)
    GET  /issues                                  issues assigned to the user in X-User (FR-ORCH-4)
    GET  /geometries?project=&ref=                geometries_manifest.json, validated (FR-ORCH-5)
    POST /merge-requests                          create (or return the open) merge request (FR-ORCH-6)

Starting and answering wait (bounded) for the repository work the request triggers — the
hydration commit, the user's commit — never for a calculation.
"""
from __future__ import annotations

import fcntl
import os
import tempfile
import time
import zlib
from contextlib import contextmanager
from typing import Any, Iterator

from flask import Blueprint, request
from sqlalchemy import select, text

from orchestrator.errors import InvalidInput, NotFound, Unauthorized
from orchestrator.models import WorkflowInstance
from sagas.balance.repository import check_branch_name, check_names_free, check_project, geometries, open_repository
from sagas.balance import STATE_ROLES, BalanceRequest, BalanceSaga, CalculationRequest, SimpleCalculation, Submission

from . import actor, body, json_body, query, runtime
from .auth import USER_CHALLENGE, USER_HEADER
from .openapi import doc
from .schemas import (BalanceStatus, CalculationStatus, Geometries, GeometriesQuery, IdempotencyHeader, Issues,
                      MergeRequest, MergeRequestBody, SignalPayload, UserHeader)

bp = Blueprint("balance", __name__)

#: How long a request waits for the repository work it triggered before answering "running".
SETTLE_SECONDS = 20.0
#: Roles whose steps only touch the repository: a request waits for them to finish.
_REPOSITORY_ROLES = {"check": "AWAIT_USER", "save": "CALCULATION"}


def _settle(saga_id: str, roles: set[str], timeout: float = SETTLE_SECONDS) -> dict[str, Any]:
    engine = runtime().engine
    deadline = time.monotonic() + timeout
    delay = 0.02
    while True:
        snap = engine.snapshot(saga_id)
        role = STATE_ROLES.get(snap["state"] or "", ("", ""))[1]
        if snap["state"] not in ("NEW",) and role not in roles:
            return snap
        if time.monotonic() >= deadline:
            return snap
        time.sleep(delay)
        delay = min(0.25, delay * 1.5)


def _next_calculation(chain: list[str], dep: str) -> str:
    i = chain.index(dep) + 1 if dep in chain else len(chain)
    return f"{chain[i].upper()}_CALCULATION" if i < len(chain) else "BALANCE_CALCULATION"


def balance_status(snap: dict[str, Any]) -> dict[str, Any]:
    """The seed's answer: {saga_id, status, state, next_step, commit} (+ result or error)."""
    state = snap["state"] or "NEW"
    ctx = snap["context"] or {}
    chain = list((ctx.get("input") or {}).get("dependencies") or [])
    dep, role = STATE_ROLES.get(state, ("", ""))
    commits = ctx.get("commits") or []
    status, next_step, commit = "running", None, commits[-1]["commit"] if commits else None
    # commit: what the step before this status wrote (hydration, the user's file, the output)
    made_by = {"check": f"CHECK_{dep.upper()}", "await": f"CHECK_{dep.upper()}",
               "save": f"SAVE_{dep.upper()}_INPUT", "calc": f"SAVE_{dep.upper()}_INPUT",
               "sync": f"{dep.upper()}_CALCULATION"}.get(role)
    if made_by is not None:
        commit = next((c["commit"] for c in reversed(commits) if c["state"] == made_by), None)
    if role in ("check", "await", "save"):
        next_step = f"{dep.upper()}_CALCULATION"
        if role == "await":
            status = "user_input_required"
    elif role in ("calc", "sync"):
        next_step = _next_calculation(chain, dep)
    elif state == "NEW":
        next_step = f"{chain[0].upper()}_CALCULATION" if chain else "BALANCE_CALCULATION"
    elif state == "COMPLETED":
        status = "completed"
    elif state == "FAILED":
        status = "failed"
    elif state == "CANCELLED":
        status = "cancelled"
    out: dict[str, Any] = {"saga_id": snap["id"], "status": status, "state": state, "next_step": next_step,
                           "commit": commit}
    if status == "completed":
        out["result"] = ctx.get("result")
    if status == "failed":
        out["error"] = ctx.get("error")
        out["failed_step"] = ctx.get("failed_step")
    return out


def _answer(snap: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """200 with the status; a saga failed by the user's data is a 422 naming the field."""
    body = balance_status(snap)
    if body["status"] == "failed":
        step = next((s for s in snap.get("steps") or [] if s["name"] == body.get("failed_step")), None)
        invalid = (step or {}).get("data", {}).get("invalid")
        if invalid:
            return {**body, "error": "invalid_input", "message": f"{invalid['field']}: {invalid['problem']}",
                    "field": invalid["field"], "problem": invalid["problem"]}, 422
    if body["status"] == "running" and STATE_ROLES.get(body["state"], ("", ""))[1] in _REPOSITORY_ROLES:
        return body, 202  # still writing to the repository (a retry is pending): poll the status
    return body, 200


@contextmanager
def _start_lock(project: str, branch: str) -> Iterator[None]:
    """Serialise starts for one project and branch: a PostgreSQL advisory lock, or on SQLite (the
    one-machine dev runner) a file lock shared by the API's processes."""
    rt = runtime()
    if rt.settings.is_sqlite:
        path = os.path.join(tempfile.gettempdir(), "orchestrator-balance-start.lock")
        with open(path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield
        return
    with rt.sessions() as s, s.begin():
        key = zlib.crc32(f"calculate-balance:{project}@{branch}".encode())
        s.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": key})
        yield


def _unfinished(type_name: str, project: str, branch: str) -> list[tuple[str, dict[str, Any]]]:
    """(id, input) of the unfinished instances of `type_name` on `branch` of `project`, oldest
    first; the database picks them by their input's project and branch."""
    given = WorkflowInstance.context["input"]
    with runtime().sessions() as s:
        rows = s.execute(select(WorkflowInstance.id, WorkflowInstance.context).where(
            WorkflowInstance.type == type_name, WorkflowInstance.finished.is_(False),
            given["project"].as_string() == project, given["branch"].as_string() == branch)
            .order_by(WorkflowInstance.created_at)).all()
    return [(str(row.id), (row.context or {}).get("input") or {}) for row in rows]


def _running_saga(project: str, branch: str) -> str | None:
    return next((saga_id for saga_id, _ in _unfinished(BalanceSaga.type, project, branch)), None)


BALANCE = ("balance",)
GITLAB = ("gitlab",)


def _pending_paths(project: str, branch: str) -> list[str]:
    """The files the simple calculations still running on `branch` of `project` will write (their
    inputs, if not committed yet, and their outputs): a new calculation must fit beside them."""
    out: list[str] = []
    for _, given in _unfinished(SimpleCalculation.type, project, branch):
        out += [*(given.get("files") or {}), given.get("output_file") or ""]
    return [p for p in out if p]


def _issue_branch_project(project: str, branch: str, what: str, paths: dict[str, list[str]] | None = None,
                          pending: bool = False) -> str:
    """The project's path; 404 for an unknown project (502 when GitLab fails), 400 naming `branch`
    when it is the project's default branch (`what` commits there, and every issue branch made
    from it afterwards would carry those commits) or when an existing branch stands in the way of
    creating it, 400 naming the field of a path in `paths` ({field: [path, ...]}) that cannot be
    written beside the branch's files, or (`pending`) beside what the calculations still running on
    it will write (repository.check_names_free): refused before anything starts, not by git once
    the work runs."""
    repo = open_repository(runtime().settings)
    info = repo.project(project)
    if branch == info.default_branch:
        raise InvalidInput("branch", f"is the default branch of {info.path}; {what} works on an issue branch "
                                     "(its results reach the default branch through a merge request)")
    check_names_free(repo, info.path, branch, paths, _pending_paths(info.path, branch) if pending else None)
    return info.path


@bp.post("/saga/calculate-balance")
@doc(BalanceStatus, also={202: BalanceStatus}, errors=(400, 404, 409, 422, 502), json=BalanceRequest,
     headers=IdempotencyHeader, tags=BALANCE)
def start_balance() -> Any:
    """Start the balance saga on an issue branch (or answer its running saga); 202 while the
    repository work it triggered is still being retried, 422 when the user's data is at fault."""
    body = json_body()
    who = actor("X-User")  # checked before anything is written
    rt = runtime()
    data = BalanceSaga.validate_input(body, rt.settings)
    data["project"] = _issue_branch_project(data["project"], data["branch"], "the saga")
    idempotency_key = request.headers.get("Idempotency-Key")
    with _start_lock(data["project"], data["branch"]):
        # a key already used answers its own saga (409 for another request) before the branch's
        # running saga does: one key never answers two sagas
        saga_id = None if idempotency_key is None else rt.engine.started_with(BalanceSaga.type, data, idempotency_key)
        saga_id = saga_id or _running_saga(data["project"], data["branch"])
        if saga_id is None:
            snap, _ = rt.engine.start(BalanceSaga.type, data, idempotency_key=idempotency_key, actor=who)
            saga_id = snap["id"]
    return _answer(_settle(saga_id, {"check"}))


@bp.get("/saga/calculate-balance/<saga_id>")
@doc(BalanceStatus, errors=(400, 404), tags=BALANCE)
def balance_saga_status(saga_id: str) -> Any:
    snap = runtime().engine.snapshot(saga_id)
    if snap["type"] != BalanceSaga.type:
        raise NotFound(f"saga {saga_id} is not a calculate-balance saga", saga_id=saga_id)
    return balance_status(snap)


@bp.post("/sagas/<instance:instance_id>/events/submit_input")
@doc(BalanceStatus, also={202: BalanceStatus}, errors=(400, 404, 409, 422, 502), json=Submission,
     tags=BALANCE)
def submit_input(instance_id: str) -> Any:
    """The user's input for the dependency the saga waits for (other workflows: the generic
    signal's answer)."""
    engine = runtime().engine
    snap = engine.snapshot(instance_id, history=False)
    if snap["type"] != BalanceSaga.type:
        from .sagas import fire_event  # other workflows keep the generic answer

        return fire_event(instance_id, "submit_input")
    # The checks (fields, chain, and that the saga waits for this input) are the signal's own:
    # sagas.balance.check_submission, run under the saga's lock.
    engine.signal(instance_id, "submit_input", body(SignalPayload).root,
                  actor=actor("X-User"))
    return _answer(_settle(instance_id, {"save"}))


# -- simple calculations (FR-ORCH-3) -------------------------------------------------------------------
def _calculation_status(snap: dict[str, Any]) -> dict[str, Any]:
    """`task` is null until the inputs are committed. From then on it shows the task the
    calculation step sends: each value is fixed when the step is entered (its token is the
    correlationId, the inputs' commit, the request's files), so the answer has them before the
    worker process running the step has published and saved them."""
    ctx = snap["context"] or {}
    state = snap["state"]
    status = {"COMPLETED": "completed", "FAILED": "failed", "CANCELLED": "cancelled"}.get(state, "running")
    calc = next((s for s in snap.get("steps") or [] if s["name"] == "calculation"), None)
    commit_step = next((s for s in snap.get("steps") or [] if s["name"] == "commit_inputs"), None)
    input_commit = ((commit_step or {}).get("data", {}).get("output") or {}).get("commit")
    task = None
    if calc is not None:
        sent, inp = calc.get("data") or {}, ctx.get("input") or {}
        known = {"correlation_id": sent.get("token"), "commit": input_commit,
                 "input_files": sorted(inp.get("files") or {}), "output_file": inp.get("output_file")}
        task = {k: sent[k] if sent.get(k) is not None else v for k, v in known.items()}
    return {"correlationId": snap["id"], "status": status, "state": state, "input_commit": input_commit,
            "task": task, "output_commit": ctx.get("output_commit"), "error": ctx.get("error")}


@bp.post("/calculations")
@doc(CalculationStatus, status=201, also={200: CalculationStatus}, errors=(400, 404, 409, 502),
     json=CalculationRequest, headers=IdempotencyHeader, tags=BALANCE)
def start_calculation() -> Any:
    """A simple calculation: commit the inputs, send one task."""
    body = json_body()
    who = actor("X-User")  # checked before anything is written
    rt = runtime()
    data = SimpleCalculation.validate_input(body, rt.settings)
    data["project"] = _issue_branch_project(data["project"], data["branch"], "a calculation",
                                            {"files": list(data["files"]), "output_file": [data["output_file"]]},
                                            pending=True)
    snap, created = rt.engine.start(SimpleCalculation.type, data,
                                    idempotency_key=request.headers.get("Idempotency-Key"), actor=who)
    deadline = time.monotonic() + SETTLE_SECONDS
    while snap["state"] in ("NEW", "COMMIT_INPUTS") and time.monotonic() < deadline:
        time.sleep(0.05)
        snap = rt.engine.snapshot(snap["id"])
    return _calculation_status(snap), (201 if created else 200)


@bp.get("/calculations/<correlation_id>")
@doc(CalculationStatus, errors=(400, 404), tags=BALANCE)
def calculation_status(correlation_id: str) -> Any:
    try:
        snap = runtime().engine.snapshot(correlation_id)
    except NotFound:
        raise NotFound(f"no calculation with correlationId {correlation_id}", correlationId=correlation_id) from None
    if snap["type"] != SimpleCalculation.type:
        raise NotFound(f"no calculation with correlationId {correlation_id}", correlationId=correlation_id)
    return _calculation_status(snap)


# -- frontend: issues, geometries, merge requests (FR-ORCH-4..6) --------------------------------------
@bp.get("/issues")
@doc(Issues, errors=(400, 401, 502), headers=UserHeader, tags=GITLAB)
def assigned_issues() -> Any:
    """Open issues assigned to the user the API gateway passes in X-User (401 without it)."""
    user = (request.headers.get("X-User") or "").strip()
    if not user:
        raise Unauthorized("X-User: the API gateway must pass the authenticated user's GitLab username",
                           USER_CHALLENGE, field=USER_HEADER)
    actor("X-User")  # the same bound as on every balance route: 400 naming X-User when longer
    issues = open_repository(runtime().settings).assigned_issues(user)
    return {"user": user, "issues": issues}


@bp.get("/geometries")
@doc(Geometries, errors=(400, 404, 422, 502), query=GeometriesQuery, tags=GITLAB)
def list_geometries() -> Any:
    """Geometries from geometries_manifest.json, validated (422 naming the place at fault)."""
    q = query(GeometriesQuery)
    project = check_project(q.project)
    ref = check_branch_name(q.ref, "ref") if q.ref is not None else None
    repo = open_repository(runtime().settings)
    info = repo.project(project)
    return {"project": info.path, "ref": ref or info.default_branch, "geometries": geometries(repo, project, ref)}


@bp.post("/merge-requests")
@doc(MergeRequest, status=201, also={200: MergeRequest}, errors=(400, 404, 422, 502), json=MergeRequestBody,
     tags=GITLAB)
def create_merge_request() -> Any:
    """Create a merge request (or answer the open one for that source branch)."""
    req = body(MergeRequestBody)
    project, source, target, title = req.project, req.source_branch, req.target_branch, req.title
    if target == source:  # a rule across two fields
        raise InvalidInput("target_branch", "must differ from source_branch")
    mr = open_repository(runtime().settings).create_merge_request(project, source, target, title.strip())
    return {**mr.as_dict(), "created": mr.created}, (201 if mr.created else 200)
