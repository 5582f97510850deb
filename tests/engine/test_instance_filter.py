"""The instance filter (GET /sagas, bulk operations) on the embedded SQLite default, where
timestamps are stored as text: time bounds, failure messages and step statuses."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from engine.workflows import SCRIPT
from orchestrator.engine import Filter
from orchestrator.errors import InvalidInput


def test_filters_select_by_key_time_error_and_step_status(inproc):
    SCRIPT["inproc.reserve"] = ["fatal"]
    failed, _ = inproc.engine.start("inproc-shop", {"parcels": []}, key="k1")
    inproc.run()
    done, _ = inproc.engine.start("inproc-shop", {"parcels": ["x"]}, key="k2")
    inproc.run()
    match = inproc.engine.match_ids
    assert match(Filter(key="k1")) == [failed["id"]]
    assert match(Filter(error="SERVICE REFUSED")) == [failed["id"]]
    assert match(Filter(error="100%_")) == []  # LIKE wildcards are text
    assert match(Filter(step="reserve", step_status="failed")) == [failed["id"]]
    assert match(Filter(step="pack", step_status="completed")) == [done["id"]]
    at = datetime.fromisoformat(failed["created_at"])
    assert match(Filter(created_after=at)) == [done["id"], failed["id"]]
    assert match(Filter(created_before=at)) == []
    assert match(Filter(created_after=at.replace(tzinfo=None))) == [done["id"], failed["id"]]
    assert match(Filter(created_after=at.astimezone(timezone(timedelta(hours=-5))))) == [done["id"], failed["id"]]
    assert inproc.engine.list(Filter(type="inproc-shop"), limit=1)[0] == 2


@pytest.mark.parametrize("flt, field", [(Filter(type="nope"), "type"), (Filter(step="nope"), "step"),
                                        (Filter(step_status="broken"), "step_status")])
def test_an_unknown_name_is_refused_naming_the_field(inproc, flt, field):
    with pytest.raises(InvalidInput) as err:
        inproc.engine.match_ids(flt)
    assert err.value.to_dict()["field"] == field


def test_an_instance_its_deadline_failed_outside_a_step_is_found_by_its_reason(inproc):
    """A deadline passing while no step runs (a wait for a signal) failed the instance and left
    its reason nowhere: no step row held it and the workflow's callbacks wrote none, so
    `GET /sagas?error=timed` found nothing and the console showed no error."""
    waiting, _ = inproc.engine.start("inproc-approval", {})
    approved, _ = inproc.engine.start("inproc-approval", {})
    inproc.engine.fire(approved["id"], "approve", {}, actor="ann")
    assert inproc.fire_timers() >= 1
    snap = inproc.engine.snapshot(waiting["id"])
    assert snap["state"] == "expired" and snap["context"]["error"] == "job timed out after 2 minutes"
    assert inproc.engine.match_ids(Filter(error="TIMED OUT")) == [waiting["id"]]
    assert inproc.engine.snapshot(approved["id"])["state"] == "approved"
