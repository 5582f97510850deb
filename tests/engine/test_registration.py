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
