"""The per-class transition table (orchestrator.workflow.transition_table): a transition the
table holds must be the one python-statemachine would take, running the same callbacks in the
same order with the same payload; anything guarded, or with a callback the table cannot run
itself, still goes through the machine, and the engine writes the same states, context, history
and outbox rows either way."""
from __future__ import annotations

import copy
import itertools
import json
import uuid
from typing import Any, Iterator

import pytest
from statemachine import State

import bench.workflow  # noqa: F401  (registers the benchmark's workflow)
import sagas  # noqa: F401  (registers the built-in workflows)
from engine.inprocess import InProcess
from engine.workflows import CALLS, SCRIPT
from orchestrator import engine as engine_module
from orchestrator import ids as id_source
from orchestrator.config import Settings
from orchestrator.errors import IllegalTransition, InvalidInput
from orchestrator.workflow import Workflow, initial_entry, register, registry, transition_table

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


@register
class Ordered(Workflow):
    """a --go--> b --jump/hop--> c: every callback the table may run itself, each recording its
    name, the state the model is in and the payload it got (in the context, so the rows differ
    when the order does), and emitting one message."""

    type = "fast-path-ordered"
    start_event = "go"

    a = State(initial=True)
    b = State()
    c = State(final=True)

    go = a.to(b)
    jump = b.to(c, event="hop")  # one transition, two events: on_jump runs for jump only

    def _note(self, name: str, payload: Any = "-") -> None:
        self.context.setdefault("calls", []).append([name, self.model.state, payload])
        self.emit("kafka", "calls", {"name": name}, key=name)

    def on_enter_a(self) -> None:
        self._note("on_enter_a")

    def before_go(self, payload=None) -> None:
        self._note("before_go", payload)

    def on_exit_a(self) -> None:
        self._note("on_exit_a")

    def on_go(self, payload) -> None:
        self._note("on_go", payload)

    def on_enter_b(self, *, payload=None) -> None:
        self._note("on_enter_b", payload)

    def after_go(self, payload=None) -> None:
        self._note("after_go", payload)
        if self.model.context["input"].get("boom") == "after_go":
            raise KeyError("boom")

    def on_jump(self) -> None:
        self._note("on_jump")

    def on_enter_c(self, payload=None) -> None:
        self._note("on_enter_c", payload)
        if self.model.context["input"].get("boom") == "on_enter_c":
            raise KeyError("boom")


@register
class Injected(Workflow):
    """A callback taking a parameter the machine injects besides `payload`: not in the table."""

    type = "fast-path-injected"
    start_event = "go"

    a = State(initial=True)
    b = State(final=True)

    go = a.to(b)

    def on_enter_b(self, source: State) -> None:
        self.context["from"] = source.id


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
                     "simple-calculation", "worker_deployment", "inproc-shop", "fast-path-guarded",
                     "fast-path-ordered", "fast-path-injected"]:
        assert expected in names
    # The common paths of the plain workflows are in their tables, with their simple callbacks.
    assert transition_table(registry.get("bench"))[("one", "first")].target == "two"  # type: ignore[arg-type]
    route = registry.get("route_content")
    confirm = transition_table(route)[("received", "confirm")]  # type: ignore[arg-type]
    assert (confirm.target, _names(confirm)) == ("generating_stories", ["on_confirm"])
    assert ("generating_stories", "stories_ready") not in transition_table(route)  # type: ignore[arg-type]  (guarded)
    assert _names(initial_entry(route)) == ["on_enter_received"]  # type: ignore[arg-type]
    # A callback taking anything the machine injects but `payload` keeps the machine.
    assert transition_table(registry.get("fast-path-injected")) == {}  # type: ignore[arg-type]


def _names(move: Any) -> list[str]:
    return [f.__name__ for f, _ in move.leaving + move.entering + move.after]


def _sample_context(cls: type[Workflow]) -> dict[str, Any]:
    """A context as the instance has it once started: what its initial state's entry left."""
    model = _Model(None)
    model.context = {"input": {"route_id": "r1", "mode": "walking"}}
    cls(model=model, settings=Settings())
    return model.context


def _through_machine(cls: type[Workflow], state: str, event: str, payload: Any) -> tuple[Any, ...]:
    model = _Model(state)
    model.context = _sample_context(cls)
    machine = cls(model=model, settings=Settings())
    machine.send(event, payload=payload)
    return model.state, model.context, machine.messages, machine.context_touched


def _through_table(cls: type[Workflow], state: str, event: str, payload: Any) -> tuple[Any, ...]:
    model = _Model(state)
    model.context = _sample_context(cls)
    host = transition_table(cls)[(state, event)].take(cls, model, payload, Settings())
    return model.state, model.context, host.messages if host else [], host.context_touched if host else False


@pytest.fixture
def frozen_clock(monkeypatch):
    """The route's callbacks stamp the context with the time: the same time on both paths."""
    import sagas.route_content as route

    monkeypatch.setattr(route, "_now", lambda: "2026-01-01T00:00:00+00:00")


PAYLOADS = [{}, {"probe": True, "error": "e", "failed": [{"input": "s1", "error": "x"}],
                 "items": [{"audio_url": "u"}]}]


@pytest.mark.parametrize("cls", _builtin(), ids=lambda c: c.type)
def test_each_table_entry_does_what_the_machine_does(cls, frozen_clock):
    table = transition_table(cls)
    for (state, event), move in table.items():
        source = cls.states_map[state]
        chosen = [t for t in source.transitions if t.match(event)]
        assert len(chosen) == 1 and chosen[0].target.value == move.target, (cls.type, state, event)
        for payload in PAYLOADS:
            machine = _through_machine(cls, state, event, copy.deepcopy(payload))
            assert machine[0] == move.target, (cls.type, state, event)
            assert _through_table(cls, state, event, copy.deepcopy(payload)) == machine, (cls.type, state, event)


def test_the_callbacks_run_in_the_machines_order_with_its_payload(frozen_clock):
    cls = registry.get("fast-path-ordered")
    go = transition_table(cls)[("a", "go")]  # type: ignore[arg-type]
    assert _names(go) == ["before_go", "on_exit_a", "on_go", "on_enter_b", "after_go"]
    expected = [["on_enter_a", "a", "-"], ["before_go", "a", {"n": 1}], ["on_exit_a", "a", "-"],
                ["on_go", "a", {"n": 1}], ["on_enter_b", "b", {"n": 1}], ["after_go", "b", {"n": 1}]]
    machine = _through_machine(cls, "a", "go", {"n": 1})  # type: ignore[arg-type]
    assert machine[1]["calls"] == expected  # the library's own order, as documented in Move
    assert _through_table(cls, "a", "go", {"n": 1}) == machine  # type: ignore[arg-type]
    assert [m[3] for m in machine[2]] == [{"name": c[0]} for c in expected[1:]]
    # Of a transition with two events, each runs its own `on_<event>` only.
    assert _names(transition_table(cls)[("b", "jump")]) == ["on_jump", "on_enter_c"]  # type: ignore[arg-type]
    assert _names(transition_table(cls)[("b", "hop")]) == ["on_enter_c"]  # type: ignore[arg-type]
    for event in ("jump", "hop"):
        assert _through_table(cls, "b", event, {}) == _through_machine(cls, "b", event, {})  # type: ignore[arg-type]


@pytest.mark.parametrize("failing, source, event, left_in", [("on_enter_c", "b", "jump", "b"),
                                                              ("after_go", "a", "go", "b")])
def test_a_callbacks_exception_propagates_and_leaves_the_state_where_the_machine_does(failing, source, event,
                                                                                       left_in):
    """A failure up to the target's entry puts the machine back in the source; in `after`, the
    transition stands."""
    cls = registry.get("fast-path-ordered")
    for path in ("machine", "table"):
        model = _Model(source)
        model.context = {"input": {"boom": failing}}
        with pytest.raises(KeyError, match="boom"):
            if path == "machine":
                cls(model=model, settings=Settings()).send(event, payload={})  # type: ignore[misc]
            else:
                transition_table(cls)[(source, event)].take(cls, model, {}, Settings())  # type: ignore[arg-type]
        assert model.state == left_in, path
        assert model.context["calls"][-1][:2] == [failing, left_in if failing == "after_go" else "c"], path


def test_a_callback_host_has_what_callbacks_use_and_not_the_machine():
    cls = registry.get("route_content")
    model = _Model("received")
    host = cls.callback_host(model, Settings(), session="the session")  # type: ignore[union-attr]
    assert (host.model, host.session, host.messages, host.context_touched) == (model, "the session", [], False)
    assert host.context is model.context and host.context_touched
    assert host.step_for_state("synthesizing").name == "tts_batch"
    with pytest.raises(AttributeError):
        host.configuration  # noqa: B018  (the machine's own state is not there)


@pytest.mark.parametrize("cls", _builtin(), ids=lambda c: c.type)
def test_an_initial_entry_does_what_building_the_machine_does(cls, frozen_clock):
    entry = initial_entry(cls)
    machine_model, table_model = _Model(None), _Model(None)
    machine = cls(model=machine_model, settings=Settings())
    if entry is None:
        entered = _callbacks_of(machine, [cls.initial_state.enter.key, cls.initial_state.invoke.key])
        assert entered or not _plain_class_of(cls)
        return
    host = entry.take(cls, table_model, None, Settings())
    assert table_model.state == machine_model.state == entry.target
    assert table_model.context == machine_model.context
    assert (host.messages if host else []) == machine.messages


def _plain_class_of(cls: type[Workflow]) -> bool:
    from orchestrator.workflow import _plain_class

    return _plain_class(cls)


@pytest.mark.parametrize("cls", _builtin(), ids=lambda c: c.type)
def test_every_transition_left_out_of_a_table_has_a_reason(cls):
    """A pair left out has a guard, a callback the machine resolved, several candidate
    transitions or no transition at all: the table never drops a transition without callbacks
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


def _rows(ip: InProcess, instance_ids: list[str]) -> tuple[Any, ...]:
    """Everything the engine wrote for these instances that does not differ between two runs by
    construction (ids are replaced, times left out): state, context, history, steps, outbox."""
    out: list[Any] = []
    for instance_id in instance_ids:
        snap = ip.engine.snapshot(instance_id)
        history = [(h["from"], h["to"], h["event"], h["actor"], h["payload_digest"]) for h in snap["history"]]
        steps = [(s["name"], s["status"], s["attempt"], s["restarts"], s["failures"], s["error"],
                  s.get("total"), s.get("done"), s.get("failed")) for s in snap["steps"]]
        out.append((snap["state"], snap["finished"], snap["context"], history, steps))
    text = json.dumps([(r.channel, r.target, r.key, r.payload, r.instance_id) for r in ip.outbox_rows()], sort_keys=True)
    for n, instance_id in enumerate(instance_ids):
        text = text.replace(instance_id, f"<instance {n}>")
    return tuple(out), json.loads(text)


def _run_shop(ip: InProcess) -> tuple[Any, ...]:
    SCRIPT["inproc.reserve"] = ["retryable"]
    SCRIPT["inproc.pack"] = ["ok", "fatal"]
    inst, _ = ip.engine.start("inproc-shop", {"parcels": ["a", "b"]}, key="same-run")
    ip.run()
    ip.fire_timers("retry")
    ip.run()
    ip.engine.restart(inst["id"], "pack")
    ip.run()
    return _rows(ip, [inst["id"]]), [c[0] for c in CALLS]


def _run_route(ip: InProcess) -> tuple[Any, ...]:
    """A route through every transition of its table: confirm, a failed batch, its restart, the
    batch done; and one with no stories (stories_ready straight to completed, by the machine)."""
    from engine.test_route_content import event, through_stories, tts
    from sagas.route_content import RouteContent, restart_step

    through_stories(ip, 2, route_id="r1")
    tts(ip, "s1", route_id="r1", audio_url="a1")
    tts(ip, "s2", "failed", route_id="r1", error="x")
    restart_step(ip.engine, "r1", "tts_batch")
    tts(ip, "s2", route_id="r1", audio_url="a2", attempt=2)
    RouteContent.on_route_confirmed(ip.engine, event("route.confirmed", {"route_id": "r2", "mode": "walking"}))
    RouteContent.on_stories_generated(ip.engine, event("story.generate.completed",
                                                       {"route_id": "r2", "lang": "ru", "stories": []}))
    return _rows(ip, [ip.engine.find("route_content", "r1"), ip.engine.find("route_content", "r2")])


def _run_ordered(ip: InProcess) -> tuple[Any, ...]:
    first, _ = ip.engine.start("fast-path-ordered", {"n": 1})
    ip.engine.fire(first["id"], "jump", {"j": 1})
    second, _ = ip.engine.start("fast-path-ordered", {"n": 2})
    ip.engine.fire(second["id"], "hop", {"h": 1})
    third, _ = ip.engine.start("fast-path-injected", {"n": 3})
    return _rows(ip, [first["id"], second["id"], third["id"]])


def _with_and_without_table(tmp_path: Any, monkeypatch: Any, run: Any) -> tuple[Any, Any]:
    """`run(InProcess)` on a fresh database with the table, then without it (every transition
    through a statemachine instance, as before the table), each run with the same uuids (a
    payload may hold an instance id, its history row the payload's digest)."""
    results = []
    for name, table in (("fast", True), ("slow", False)):
        with monkeypatch.context() as patch:
            ids = (uuid.UUID(int=n) for n in itertools.count(1))
            patch.setattr(uuid, "uuid4", lambda: next(ids))
            patch.setattr(id_source, "uuid4", lambda: next(ids))  # the engine's ids
            if not table:
                patch.setattr(engine_module, "transition_table", lambda cls: {})
                patch.setattr(engine_module, "initial_entry", lambda cls: None)
            ip = InProcess(str(tmp_path / f"{name}.db"))
            CALLS.clear()
            try:
                results.append(run(ip))
            finally:
                ip.db.dispose()
    return results[0], results[1]


def test_the_engine_writes_the_same_rows_with_and_without_the_table(tmp_path, monkeypatch):
    with_table, without = _with_and_without_table(tmp_path, monkeypatch, _run_shop)
    assert with_table == without
    (((state, _, _, history, _),), _), _ = with_table
    assert state == "done" and ("reserving", "packing", "reserved", "worker") in [h[:4] for h in history]


def test_a_route_writes_the_same_rows_with_and_without_the_table(tmp_path, monkeypatch, frozen_clock):
    with_table, without = _with_and_without_table(tmp_path, monkeypatch, _run_route)
    assert with_table == without
    (r1, r2), outbox = with_table
    assert [h[2] for h in r1[3]] == ["create", "confirm", "stories_ready", "tts_batch_failed", "restart_tts",
                                     "tts_done"]
    assert r1[0] == r2[0] == "completed" and r1[2]["steps"]["tts_batch"]["attempt"] == 2
    assert [m[1] for m in outbox].count("delivery.prefetch") == 2


def test_callbacks_write_the_same_rows_with_and_without_the_table(tmp_path, monkeypatch):
    with_table, without = _with_and_without_table(tmp_path, monkeypatch, _run_ordered)
    assert with_table == without
    (first, second, third), outbox = with_table
    assert [c[0] for c in first[2]["calls"]] == ["on_enter_a", "before_go", "on_exit_a", "on_go", "on_enter_b",
                                                "after_go", "on_jump", "on_enter_c"]
    assert [c[0] for c in second[2]["calls"]][-1:] == ["on_enter_c"]  # hop: no on_jump
    assert third[2]["from"] == "a"
    assert len(outbox) == 8 + 7


def test_a_failing_callback_fails_the_transition_on_both_paths(tmp_path, monkeypatch):
    def run(ip: InProcess) -> tuple[Any, ...]:
        inst, _ = ip.engine.start("fast-path-ordered", {"boom": "on_enter_c"})
        with pytest.raises(KeyError, match="boom"):
            ip.engine.fire(inst["id"], "jump", {})
        return _rows(ip, [inst["id"]])

    with_table, without = _with_and_without_table(tmp_path, monkeypatch, run)
    assert with_table == without and with_table[0][0][0] == "b"


def test_table_callbacks_run_without_a_machine(inproc, monkeypatch):
    """A route's start and an ordered workflow's transitions build no statemachine instance."""
    def refuse(self: Any, *args: Any, **kwargs: Any) -> None:
        raise AssertionError("a statemachine instance was built for a transition the table holds")

    monkeypatch.setattr(Workflow, "__init__", refuse)
    inst, _ = inproc.engine.start("fast-path-ordered", {})
    inproc.engine.fire(inst["id"], "jump", {})
    assert inproc.engine.snapshot(inst["id"])["state"] == "c"
    route, _ = inproc.engine.start("route_content", {"route_id": "r9", "mode": "walking"}, key="r9")
    assert route["state"] == "generating_stories"
    assert [r.target for r in inproc.outbox.rows if r.instance_id == route["id"]] == ["story.generate"]


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
