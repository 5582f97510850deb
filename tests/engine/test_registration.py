"""A workflow that names a task, event, state or method that does not exist stops registration
(or start-up, for tasks) with the workflow's name and the misspelled name."""
from __future__ import annotations

import pytest
from statemachine import State

from engine.workflows import reserve
from orchestrator.errors import WorkflowDefinitionError
from orchestrator.config import Settings
from orchestrator.runtime import make_celery
from orchestrator.workflow import Registry, Step, Workflow


def _workflow(type_name: str, step: Step, **attrs) -> type[Workflow]:
    a, b, c = State(initial=True), State(), State(final=True)
    ns = {"type": type_name, "start_event": "go", "a": a, "b": b, "c": c,
          "go": a.to(b), "finish": b.to(c), "fail": b.to(c), "steps": {b: step}, **attrs}
    return type("Typo", (Workflow,), ns)


def test_a_misspelled_join_event_fails_to_register():
    cls = _workflow("typo-join", Step(reserve, fanout="items", join="finsh"), items=lambda self: [])
    with pytest.raises(WorkflowDefinitionError) as err:
        Registry().register(cls)
    assert err.value.workflow == "typo-join" and err.value.name == "finsh" and err.value.kind == "event"
    assert "typo-join" in str(err.value) and "finsh" in str(err.value)


def test_a_misspelled_start_event_or_failure_event_fails_to_register():
    with pytest.raises(WorkflowDefinitionError, match="'gogo'"):
        Registry().register(_workflow("typo-start", Step(reserve), start_event="gogo"))
    with pytest.raises(WorkflowDefinitionError, match="'fial'"):
        Registry().register(_workflow("typo-fail", Step(reserve, on_failure="fial")))


def test_a_misspelled_state_or_method_fails_to_register():
    with pytest.raises(WorkflowDefinitionError, match="'dnoe'"):
        Registry().register(_workflow("typo-state", Step(reserve), success_states=frozenset({"dnoe"})))
    with pytest.raises(WorkflowDefinitionError, match="'itmes'"):
        Registry().register(_workflow("typo-method", Step(reserve, fanout="itmes", join="finish")))


def test_a_misspelled_task_fails_at_start_up_naming_both():
    registry = Registry()
    registry.register(_workflow("typo-task", Step("inproc.reserv")))
    with pytest.raises(WorkflowDefinitionError) as err:
        registry.check_tasks(set(make_celery(Settings()).tasks.keys()))
    assert (err.value.workflow, err.value.kind, err.value.name) == ("typo-task", "task", "inproc.reserv")


def test_a_step_given_the_task_object_names_it_once():
    registry = Registry()
    cls = registry.register(_workflow("by-object", Step(reserve)))
    assert cls.step_table()["b"].task == "inproc.reserve"
    registry.check_tasks(set(make_celery(Settings()).tasks.keys()))  # found


def test_a_step_whose_state_does_not_take_its_failure_event_fails_to_register():
    """The engine fires a failed step's on_failure (default `fail`) from the step's state. A
    workflow without it registered, and its first failed step raised "unknown event 'fail'" in
    the worker: the instance stayed running, its step was run again at every lease, for ever."""
    a, b, c = State(initial=True), State(), State(final=True)
    ns = {"type": "no-fail", "start_event": "go", "a": a, "b": b, "c": c, "go": a.to(b), "finish": b.to(c),
          "steps": {b: Step(reserve)}}
    with pytest.raises(WorkflowDefinitionError) as err:
        Registry().register(type("NoFail", (Workflow,), ns))
    assert (err.value.workflow, err.value.kind, err.value.name) == ("no-fail", "event", "fail")
    assert "state 'b' does not take" in str(err.value) and "known: finish" in str(err.value)

    # the event exists, but not from the step's state
    a, b, c, d = State(initial=True), State(), State(), State(final=True)
    ns = {"type": "fail-elsewhere", "start_event": "go", "a": a, "b": b, "c": c, "d": d, "go": a.to(b),
          "next": b.to(c), "fail": c.to(d), "steps": {b: Step(reserve)}}
    with pytest.raises(WorkflowDefinitionError, match="state 'b' does not take"):
        Registry().register(type("FailElsewhere", (Workflow,), ns))
