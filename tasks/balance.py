"""Balance saga and simple calculation steps: each reads or writes the repository through the
facade, or publishes one calculation task, and reports one outcome.

Every commit carries the marker of (saga, step, attempt) — the step's idempotency key — so a
step delivered again after a crash between its commit and the database update finds its commit
instead of committing twice.
"""
from __future__ import annotations

import json
from typing import Any

from orchestrator import runtime
from sagas.balance.calculations import publish_task, task_message
from orchestrator.engine import Await, Done, StepContext
from orchestrator.errors import InvalidInput
from orchestrator.jsonutil import loads, unstorable
from sagas.balance.repository import FileContent, FileMissing, commit_once, open_repository, read_at_branch
from orchestrator.steps import StepError, step_task
from sagas.balance import (BALANCE_INPUT, BALANCE_OUTPUT, CALCULATE_TASK, CHECK_TASK, COMMIT_INPUTS_TASK, FINAL,
                           SAVE_INPUT_TASK, SIMPLE_CALCULATE_TASK, STEP_DEPENDENCY, SYNC_FINAL_TASK, SYNC_RESULT_TASK,
                           Dependency)


def dumps(value: Any) -> str:
    """Files the saga writes: stable formatting so the same content is the same blob. Only
    JSON: a NaN or infinity raises ValueError rather than being written as `NaN`."""
    return json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False, allow_nan=False) + "\n"


def invalid(ctx: StepContext, field: str, problem: str) -> InvalidInput:
    """An input problem the user must fix: saved on the step so the API can answer 422 naming it."""
    ctx.save(invalid={"field": field, "problem": problem})
    return InvalidInput(field, problem, status=422)


def read_json(ctx: StepContext, found: FileContent | FileMissing) -> Any:
    if isinstance(found, FileMissing):
        raise invalid(ctx, found.path, f"file not found at '{found.ref}'")
    try:
        data = loads(found.text)
    except ValueError as exc:  # nesting past the parser's depth included
        raise invalid(ctx, found.path, f"is not valid JSON: {exc}") from None
    bad = unstorable(data, "$")  # what the steps read from it is stored in the saga's context
    if bad is not None:
        raise invalid(ctx, f"{found.path}:{bad[0].removeprefix('$.')}", bad[1])
    return data


def dependency(ctx: StepContext) -> Dependency:
    return STEP_DEPENDENCY[ctx.step]


@step_task(CHECK_TASK)
def check(ctx: StepContext) -> Done:
    """Is <dep>_input.json on the branch? If not, hydrate it from balance_input.json and commit it."""
    dep = dependency(ctx)
    project, branch = ctx.input["project"], ctx.input["branch"]
    repo = open_repository(ctx.settings)
    done = repo.find_commit(project, branch, ctx.idempotency_key)
    if done is not None:  # this step committed before a crash: report that commit
        return Done("checked", {"commit": done, "hydrated": True, "file": dep.input_file})
    if isinstance(read_at_branch(repo, project, dep.input_file, branch), FileContent):
        return Done("checked", {"commit": None, "hydrated": False, "file": dep.input_file})
    balance = read_json(ctx, read_at_branch(repo, project, BALANCE_INPUT, branch))
    if not isinstance(balance, dict):
        raise invalid(ctx, BALANCE_INPUT, "must be a JSON object")
    if dep.hydrate_key not in balance:
        raise invalid(ctx, dep.hydrate_key, f"{BALANCE_INPUT} has no key '{dep.hydrate_key}' "
                      f"to hydrate {dep.input_file} from")
    result = commit_once(repo, project, branch, {dep.input_file: dumps(balance[dep.hydrate_key])},
                         f"Hydrate {dep.input_file} from {BALANCE_INPUT}", ctx.idempotency_key)
    return Done("checked", {"commit": result.sha, "hydrated": True, "file": dep.input_file})


@step_task(SAVE_INPUT_TASK)
def save_input(ctx: StepContext) -> Done:
    """Commit the user's input file, or confirm the one already on the branch."""
    dep = dependency(ctx)
    project, branch = ctx.input["project"], ctx.input["branch"]
    context = ctx.engine.snapshot(ctx.instance_id, history=False)["context"]
    submitted = (context.get("submissions") or {}).get(dep.name) or {}
    repo = open_repository(ctx.settings)
    if "content" in submitted:
        result = commit_once(repo, project, branch, {dep.input_file: dumps(submitted["content"])},
                             f"Input for the {dep.name} calculation: {dep.input_file}", ctx.idempotency_key)
        return Done("input_saved", {"commit": result.sha, "file": dep.input_file})
    read_json(ctx, read_at_branch(repo, project, dep.input_file, branch))  # confirmed: it must exist
    return Done("input_saved", {"commit": None, "file": dep.input_file})


@step_task(CALCULATE_TASK)
def calculate(ctx: StepContext) -> Await:
    """Send the calculation task; the step waits for its result (an external step keyed by the
    correlationId the engine issued: `ctx.token`)."""
    dep = dependency(ctx)
    project, branch = ctx.input["project"], ctx.input["branch"]
    repo = open_repository(ctx.settings)
    info = repo.project(project)
    head = ctx.data.get("commit") or repo.ensure_branch(project, branch)
    inputs = [BALANCE_INPUT] if dep is FINAL else [dep.input_file]
    output = BALANCE_OUTPUT if dep is FINAL else dep.output_file
    cid = ctx.token
    assert cid is not None
    # Saved before publishing: the result may come back before this task returns.
    ctx.save(correlation_id=cid, commit=head, input_files=inputs, output_file=output)
    publish_task(runtime.current().celery, ctx.settings, dep.calculation,
                 task_message(cid, info.repo_url, branch, head, inputs, output))
    return Await()


@step_task(SYNC_RESULT_TASK)
def sync_result(ctx: StepContext) -> Done:
    """Read <dep>_output.json and merge it into balance_input.json under <dep>_result."""
    dep = dependency(ctx)
    project, branch = ctx.input["project"], ctx.input["branch"]
    repo = open_repository(ctx.settings)
    calc = ctx.outputs.get(f"{dep.name}_calculation") or {}
    found = repo.read_file(project, dep.output_file, calc.get("commit") or branch)
    if isinstance(found, FileMissing):
        raise StepError(f"the {dep.name} calculation reported success but {dep.output_file} is not at {found.ref}")
    result = read_json(ctx, found)
    balance = read_json(ctx, read_at_branch(repo, project, BALANCE_INPUT, branch))
    if not isinstance(balance, dict):
        raise invalid(ctx, BALANCE_INPUT, "must be a JSON object")
    balance[dep.result_key] = result
    merged = commit_once(repo, project, branch, {BALANCE_INPUT: dumps(balance)},
                         f"Merge {dep.output_file} into {BALANCE_INPUT} under '{dep.result_key}'",
                         ctx.idempotency_key)
    return Done("synced", {"commit": merged.sha, "result": result})


@step_task(SYNC_FINAL_TASK)
def sync_final(ctx: StepContext) -> Done:
    """Read the final balance_output.json: the saga's result."""
    project = ctx.input["project"]
    calc = ctx.outputs.get("balance_calculation") or {}
    repo = open_repository(ctx.settings)
    found = repo.read_file(project, BALANCE_OUTPUT, calc.get("commit") or ctx.input["branch"])
    if isinstance(found, FileMissing):
        raise StepError(f"the balance calculation reported success but {BALANCE_OUTPUT} is not at {found.ref}")
    return Done("finished", {"result": read_json(ctx, found)})


# -- simple calculations (FR-ORCH-3) -----------------------------------------------------------------
@step_task(COMMIT_INPUTS_TASK)
def commit_inputs(ctx: StepContext) -> Done:
    repo = open_repository(ctx.settings)
    result = commit_once(repo, ctx.input["project"], ctx.input["branch"], dict(ctx.input["files"]),
                         f"Inputs of a {ctx.input['calculation']} calculation", ctx.idempotency_key)
    return Done("committed", {"commit": result.sha})


@step_task(SIMPLE_CALCULATE_TASK)
def simple_calculate(ctx: StepContext) -> Await:
    project, branch = ctx.input["project"], ctx.input["branch"]
    repo = open_repository(ctx.settings)
    info = repo.project(project)
    head = ctx.data.get("commit") or (ctx.outputs.get("commit_inputs") or {}).get("commit") \
        or repo.ensure_branch(project, branch)
    cid = ctx.token  # the calculation's id on its first run (sagas/balance/)
    assert cid is not None
    inputs = sorted(ctx.input["files"])
    ctx.save(correlation_id=cid, commit=head, input_files=inputs, output_file=ctx.input["output_file"])
    publish_task(runtime.current().celery, ctx.settings, ctx.input["calculation"],
                 task_message(cid, info.repo_url, branch, head, inputs, ctx.input["output_file"]))
    return Await()
