"""The per-class transition table (orchestrator.workflow.transition_table): a transition the
table holds must be the one python-statemachine would take, with no callback of the machine to
run; anything guarded or with callbacks still goes through the machine, and the engine writes
the same states, history and outbox rows either way."""
from __future__ import annotations

import json
from typing import Any, Iterator

import pytest
from statemachine import State

import bench.workflow  # noqa: F401  (registers the benchmark's workflow)
import sagas  # noqa: F401  (registers the built-in workflows)
from engine.inprocess import InProcess
from engine.workflows import CALLS, SCRIPT
from orchestrator import engine as engine_module
from orchestrator.config import Settings
from orchestrator.errors import IllegalTransition, InvalidInput
from orchestrator.workflow import Workflow, plain_initial_state, register, registry, transition_table

#: payloads the guard of `Guarded` was asked about, in order
GUARD_CALLS: list[dict[str, Any]] = []


@register
class Guarded(Workflow):
    """new -> deciding (no guard, no callback: the table's) -> approved | rejected (guarded)."""

    type = "fast-path-guarded"
    start_event = "go"

    new = State(initial=True)
    deciding = State()
    approved = State(final=True)
    rejected = State(final=True)

    go = new.to(deciding)
    decide = deciding.to(approved, cond="is_approved") | deciding.to(rejected)

    def is_approved(self, payload: dict[str, Any] | None = None) -> bool:
        GUARD_CALLS.append(dict(payload or {}))
        return bool((payload or {}).get("ok"))


class _Model:
    """What the engine hands the machine: an object with `state` and `context`."""

    def __init__(self, state: str | None) -> None:
        self.state = state
        self.context: dict[str, Any] = {"input": {}}
        self.id = "model"


def _builtin() -> list[type[Workflow]]:
    return [registry.get(name) for name in registry.names()]  # type: ignore[misc]


def _callbacks_of(machine: Workflow, keys: list[str]) -> list[Any]:
    """The callbacks the machine instance resolved under these keys (guards, validators,
    before/on/after, exit, enter, invoke): what it would consider for a transition."""
    found: list[Any] = []
    for key in keys:
        if key in machine._callbacks:
            found.extend(machine._callbacks[key])
    return found


def test_every_built_in_workflow_is_checked():
    names = registry.names()
    for expected in ["bench", "calculate-balance", "chat_task", "media", "route_content",
                     "simple-calculation", "worker_deployment", "inproc-shop", "fast-path-guarded"]:
        assert expected in names
    # The common paths of the plain workflows are in their tables; those with callbacks are not.
    assert transition_table(registry.get("bench"))[("one", "first")] == "two"  # type: ignore[arg-type]
    assert ("received", "confirm") not in transition_table(registry.get("route_content"))  # type: ignore[arg-type]
    assert plain_initial_state(registry.get("route_content")) is None  # type: ignore[arg-type]


@pytest.mark.parametrize("cls", _builtin(), ids=lambda c: c.type)
def test_each_table_entry_is_the_machines_own_transition_with_no_callback(cls):
    table = transition_table(cls)
    settings = Settings()
    for (state, event), target in table.items():
        model = _Model(state)
        machine = cls(model=model, settings=settings)
        source = cls.states_map[state]
        chosen = [t for t in source.transitions if t.match(event)]
        assert len(chosen) == 1, (cls.type, state, event)
        move = chosen[0]
        keys = [move.validators.key, move.cond.key, move.before.key, move.on.key, move.after.key,
                source.exit.key, move.target.enter.key, move.target.invoke.key, cls.prepare.key]
        assert _callbacks_of(machine, keys) == [], (cls.type, state, event)
        machine.send(event, payload={"probe": True})
        assert model.state == target, (cls.type, state, event)
        assert machine.messages == [] and not machine.context_touched, (cls.type, state, event)


@pytest.mark.parametrize("cls", _builtin(), ids=lambda c: c.type)
def test_every_transition_left_out_of_a_table_has_a_reason(cls):
    """A pair left out has a guard, a callback the machine resolved, several candidate
    transitions or no transition at all: the table never drops a plain transition it could hold
    unless the whole class is outside what it represents."""
    table = transition_table(cls)
    if not table:
        return  # a class the table does not represent (machine-wide callbacks, ...)
    settings = Settings()
    for source in cls.states:
        machine = cls(model=_Model(source.id), settings=settings)
        for event in cls.event_names():
            if (source.value, event) in table:
                continue
            chosen = [t for t in source.transitions if t.match(event)]
            if len(chosen) != 1:
                continue
            move = chosen[0]
            keys = [move.validators.key, move.cond.key, move.before.key, move.on.key, move.after.key,
                    source.exit.key, move.target.enter.key, move.target.invoke.key]
            assert _callbacks_of(machine, keys), (cls.type, source.id, event)


@pytest.mark.parametrize("cls", _builtin(), ids=lambda c: c.type)
def test_a_plain_initial_state_is_the_one_the_machine_enters_without_callbacks(cls):
    initial = plain_initial_state(cls)
    model = _Model(None)
    machine = cls(model=model, settings=Settings())
    entered = _callbacks_of(machine, [cls.initial_state.enter.key, cls.initial_state.invoke.key])
    if initial is None:
        assert entered or cls.initial_state.enter is None or not transition_table(cls)
    else:
        assert initial == model.state and entered == []


@pytest.fixture
def inproc(tmp_path) -> Iterator[InProcess]:
    ip = InProcess(str(tmp_path / "engine.db"))
    CALLS.clear()
    SCRIPT.clear()
    GUARD_CALLS.clear()
    try:
        yield ip
    finally:
        ip.db.dispose()


def test_a_guarded_transition_still_asks_its_guard(inproc):
    cls = registry.get("fast-path-guarded")
    assert ("new", "go") in transition_table(cls)  # type: ignore[arg-type]
    assert ("deciding", "decide") not in transition_table(cls)  # type: ignore[arg-type]
    yes, _ = inproc.engine.start("fast-path-guarded", {})
    no, _ = inproc.engine.start("fast-path-guarded", {})
    assert yes["state"] == no["state"] == "deciding"
    assert inproc.engine.fire(yes["id"], "decide", {"ok": True})["state"] == "approved"
    assert inproc.engine.fire(no["id"], "decide", {"ok": False})["state"] == "rejected"
    assert GUARD_CALLS == [{"ok": True}, {"ok": False}]


def test_an_event_the_state_does_not_accept_or_an_unknown_one_is_refused_as_before(inproc):
    inst, _ = inproc.engine.start("fast-path-guarded", {})
    with pytest.raises(IllegalTransition):
        inproc.engine.fire(inst["id"], "go")  # declared, but not from `deciding`
    with pytest.raises(InvalidInput):
        inproc.engine.fire(inst["id"], "fly")
    snap = inproc.engine.snapshot(inst["id"])
    assert snap["state"] == "deciding" and [h["event"] for h in snap["history"]] == ["create", "go"]


def _run_shop(ip: InProcess) -> tuple[Any, ...]:
    SCRIPT["inproc.reserve"] = ["retryable"]
    SCRIPT["inproc.pack"] = ["ok", "fatal"]
    inst, _ = ip.engine.start("inproc-shop", {"parcels": ["a", "b"]}, key="same-run")
    ip.run()
    ip.fire_timers("retry")
    ip.run()
    ip.engine.restart(inst["id"], "pack")
    ip.run()
    snap = ip.engine.snapshot(inst["id"])
    history = [(h["from"], h["to"], h["event"], h["actor"]) for h in snap["history"]]
    steps = [(s["name"], s["status"], s["attempt"], s["restarts"], s["failures"], s["error"],
              s.get("total"), s.get("done"), s.get("failed")) for s in snap["steps"]]
    # Ids differ between the two runs; everything else in a row must not.
    outbox = [(r.channel, r.target, json.dumps(r.payload, sort_keys=True).replace(inst["id"], "<id>"))
              for r in ip.outbox.rows]
    return snap["state"], snap["finished"], snap["context"], history, steps, outbox, [c[0] for c in CALLS]


def test_the_engine_writes_the_same_rows_with_and_without_the_table(tmp_path, monkeypatch):
    fast = InProcess(str(tmp_path / "fast.db"))
    CALLS.clear()
    try:
        with_table = _run_shop(fast)
    finally:
        fast.db.dispose()
    # The reference: every transition through a statemachine instance, as before the table.
    monkeypatch.setattr(engine_module, "transition_table", lambda cls: {})
    monkeypatch.setattr(engine_module, "plain_initial_state", lambda cls: None)
    slow = InProcess(str(tmp_path / "slow.db"))
    CALLS.clear()
    try:
        without = _run_shop(slow)
    finally:
        slow.db.dispose()
    assert with_table == without
    assert with_table[0] == "done" and ("reserving", "packing", "reserved", "worker") in with_table[3]


def test_plain_transitions_are_applied_without_sending_to_a_machine(inproc, monkeypatch):
    cls = registry.get("inproc-shop")

    def refuse(self: Any, *args: Any, **kwargs: Any) -> None:
        raise AssertionError("an event the table holds was sent to a statemachine instance")

    monkeypatch.setattr(cls, "send", refuse)
    inst, _ = inproc.engine.start("inproc-shop", {"parcels": ["a"]})
    inproc.run()
    snap = inproc.engine.snapshot(inst["id"])
    assert snap["state"] == "done" and snap["finished"]
    assert [(h["from"], h["to"], h["event"]) for h in snap["history"]] == [
        (None, "new", "create"), ("new", "reserving", "start"), ("reserving", "packing", "reserved"),
        ("packing", "done", "packed")]
