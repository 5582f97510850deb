"""The balance calculation saga (seed 002) and simple calculations (FR-ORCH-3).

For every dependency of the chain, in order:

    CHECK_<DEP>                 <dep>_input.json on the branch? if not, hydrate it from
                                balance_input.json[<dep>] and commit it
    AWAIT_USER_<DEP>_INPUT      stop; the user submits the file's content or confirms the hydrated one
    SAVE_<DEP>_INPUT            commit the user's file (nothing to commit when confirmed)
    <DEP>_CALCULATION           one task on RabbitMQ; the step waits for its result
    SYNC_<DEP>_RESULT           read <dep>_output.json, merge it into balance_input.json under
                                <dep>_result, commit

then BALANCE_CALCULATION (input balance_input.json, output balance_output.json) and
SYNC_BALANCE_RESULT, then COMPLETED. The chain is data: `CATALOG` declares each dependency's files,
hydration key and calculation type; a request picks an ordered list of them (default: `DEFAULT_CHAIN`).
The machine has the states of every catalogued dependency; guards follow the request's chain.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import timedelta
from typing import Annotated, Any

from pydantic import BeforeValidator, Field, WithJsonSchema
from statemachine import State

from orchestrator.config import Settings
from orchestrator.errors import Conflict, InvalidInput
from orchestrator.schemas import Closed, JsonObject, SchemaPattern, StorableJson, omittable, parse
from orchestrator.workflow import External, Retry, Step, Workflow, register

from .calculations import correlation_id
from .repository import (MAX_PATH_CHARS, PROJECT_PATTERN, branch_pattern, check_branch_name, check_project,
                         check_repository_path, check_repository_paths, repository_path_pattern)

#: The steps' Celery task names, written once: tasks/balance.py registers its tasks under them.
CHECK_TASK, SAVE_INPUT_TASK = "balance.check", "balance.save_input"
CALCULATE_TASK, SYNC_RESULT_TASK, SYNC_FINAL_TASK = "balance.calculate", "balance.sync_result", "balance.sync_final"
COMMIT_INPUTS_TASK, SIMPLE_CALCULATE_TASK = "calculation.commit_inputs", "calculation.calculate"

BALANCE_INPUT = "balance_input.json"
BALANCE_OUTPUT = "balance_output.json"


@dataclass(frozen=True)
class Dependency:
    """One calculation the balance depends on, and how its input is made."""

    name: str
    calculation: str  # the task's calculation type (routing key calculation.<type>)

    @property
    def label(self) -> str:
        return self.name.upper()

    @property
    def input_file(self) -> str:
        return f"{self.name}_input.json"

    @property
    def hydrate_key(self) -> str:
        """The key of balance_input.json the input is hydrated from."""
        return self.name

    @property
    def output_file(self) -> str:
        return f"{self.name}_output.json"

    @property
    def result_key(self) -> str:
        """The key of balance_input.json the output is merged under."""
        return f"{self.name}_result"


CATALOG: dict[str, Dependency] = {d.name: d for d in (
    Dependency("condenser", "condenser"),
    Dependency("evaporator", "evaporator"),
    Dependency("compressor", "compressor"),
)}
DEFAULT_CHAIN = ("condenser", "evaporator", "compressor")
FINAL = Dependency("balance", "balance")  # the final calculation: balance_input.json -> balance_output.json

# What the calculation steps retry on: GitLab 5xx, timeouts and connection errors, with backoff.
GIT_RETRY = Retry(attempts=6, backoff=0.5, factor=2.0, max_delay=30.0)
CALCULATION_TIMEOUT = timedelta(hours=1)
#: A calculation step waits for its result on the results queue (sagas/balance/calculations.py),
#: keyed by the task's correlationId: the engine's token for the step. A task not answered within
#: the step's lease is sent again with the same correlationId (docs/balance.md).
AWAIT_RESULT = External(token="calculation_correlation_id", resend=True)


def _dep_states(dep: Dependency) -> dict[str, str]:
    u = dep.label
    return {"check": f"CHECK_{u}", "await": f"AWAIT_USER_{u}_INPUT", "save": f"SAVE_{u}_INPUT",
            "calc": f"{u}_CALCULATION", "sync": f"SYNC_{u}_RESULT"}


#: state id -> (dependency name, role); role is check / await / save / calc / sync / final / final_sync
STATE_ROLES: dict[str, tuple[str, str]] = {}
#: step name -> dependency (FINAL for the final calculation)
STEP_DEPENDENCY: dict[str, Dependency] = {}


def step_names(dep: Dependency) -> dict[str, str]:
    return {"check": f"check_{dep.name}", "save": f"save_{dep.name}_input",
            "calc": f"{dep.name}_calculation", "sync": f"sync_{dep.name}_result"}


def _build_balance_saga() -> type[Workflow]:
    ns: dict[str, Any] = {}
    new = State(initial=True)
    final_calc, final_sync = State(), State()
    completed, failed, cancelled = State(final=True), State(), State(final=True)
    ns.update(NEW=new, BALANCE_CALCULATION=final_calc, SYNC_BALANCE_RESULT=final_sync,
              COMPLETED=completed, FAILED=failed, CANCELLED=cancelled)
    STATE_ROLES["BALANCE_CALCULATION"] = (FINAL.name, "final")
    STATE_ROLES["SYNC_BALANCE_RESULT"] = (FINAL.name, "final_sync")
    steps: dict[State, Step] = {
        final_calc: Step(CALCULATE_TASK, name="balance_calculation", retry=GIT_RETRY,
                         timeout=CALCULATION_TIMEOUT, external=AWAIT_RESULT, join="calculated"),
        final_sync: Step(SYNC_FINAL_TASK, name="sync_balance_result", retry=GIT_RETRY),
    }
    STEP_DEPENDENCY["balance_calculation"] = FINAL
    STEP_DEPENDENCY["sync_balance_result"] = FINAL
    per_dep: dict[str, dict[str, State]] = {}
    for dep in CATALOG.values():
        ids = _dep_states(dep)
        states = {role: State() for role in ids}
        per_dep[dep.name] = states
        for role, sid in ids.items():
            ns[sid] = states[role]
            STATE_ROLES[sid] = (dep.name, role)
        names = step_names(dep)
        steps[states["check"]] = Step(CHECK_TASK, name=names["check"], retry=GIT_RETRY)
        steps[states["save"]] = Step(SAVE_INPUT_TASK, name=names["save"], retry=GIT_RETRY)
        steps[states["calc"]] = Step(CALCULATE_TASK, name=names["calc"], retry=GIT_RETRY,
                                     timeout=CALCULATION_TIMEOUT, external=AWAIT_RESULT, join="calculated")
        steps[states["sync"]] = Step(SYNC_RESULT_TASK, name=names["sync"], retry=GIT_RETRY)
        for name in names.values():
            STEP_DEPENDENCY[name] = dep

    checks = [s["check"] for s in per_dep.values()]
    step_states = list(steps)
    active = [new, *step_states, *(s["await"] for s in per_dep.values())]

    def union(transitions: list[Any]) -> Any:
        out = transitions[0]
        for t in transitions[1:]:
            out = out | t
        return out

    ns["start"] = union([new.to(t, cond="is_next") for t in [*checks, final_calc]])
    ns["checked"] = union([s["check"].to(s["await"]) for s in per_dep.values()])
    ns["submit_input"] = union([s["await"].to(s["save"], cond="input_is_for_this_step")
                                for s in per_dep.values()])
    ns["input_saved"] = union([s["save"].to(s["calc"]) for s in per_dep.values()])
    ns["calculated"] = union([s["calc"].to(s["sync"]) for s in per_dep.values()] + [final_calc.to(final_sync)])
    ns["synced"] = union([s["sync"].to(t, cond="is_next") for s in per_dep.values() for t in [*checks, final_calc]])
    ns["finished"] = final_sync.to(completed)
    ns["fail"] = union([s.to(failed) for s in [new, *step_states]])
    ns["restart"] = failed.to(*step_states, cond="is_restart_target")
    ns["cancel"] = union([s.to(cancelled) for s in [*active, failed]])
    ns["steps"] = steps
    ns["__module__"] = __name__
    ns["__qualname__"] = "BalanceSaga"
    return type("BalanceSaga", (_BalanceBase,), ns)


# -- schemas: the request bodies (seed 002, docs/balance.md) -------------------------------------
# GitLab's own naming rules (repository.check_project, check_branch_name) run as the fields'
# validators: they raise InvalidInput naming the field themselves.
Project = Annotated[str, BeforeValidator(check_project), WithJsonSchema(
    {"anyOf": [{"type": "string", "minLength": 1, "maxLength": MAX_PATH_CHARS, "pattern": PROJECT_PATTERN},
               {"type": "integer", "minimum": 0}],
     "description": "a project id or path such as demo/balance"})]
Branch = Annotated[str, BeforeValidator(check_branch_name), SchemaPattern(branch_pattern),
                   Field(description="a git branch name such as issue/42-new-calculation")]
#: A file path in the repository (`check_repository_path`).
RepositoryPath = Annotated[str, SchemaPattern(repository_path_pattern)]


class BalanceRequest(Closed):
    """POST /saga/calculate-balance. Unknown fields are refused."""

    project: Project
    branch: Branch
    dependencies: list[str] = omittable(description="the chain, in order; the catalog's default when absent",
                                        json_schema_extra={"items": {"enum": list(CATALOG)}, "uniqueItems": True})


class Submission(Closed):
    """POST /sagas/<saga_id>/events/submit_input: `{"step", "content"}` or `{"step", "use_hydrated": true}`."""

    step: str = Field(description="the dependency the input is for (case-insensitive)")
    # An object: the file holds the dependency's parameters by name (seed 002's example, the
    # emulated worker); a string, number or array would be committed and "calculated" to 0.0.
    content: JsonObject = omittable(description="the input file's content: a JSON object of the "
                                                    "dependency's parameters")
    use_hydrated: bool = omittable()


#: The longest calculation type: a name like a workflow's step and state names (64 characters in
#: their columns), and well inside AMQP's 255-byte routing key (`calculation.<type>`).
MAX_CALCULATION_TYPE = 64
#: Input files of one simple calculation: one commit, and each is named in the task message.
MAX_CALCULATION_FILES = 1000


def _document_files(schema: dict[str, Any]) -> None:
    # the pattern is made when the schema is (see SchemaPattern); keys typed as RepositoryPath
    # would come out as patternProperties, which do not refuse the other keys
    schema.update(minProperties=1, maxProperties=MAX_CALCULATION_FILES,
                  propertyNames={"minLength": 1, "pattern": repository_path_pattern()})


class CalculationRequest(Closed):
    """POST /calculations. Unknown fields are refused."""

    project: Project
    branch: Branch
    files: dict[str, StorableJson] = Field(
        description="{path: content} of the input files (a string, or JSON written as such), at most "
                    f"{MAX_CALCULATION_FILES}; no path the directory of another",
        json_schema_extra=_document_files)
    output_file: RepositoryPath
    calculation: str = Field("generic", pattern=r"^[A-Za-z0-9_-]+$", max_length=MAX_CALCULATION_TYPE,
                             description="the calculation type (the task's routing key is calculation.<type>)")


def check_submission(payload: dict[str, Any], instance: Any) -> dict[str, Any]:
    """The user's input for the dependency the saga waits for (seed 002, docs/balance.md):
    `{"step": "<DEP>", "content": {<JSON object>}}` or `{"step": "<DEP>", "use_hydrated": true}`.

    `instance` is the saga's row (its `state` and `context`). Returns the payload of the
    `submit_input` signal, `step` lower-cased. Raises InvalidInput naming the field (400), or
    Conflict with `state` and `field: "step"` (409) when the saga does not wait for that input.
    """
    sub = parse(Submission, payload)
    chain = instance.context["input"]["dependencies"]
    step = sub.step.strip().lower()
    if step not in CATALOG:
        named = f"unknown dependency '{json.dumps(sub.step[:80])[1:-1]}'" if step else "is required"
        raise InvalidInput("step", f"{named}: the dependency the input is for, one of "
                           + ", ".join(d.upper() for d in chain))
    if step not in chain:
        raise InvalidInput("step", f"'{step.upper()}' is not in this saga's chain: "
                           + ", ".join(d.upper() for d in chain))
    has_content = "content" in sub.model_fields_set  # rules across fields, and on the saga's chain
    if has_content == bool(sub.use_hydrated):
        raise InvalidInput("content", "send either 'content' (the input file's JSON) or 'use_hydrated': true")
    dep, role = STATE_ROLES.get(instance.state or "", ("", ""))
    if role != "await" or dep != step:
        waiting = f"it waits for {dep.upper()} input" if role == "await" else "it is not waiting for input"
        raise Conflict(f"input for {step.upper()} refused: {waiting} (state {instance.state})",
                       state=instance.state, field="step")
    return {"step": step, **({"content": sub.content} if has_content else {"use_hydrated": True})}


class _BalanceBase(Workflow):
    """Behaviour of the balance saga; the states and transitions are generated from CATALOG."""

    type = "calculate-balance"
    start_event = "start"
    success_states = frozenset({"COMPLETED"})
    failure_states = frozenset({"FAILED"})
    signals = {"submit_input": check_submission}
    started_by = "POST /saga/calculate-balance"

    def calculation_correlation_id(self, step: str, index: int, item: Any, restarts: int) -> str:
        """The correlationId of a calculation task: derived from the step's idempotency key, so
        a retry publishes the same one and a restart a new one."""
        return correlation_id(f"{self.model.id}:{step}:{restarts}")

    # -- guards --------------------------------------------------------------------------------
    def next_state_after(self, state_id: str) -> str:
        chain = list(self.model.context["input"]["dependencies"])
        if state_id == "NEW":
            i = 0
        else:
            i = chain.index(STATE_ROLES[state_id][0]) + 1
        return _dep_states(CATALOG[chain[i]])["check"] if i < len(chain) else "BALANCE_CALCULATION"

    def is_next(self, source: State, target: State) -> bool:
        return target.id == self.next_state_after(source.id)

    def input_is_for_this_step(self, source: State, payload: dict[str, Any] | None = None) -> bool:
        return STATE_ROLES[source.id][0] == str((payload or {}).get("step", "")).lower()

    # -- context -------------------------------------------------------------------------------
    def after_transition(self, event: str, source: State, target: State,
                         payload: dict[str, Any] | None = None) -> None:
        payload = payload or {}
        event = str(getattr(event, "id", event))
        ctx = self.context
        if event == "submit_input":
            dep = STATE_ROLES[source.id][0]
            ctx.setdefault("submissions", {})[dep] = {
                k: payload[k] for k in ("content", "use_hydrated") if k in payload}
        commit = payload.get("commit")
        if isinstance(commit, str) and commit:
            ctx.setdefault("commits", []).append({"state": source.id, "event": event, "commit": commit})
        if event == "finished":
            ctx["result"] = payload.get("result")

    def on_enter_FAILED(self, payload: dict[str, Any] | None = None) -> None:
        self.context["error"] = (payload or {}).get("error")
        self.context["failed_step"] = (payload or {}).get("step")

    def on_exit_FAILED(self) -> None:
        self.context.pop("error", None)
        self.context.pop("failed_step", None)

    @classmethod
    def validate_input(cls, data: Any, settings: Settings) -> dict[str, Any]:
        req = parse(BalanceRequest, data)
        project, branch = req.project, req.branch
        chain = list(DEFAULT_CHAIN) if req.dependencies is None else req.dependencies
        chain = [d.strip().lower() for d in chain]
        for d in chain:
            if d not in CATALOG:
                raise InvalidInput("dependencies", f"unknown dependency '{d}'; known: {', '.join(CATALOG)}")
        if len(set(chain)) != len(chain):
            raise InvalidInput("dependencies", "a dependency is listed twice")
        return {"project": project, "branch": branch, "dependencies": chain}


BalanceSaga = register(_build_balance_saga())


@register
class SimpleCalculation(Workflow):
    """FR-ORCH-3: commit the inputs, send exactly one task, wait for its result."""

    type = "simple-calculation"
    start_event = "start"
    success_states = frozenset({"COMPLETED"})
    failure_states = frozenset({"FAILED"})
    signals: dict[str, Any] = {}  # no user input: commit, calculate, report
    started_by = "POST /calculations"

    NEW = State(initial=True)
    COMMIT_INPUTS = State()
    CALCULATION = State()
    COMPLETED = State(final=True)
    FAILED = State()
    CANCELLED = State(final=True)

    start = NEW.to(COMMIT_INPUTS)
    committed = COMMIT_INPUTS.to(CALCULATION)
    calculated = CALCULATION.to(COMPLETED)
    fail = COMMIT_INPUTS.to(FAILED) | CALCULATION.to(FAILED)
    restart = FAILED.to(COMMIT_INPUTS, CALCULATION, cond="is_restart_target")
    cancel = NEW.to(CANCELLED) | COMMIT_INPUTS.to(CANCELLED) | CALCULATION.to(CANCELLED) | FAILED.to(CANCELLED)

    steps = {
        COMMIT_INPUTS: Step(COMMIT_INPUTS_TASK, name="commit_inputs", retry=GIT_RETRY),
        CALCULATION: Step(SIMPLE_CALCULATE_TASK, name="calculation", retry=GIT_RETRY,
                          timeout=CALCULATION_TIMEOUT, external=AWAIT_RESULT, join="calculated"),
    }

    def calculation_correlation_id(self, step: str, index: int, item: Any, restarts: int) -> str:
        """The first run's correlationId is the calculation's id, so its status is found by it
        (GET /calculations/<correlationId>); a restart sends a new one."""
        return self.model.id if restarts == 0 else correlation_id(f"{self.model.id}:{step}:{restarts}")

    def after_transition(self, event: str, source: State, payload: dict[str, Any] | None = None) -> None:
        event = str(getattr(event, "id", event))
        commit = (payload or {}).get("commit")
        if isinstance(commit, str) and commit:
            self.context.setdefault("commits", []).append({"state": source.id, "event": event, "commit": commit})
        if event == "calculated":
            self.context["output_commit"] = commit

    def on_enter_FAILED(self, payload: dict[str, Any] | None = None) -> None:
        self.context["error"] = (payload or {}).get("error")

    def on_exit_FAILED(self) -> None:
        self.context.pop("error", None)

    @classmethod
    def validate_input(cls, data: Any, settings: Settings) -> dict[str, Any]:
        req = parse(CalculationRequest, data)
        project, branch, files = req.project, req.branch, req.files
        if not files:
            raise InvalidInput("files", "is required: an object {path: content} of the input files")
        if len(files) > MAX_CALCULATION_FILES:
            raise InvalidInput("files", f"at most {MAX_CALCULATION_FILES} files, got {len(files)}")
        out_files: dict[str, str] = {}
        check_repository_paths(list(files), "files")
        for path, content in files.items():
            if isinstance(content, str):
                out_files[path] = content
            else:
                out_files[path] = json.dumps(content, indent=2, sort_keys=True, allow_nan=False) + "\n"
        output = check_repository_path(req.output_file, "output_file")
        if output in out_files:
            raise InvalidInput("output_file", "must not be one of the input files")
        try:
            check_repository_paths([*out_files, output], "output_file")
        except InvalidInput as exc:  # a file of the same name as the output's directory, or inverse
            raise InvalidInput("output_file", exc.problem) from None
        calc = req.calculation
        return {"project": project, "branch": branch, "files": out_files, "output_file": output,
                "calculation": calc}
