"""The engine's guarantees, in process on SQLite: transitions, retries, timers, leases, fan-out
joins, compensation and external steps. No broker, no worker: captured step messages are run by
calling their step functions (tests/engine/inprocess.py)."""
from __future__ import annotations

from datetime import datetime, timedelta

import pytest

from engine.workflows import CALLS, SCRIPT, Shop
from orchestrator.engine import ACCEPTED, DUPLICATE, STALE, UNKNOWN
from orchestrator.errors import InvalidInput
from orchestrator.jsonutil import digest
from orchestrator.models import WorkflowInstance


@pytest.fixture(autouse=True)
def _clean() -> None:
    CALLS.clear()
    SCRIPT.clear()


def test_transitions_run_each_step_once_and_join_the_fan_out(inproc):
    inst, created = inproc.engine.start("inproc-shop", {"parcels": ["x", "y"]})
    assert created and inst["state"] == "reserving"
    inproc.run()
    snap = inproc.engine.snapshot(inst["id"])
    assert snap["state"] == "done"
    assert [h["event"] for h in snap["history"]] == ["create", "start", "reserved", "packed"]
    pack = inproc.step(inst["id"], "pack")
    assert (pack["total"], pack["done"], pack["failed"]) == (2, 2, 0)
    assert [c[0] for c in CALLS] == ["inproc.reserve", "inproc.pack", "inproc.pack"]



def test_a_step_done_in_one_delivery_shows_when_it_started_and_how_long_it_took(inproc):
    """A step's start came from its report: one that finished in the same delivery had
    `started_at` equal to `finished_at` and `duration_seconds` 0.0 (a media download of 6 s
    showed 0.0 in /sagas/<id> and /jobs/<id>). The task's own start is kept now, for a failed
    attempt too."""
    SCRIPT["inproc.reserve"] = ["slow retryable", "ok"]
    SCRIPT["inproc.pack"] = ["slow"]
    inst, _ = inproc.engine.start("inproc-shop", {"parcels": ["x"]})
    inproc.run()
    failed_attempt = next(s for s in inproc.engine.snapshot(inst["id"])["steps"] if s["name"] == "reserve")
    assert failed_attempt["started_at"] is not None
    inproc.fire_timers("retry")
    inproc.run()
    steps = {s["name"]: s for s in inproc.engine.snapshot(inst["id"])["steps"]}
    assert steps["pack"]["duration_seconds"] >= 0.3, steps["pack"]
    assert steps["reserve"]["started_at"] == failed_attempt["started_at"]  # the first attempt's start
    assert steps["reserve"]["duration_seconds"] >= 0.3, steps["reserve"]
    assert datetime.fromisoformat(steps["pack"]["started_at"]) >= datetime.fromisoformat(steps["reserve"]["finished_at"])

def test_a_retryable_failure_waits_on_a_timer_then_runs_again(inproc):
    SCRIPT["inproc.reserve"] = ["retryable"]
    inst, _ = inproc.engine.start("inproc-shop", {"parcels": []})
    inproc.run()
    step = inproc.step(inst["id"], "reserve")
    assert step["status"] == "waiting" and step["failures"] == 1 and "503" in step["error"]
    assert [t.kind for t in inproc.timers(inst["id"]) if t.fired_at is None] == ["retry"]
    assert inproc.fire_timers("retry") == 1
    inproc.run()
    snap = inproc.engine.snapshot(inst["id"])
    assert snap["state"] == "done"  # no parcels: the join fires at once
    assert inproc.step(inst["id"], "reserve")["attempt"] == 2


def test_a_fatal_failure_fails_the_step_and_a_restart_runs_it_again(inproc):
    SCRIPT["inproc.reserve"] = ["fatal"]
    inst, _ = inproc.engine.start("inproc-shop", {"parcels": ["x"]})
    inproc.run()
    assert inproc.engine.snapshot(inst["id"])["state"] == "failed"
    inproc.engine.restart(inst["id"], "reserve")
    inproc.run()
    assert inproc.engine.snapshot(inst["id"])["state"] == "done"


def test_a_failed_branch_alone_runs_again_after_a_restart(inproc):
    SCRIPT["inproc.pack"] = ["ok", "fatal", "ok"]
    inst, _ = inproc.engine.start("inproc-shop", {"parcels": ["a", "b", "c"]})
    inproc.run()
    pack = inproc.step(inst["id"], "pack")
    assert inproc.engine.snapshot(inst["id"])["state"] == "failed"
    assert (pack["done"], pack["failed"]) == (2, 1)
    CALLS.clear()
    inproc.engine.restart(inst["id"], "pack")
    inproc.run()
    assert inproc.engine.snapshot(inst["id"])["state"] == "done"
    assert [c[3] for c in CALLS] == [1]  # only branch 1 ran again


def test_a_lost_step_message_is_sent_again_when_its_lease_expires(inproc):
    inst, _ = inproc.engine.start("inproc-shop", {"parcels": ["a"]})
    assert len(inproc.drop_pending()) == 1  # the broker lost it
    assert inproc.expire_leases() == 1
    inproc.run()
    assert inproc.engine.snapshot(inst["id"])["state"] == "done"


def test_a_duplicate_delivery_has_one_effect(inproc):
    inst, _ = inproc.engine.start("inproc-shop", {"parcels": []})
    inproc.outbox.pending.append(inproc.outbox.pending[0])  # the same row published twice
    outcomes = [o for _, o in inproc.run()]
    assert outcomes.count("done") == 1 and any(o.startswith("skipped") for o in outcomes)
    assert [c[0] for c in CALLS] == ["inproc.reserve"]


def test_cancel_compensates_the_completed_step(inproc):
    inst, _ = inproc.engine.start("inproc-shop", {"parcels": ["a"]})
    inproc.run(limit=1)  # reserve done; the pack message is still captured
    inproc.drop_pending()
    snap = inproc.engine.cancel(inst["id"])
    assert snap["state"] == "cancelled" and snap["compensation"] == "running"
    SCRIPT["inproc.release"] = ["retryable"]
    inproc.run()
    assert inproc.step(inst["id"], "reserve")["status"] == "compensating"
    inproc.fire_timers("compensate")
    inproc.run()
    snap = inproc.engine.snapshot(inst["id"])
    assert snap["compensation"] == "completed" and inproc.step(inst["id"], "reserve")["status"] == "compensated"
    assert [c[0] for c in CALLS].count("inproc.release") == 2


def test_a_step_that_completes_after_the_cancel_is_compensated(inproc):
    """The reserve step was claimed (running) when the cancel came; its report after the cancel
    records it completed and runs its compensation, once (a duplicate report does nothing)."""
    from orchestrator.engine import Done

    inst, _ = inproc.engine.start("inproc-shop", {"parcels": ["a"]})
    ctx = inproc.engine.claim_step(inst["id"], "reserve", 1)
    assert ctx is not None
    inproc.drop_pending()
    assert inproc.engine.cancel(inst["id"])["compensation"] is None  # nothing completed yet
    assert inproc.step(inst["id"], "reserve")["status"] == "cancelled"
    inproc.engine.step_succeeded(inst["id"], "reserve", 1, Done("reserved", {"reservation": "late"}), basis=ctx.basis)
    assert inproc.step(inst["id"], "reserve")["status"] == "compensating"
    inproc.run()
    snap = inproc.engine.snapshot(inst["id"])
    assert snap["state"] == "cancelled" and snap["compensation"] == "completed", snap
    assert inproc.step(inst["id"], "reserve")["status"] == "compensated"
    assert inproc.step(inst["id"], "reserve")["data"]["output"] == {"reservation": "late"}
    assert [c[0] for c in CALLS] == ["inproc.release"]
    assert [h["event"] for h in snap["history"]] == ["create", "start", "cancel"]
    inproc.engine.step_succeeded(inst["id"], "reserve", 1, Done("reserved", {}))  # a duplicate report
    assert inproc.engine.snapshot(inst["id"])["compensation"] == "completed" and not inproc.outbox.pending


# -- external steps ------------------------------------------------------------------------------
def _questions(inproc):
    return inproc.outbox.sent("kafka", "questions")


def test_an_external_fan_out_joins_on_completion_events(inproc):
    inst, _ = inproc.engine.start("inproc-survey", {"people": ["ann", "bob"]})
    sent = _questions(inproc)
    assert [q["to"] for q in sent] == ["ann", "bob"] and inproc.step(inst["id"], "ask_all")["status"] == "waiting"
    tokens = [q["reply_token"] for q in sent]
    assert inproc.engine.complete_external(tokens[1], True, {"answer": "no"}) == ACCEPTED
    assert inproc.engine.complete_external(tokens[1], True, {"answer": "no"}) == DUPLICATE
    step = inproc.step(inst["id"], "ask_all")
    assert (step["total"], step["done"], step["failed"]) == (2, 1, 0)
    assert inproc.engine.complete_external(tokens[0], True, {"answer": "yes"}) == ACCEPTED
    snap = inproc.engine.snapshot(inst["id"])
    assert snap["state"] == "confirming"
    assert snap["context"]["answers"] == [{"answer": "yes"}, {"answer": "no"}]
    assert inproc.engine.complete_external("no-such-token", True) == UNKNOWN


def test_a_failed_item_alone_is_retried_with_a_new_token(inproc):
    inst, _ = inproc.engine.start("inproc-survey", {"people": ["ann", "bob"]})
    ann, bob = (q["reply_token"] for q in _questions(inproc))
    assert inproc.engine.complete_external(ann, True, {"answer": "yes"}) == ACCEPTED
    assert inproc.engine.complete_external(bob, False, error="mailbox full", retryable=True) == ACCEPTED
    assert inproc.fire_timers("retry") == 1
    again = _questions(inproc)[2:]
    assert [q["to"] for q in again] == ["bob"] and again[0]["attempt"] == 2 and again[0]["reply_token"] != bob
    assert inproc.engine.complete_external(bob, True) == STALE  # the first attempt's late answer
    assert inproc.engine.complete_external(again[0]["reply_token"], True, {"answer": "ok"}, attempt=2) == ACCEPTED
    assert inproc.engine.snapshot(inst["id"])["state"] == "confirming"


def test_items_that_fail_for_good_fail_the_step_and_a_restart_asks_only_them(inproc):
    inst, _ = inproc.engine.start("inproc-survey", {"people": ["ann", "bob", "cy"]})
    ann, bob, cy = (q["reply_token"] for q in _questions(inproc))
    inproc.engine.complete_external(bob, False, error="refused")
    inproc.engine.complete_external(ann, True, {"answer": "yes"})
    assert inproc.engine.snapshot(inst["id"])["state"] == "asking"  # cy has not answered yet
    inproc.engine.complete_external(cy, True, {"answer": "maybe"})
    snap = inproc.engine.snapshot(inst["id"])
    assert snap["state"] == "failed" and snap["context"]["failed_items"] == ["bob"]
    inproc.engine.restart(inst["id"], "ask_all")
    again = _questions(inproc)[3:]
    assert [q["to"] for q in again] == ["bob"]
    assert inproc.engine.complete_external(again[0]["reply_token"], True, {"answer": "fine"}) == ACCEPTED
    assert inproc.engine.snapshot(inst["id"])["context"]["answers"][1] == {"answer": "fine"}


def test_an_external_step_times_out_by_its_timer(inproc):
    inst, _ = inproc.engine.start("inproc-survey", {"people": ["ann"]})
    assert inproc.fire_timers("deadline") == 1
    snap = inproc.engine.snapshot(inst["id"])
    assert snap["state"] == "failed" and "timed out" in snap["context"]["error"]
    token = _questions(inproc)[0]["reply_token"]
    assert inproc.engine.complete_external(token, True) == STALE


def test_an_unpublishable_request_fails_its_item_only(inproc):
    inst, _ = inproc.engine.start("inproc-survey", {"people": ["ann", "bob"]})
    rows = [r for r in inproc.outbox.rows if r.target == "questions"]
    assert inproc.engine.outbox_failed(rows[0].message_id, "MSG_SIZE_TOO_LARGE")
    step = inproc.step(inst["id"], "ask_all")
    assert (step["done"], step["failed"]) == (0, 1) and step["status"] == "waiting"
    inproc.engine.complete_external(rows[1].payload["reply_token"], True)
    snap = inproc.engine.snapshot(inst["id"])
    assert snap["state"] == "failed" and snap["context"]["failed_items"] == ["ann"]


def test_a_task_sent_external_step_keyed_by_a_business_id(inproc):
    inst, _ = inproc.engine.start("inproc-survey", {"people": ["ann"]})
    inproc.engine.complete_external(_questions(inproc)[0]["reply_token"], True, {"answer": "yes"})
    inproc.run()
    step = inproc.step(inst["id"], "confirm")
    token = f"confirm-{inst['id']}-0"
    assert step["status"] == "waiting" and step["data"]["sent_token"] == token
    assert inproc.expire_leases() == 0  # waiting for an answer holds no lease
    assert inproc.engine.complete_external(token, False, error="no", retryable=False) == ACCEPTED
    assert inproc.engine.snapshot(inst["id"])["state"] == "failed"
    inproc.engine.restart(inst["id"], "confirm")
    inproc.run()
    new_token = f"confirm-{inst['id']}-1"
    assert inproc.step(inst["id"], "confirm")["data"]["sent_token"] == new_token
    assert inproc.engine.complete_external(token, True) == STALE
    assert inproc.engine.complete_external(new_token, True, {"ok": True}) == ACCEPTED
    assert inproc.engine.snapshot(inst["id"])["state"] == "done"


def test_find_by_business_key(inproc):
    inst, _ = inproc.engine.start("inproc-shop", {"parcels": []}, key="order-7")
    assert inproc.engine.find("inproc-shop", "order-7") == inst["id"]
    assert inproc.engine.find("inproc-shop", "order-8") is None
    assert inproc.engine.find("inproc-survey", "order-7") is None


@pytest.mark.parametrize("bad, problem", [("   ", "must not be empty"), ("\u200b", "must not be empty"),
                                          ("k" * 256, "must be at most 255 characters, got 256")])
def test_an_idempotency_key_from_code_is_refused_in_the_words_of_the_header(inproc, bad, problem):
    """Engine.start checks an idempotency key as the web checks the header (tests/integration/
    test_header_lengths.py): a caller in code gets the same messages as one over HTTP."""
    with pytest.raises(InvalidInput) as err:
        inproc.engine.start("inproc-shop", {"parcels": []}, idempotency_key=bad)
    assert (err.value.field, err.value.problem) == ("Idempotency-Key", problem)
    inst, created = inproc.engine.start("inproc-shop", {"parcels": []}, idempotency_key="k" * 255)
    assert created and inproc.engine.start("inproc-shop", {"parcels": []}, idempotency_key="k" * 255)[0]["id"] == inst["id"]


def test_an_unanswered_request_is_sent_again_under_the_same_token_when_it_resends(inproc, monkeypatch):
    from engine.workflows import Survey
    from orchestrator.workflow import External

    step = Survey.step_table()["confirming"]
    monkeypatch.setitem(Survey.__dict__["_step_table"], "confirming",
                        type(step)(**{**step.__dict__, "external": External(token="confirmation_id", resend=True)}))
    inst, _ = inproc.engine.start("inproc-survey", {"people": ["ann"]})
    inproc.engine.complete_external(_questions(inproc)[0]["reply_token"], True, {"answer": "yes"})
    inproc.run()
    assert inproc.step(inst["id"], "confirm")["status"] == "waiting"  # its request is out, under its lease:
    assert inproc.expire_leases() == 1
    inproc.run()
    token = f"confirm-{inst['id']}-0"
    assert [c[0] for c in CALLS].count("inproc.ask") == 2
    assert inproc.engine.complete_external(token, True, {"ok": True}) == ACCEPTED
    assert inproc.engine.snapshot(inst["id"])["state"] == "done"


def _timestamps(view: object, where: str = "") -> list[tuple[str, str]]:
    """Every (path, value) of a view whose key names a time."""
    found: list[tuple[str, str]] = []
    if isinstance(view, dict):
        for key, value in view.items():
            if isinstance(value, str) and (key.endswith("_at") or key in ("at", "timestamp")):
                found.append((f"{where}.{key}", value))
            else:
                found.extend(_timestamps(value, f"{where}.{key}"))
    elif isinstance(view, list):
        for i, value in enumerate(view):
            found.extend(_timestamps(value, f"{where}[{i}]"))
    return found


def test_every_timestamp_of_a_snapshot_on_sqlite_has_the_utc_offset(inproc):
    inst, _ = inproc.engine.start("inproc-shop", {"parcels": ["x"]})
    inproc.run()
    for view in (inst, inproc.engine.snapshot(inst["id"])):
        stamps = _timestamps(view)
        assert len(stamps) >= 4, view
        for where, value in stamps:
            assert value.endswith("+00:00"), (where, value)
            assert datetime.fromisoformat(value).utcoffset() == timedelta(0)


def test_a_start_without_an_answer_writes_the_same_and_only_says_whether_it_created(inproc, monkeypatch):
    data = {"parcels": ["x"]}
    assert inproc.engine.start("inproc-shop", data, key="quiet", answer=False) == (None, True)
    assert inproc.engine.start("inproc-shop", data, key="quiet", answer=False) == (None, False)
    snap, created = inproc.engine.start("inproc-shop", data, key="quiet")  # the default answers
    assert not created and snap["key"] == "quiet" and snap["state"] == "reserving"
    # one digest of the input: both history rows' payload digest and the default fingerprint
    assert [(h["event"], h["payload_digest"]) for h in snap["history"]] == [("create", digest(data)),
                                                                            ("start", digest(data))]
    monkeypatch.setattr(Shop, "fingerprint", classmethod(lambda cls, data: "its own"))
    mine, _ = inproc.engine.start("inproc-shop", data, key="own")
    with inproc.engine.sessions() as s:
        assert [s.get(WorkflowInstance, i["id"]).fingerprint for i in (snap, mine)] == [digest(data), "its own"]
