"""The operator console in a real browser (headless Chromium over the DevTools protocol), against
a real API process, worker, sweeper and the media emulators: an operator logs in, filters to the
failed media jobs, opens one, sees its diagram and its failed step, presses Restart and sees it
complete; then repairs the others with a bulk restart, a dry run first. And an order waiting for
its approval: the operator types the payload and presses Send event, and cancels another one
(accepting the confirm dialog).  Screenshots are kept
(TEST_LOG_DIR, else /tmp/console-artifacts/; each path is printed)."""
from __future__ import annotations

import base64
import json
import os
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Iterator

import pytest
import requests
from browser import browser  # noqa: F401 - the fixture
from orchestrator.entrypoints.ports import free_port
from conftest import Process, wait_for

pytestmark = pytest.mark.e2e
LOGIN = ("operator", "s3cret")
ARTIFACTS = Path(os.environ["TEST_LOG_DIR"]) / "console" if os.environ.get("TEST_LOG_DIR") \
    else Path("/tmp/console-artifacts")


@pytest.fixture(scope="module")
def console(env: dict[str, str], worker: Any, sweeper: Any) -> Iterator[str]:
    """The API as `orchestrator api` serves it, with the console on."""
    port = free_port()
    proc = Process("console-api", ["api", "--port", str(port), "--host", "127.0.0.1", "--workers", "2"],
                   {**env, "CONSOLE_BASIC_AUTH": ":".join(LOGIN)}).start()
    base = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return requests.get(f"{base}/healthz", timeout=1).status_code < 500
        except requests.RequestException:
            return proc.proc.poll() is not None  # type: ignore[union-attr]

    wait_for(up, timeout=60, interval=0.2, what="the API process")
    assert proc.proc.poll() is None, proc.output()[-3000:]  # type: ignore[union-attr]
    yield base
    proc.stop()


def screenshot(browser: Any, name: str) -> Path:
    shot = browser.call("Page.captureScreenshot", format="png")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    path.write_bytes(base64.b64decode(shot["data"]))
    print(f"screenshot: {path}")
    assert path.stat().st_size > 1000
    return path


def open_page(browser: Any, url: str, ready: str) -> None:
    browser.call("Page.navigate", url=url)
    wait_for(lambda: browser.eval(f"document.readyState === 'complete' && !!({ready})"),
             timeout=30, interval=0.2, what=f"{url} to show {ready}")


def log_in(browser: Any) -> None:
    """Basic auth on every request of the page, its own fetches included."""
    browser.call("Page.enable")
    browser.call("Network.enable")
    token = base64.b64encode(":".join(LOGIN).encode()).decode()
    browser.call("Network.setExtraHTTPHeaders", headers={"Authorization": f"Basic {token}"})


def press(browser: Any, name: str) -> None:
    """Click the button whose visible name is `name`, from a task of its own: a click that opens
    a confirm dialog would otherwise hold this call until the dialog is answered."""
    assert browser.eval(f"(() => {{ const b = [...document.querySelectorAll('button')]"
                        f".find(b => b.textContent.trim() === {json.dumps(name)}); if (!b) return false;"
                        " setTimeout(() => b.click(), 0); return true; })()"), f"no {name} button"


def job_state(base: str, instance_id: str) -> str:
    return requests.get(f"{base}/sagas/{instance_id}", timeout=5).json()["state"]


def test_operator_restarts_a_failed_job_then_repairs_the_rest_in_bulk(console, browser, faults):
    since = (datetime.now(timezone.utc) - timedelta(seconds=1)).strftime("%Y-%m-%dT%H:%M:%S")
    # three media jobs whose normalization the service refuses (a 4xx fails the step at once)
    faults("audio-normalization", [{"endpoint": "submit", "kind": "400", "times": 3}])
    ids = []
    for _ in range(3):
        r = requests.post(f"{console}/pipeline", timeout=10,
                          json={"youtube_url": f"https://www.youtube.com/watch?v={uuid.uuid4().hex[:11]}"})
        assert r.status_code == 200, r.text
        ids.append(r.json()["job_id"])
    for i in ids:
        wait_for(lambda i=i: job_state(console, i) == "failed", timeout=60, what=f"job {i} to fail")

    log_in(browser)
    open_page(browser, f"{console}/ui/", "document.querySelector('section[data-type=media]')")
    assert int(browser.eval("document.querySelector('section[data-type=media] td[data-state=failed]')"
                            ".textContent")) >= 3
    screenshot(browser, "01-workflow-types.png")

    # the instances, filtered to the failed media jobs of this test
    open_page(browser, f"{console}/ui/sagas", "document.getElementById('instances').dataset.loaded")
    browser.eval("const f = document.getElementById('filters');"
                 "f.elements.type.value = 'media'; f.elements.state.value = 'failed';"
                 f"f.elements.created_after.value = {json.dumps(since)};"
                 "document.getElementById('apply').click(); true")
    rows = wait_for(lambda: (lambda got: got if len(got) == 3 else None)(browser.eval(
        "[...document.querySelectorAll('#rows tr')].map(r => [r.dataset.id, r.dataset.state])")),
        timeout=30, interval=0.2, what="the three failed jobs in the list")
    assert sorted(r[0] for r in rows) == sorted(ids) and {r[1] for r in rows} == {"failed"}
    screenshot(browser, "02-failed-media-jobs.png")

    # open one: its diagram marks the failed state, its failed step is shown
    chosen = rows[0][0]
    browser.eval("document.querySelector('#rows tr a').click(); true")
    wait_for(lambda: browser.eval(f"location.pathname === '/ui/sagas/{chosen}' && document.readyState === 'complete'"
                                  " && !!document.querySelector('#diagram svg')"),
             timeout=30, interval=0.2, what="the instance page")
    assert browser.eval("document.querySelector('#diagram svg [data-current=true]').dataset.state") == "failed"
    step = browser.eval("(() => { const r = document.querySelector('#steps tr[data-step=normalization]');"
                        " return [r.dataset.status, r.querySelector('.error').textContent]; })()")
    assert step[0] == "failed" and "injected 400" in step[1]
    screenshot(browser, "03-failed-job.png")

    # press Restart (the button's visible name) and watch the page follow the job to the end
    pressed = browser.eval("(() => { const b = [...document.querySelectorAll('button')]"
                           ".find(b => b.textContent.trim() === 'Restart'); if (!b) return false;"
                           " b.click(); return b.dataset.step; })()")
    assert pressed == "normalization"
    wait_for(lambda: browser.eval("document.getElementById('state').dataset.state") == "completed",
             timeout=60, interval=0.3, what="the page to show the job completed")
    assert browser.eval("document.querySelector('#steps tr[data-step=normalization]').dataset.status") == "completed"
    assert browser.eval("document.querySelector('#diagram svg [data-current=true]').dataset.state") == "completed"
    assert browser.eval("document.querySelector('#steps tr[data-step=normalization] progress').value") == 100
    assert "restarted" in browser.eval("document.getElementById('message').textContent")
    assert job_state(console, chosen) == "completed"
    screenshot(browser, "04-restarted-job-completed.png")

    # bulk: the other two, a dry run first (the count), then the run and its progress
    rest = sorted(set(ids) - {chosen})
    open_page(browser, f"{console}/ui/bulk?type=media&state=failed&created_after={since}",
              "document.getElementById('dry-run')")
    browser.eval("const a = document.getElementById('bulk'); a.elements.action.value = 'restart';"
                 "a.elements.bulk_step.value = 'normalization'; document.getElementById('dry-run').click(); true")
    matched = wait_for(lambda: browser.eval("document.getElementById('matched').dataset.matched"),
                       timeout=30, interval=0.2, what="the dry run's count")
    assert matched == "2" and "2 instances match" in browser.eval("document.getElementById('matched').textContent")
    assert [job_state(console, i) for i in rest] == ["failed", "failed"]  # a dry run changes nothing
    screenshot(browser, "05-bulk-dry-run.png")
    assert browser.eval("document.getElementById('run').textContent") == "Run on 2"
    browser.eval("document.getElementById('run').click(); true")
    wait_for(lambda: browser.eval("(document.getElementById('bulk-status').dataset.status || '')") == "completed",
             timeout=60, interval=0.3, what="the bulk run to complete on the page")
    assert "2 done, 0 skipped, 0 failed of 2" in browser.eval("document.getElementById('bulk-status').textContent")
    screenshot(browser, "06-bulk-completed.png")
    for i in rest:
        wait_for(lambda i=i: job_state(console, i) == "completed", timeout=60, what=f"job {i} to complete")
        actors = [h["actor"] for h in requests.get(f"{console}/sagas/{i}", timeout=5).json()["history"]]
        assert any(a.startswith("bulk:") for a in actors), actors


def test_operator_sends_a_signal_then_cancels_an_order(console, browser):
    ids = []
    for _ in range(2):
        r = requests.post(f"{console}/saga", timeout=10,
                          json={"type": "order", "input": {"limit": 50, "parcels": [{"id": "p1"}]}})
        assert r.status_code in (200, 201), r.text
        ids.append(r.json()["id"])
    for i in ids:
        wait_for(lambda i=i: job_state(console, i) == "awaiting_approval", timeout=60, what=f"order {i} to wait")
    approved, cancelled = ids
    log_in(browser)

    # the order waiting for its approval: type the payload, press Send event, see it ship
    open_page(browser, f"{console}/ui/sagas/{approved}", "document.getElementById('event-payload')")
    assert browser.eval("document.getElementById('event-name').value") == "approve"
    browser.eval("const t = document.getElementById('event-payload'); t.focus(); t.select(); true")
    browser.call("Input.insertText", text='{"amount": 20}')
    assert browser.eval("document.getElementById('event-payload').value") == '{"amount": 20}'
    screenshot(browser, "07-order-awaiting-approval.png")
    press(browser, "Send event")
    wait_for(lambda: browser.eval("document.getElementById('state').dataset.state") == "done",
             timeout=60, interval=0.3, what="the page to show the order done")
    assert "Event approve sent." in browser.eval("document.getElementById('message').textContent")
    history = browser.eval("[...document.querySelectorAll('#history tbody tr')]"
                           ".map(r => [...r.cells].map(c => c.textContent))")
    assert [h[1:4] for h in history if h[2] == "approve"] == [["awaiting_approval", "approve", "shipping"]]
    assert not browser.eval("!!document.getElementById('event-payload')")  # nothing left to send
    assert job_state(console, approved) == "done"
    screenshot(browser, "08-order-approved-done.png")

    # another one: press Cancel, accept the confirm dialog, see it cancelled
    open_page(browser, f"{console}/ui/sagas/{cancelled}", "document.querySelector('button[data-action=cancel]')")
    press(browser, "Cancel")
    dialog = browser.event("Page.javascriptDialogOpening")
    assert dialog["type"] == "confirm" and "Cancel this workflow" in dialog["message"]
    browser.call("Page.handleJavaScriptDialog", accept=True)
    wait_for(lambda: browser.eval("document.getElementById('state').dataset.state") == "cancelled",
             timeout=60, interval=0.3, what="the page to show the order cancelled")
    assert "Cancelled." in browser.eval("document.getElementById('message').textContent")
    assert not browser.eval("!!document.querySelector('button[data-action=cancel]')")
    assert job_state(console, cancelled) == "cancelled"
    screenshot(browser, "09-order-cancelled.png")


def test_a_bad_filter_in_the_address_shows_the_apis_refusal_not_every_instance(console, browser):
    log_in(browser)
    open_page(browser, f"{console}/ui/sagas?status=bogus", "document.getElementById('instances').dataset.loaded")
    seen = browser.eval("[document.getElementById('instances').dataset.loaded, "
                        "document.getElementById('message').textContent, document.querySelectorAll('#rows tr').length]")
    api = requests.get(f"{console}/sagas?status=bogus", timeout=5).json()
    assert seen == ["refused", f"400 {api['message']}", 0], (seen, api)
    screenshot(browser, "10-bad-filter.png")
    # corrected in the form, the list follows the filter and the message goes
    browser.eval("document.getElementById('filters').elements.status.value = 'failed';"
                 "document.getElementById('apply').click(); true")
    wait_for(lambda: browser.eval("document.getElementById('instances').dataset.loaded === 'true'"
                                  " && location.search === '?status=failed'"
                                  " && document.getElementById('message').textContent === ''"),
             timeout=30, interval=0.2, what="the corrected filter to list")


def test_a_bad_filter_in_the_bulk_address_is_refused_not_widened_to_every_instance(console, browser):
    """A bulk link with a status the select has no option for (a typo, an old link): the page
    says the API's refusal, and a dry run sends the value and is refused, where the form used
    to drop it and match every media job."""
    log_in(browser)
    open_page(browser, f"{console}/ui/bulk?type=media&status=faild", "document.getElementById('dry-run')")
    api = requests.get(f"{console}/sagas?type=media&status=faild", timeout=5).json()
    assert api["field"] == "status", api
    assert browser.eval("document.getElementById('message').textContent") == api["message"]
    assert browser.eval("document.getElementById('filters').elements.status.value") == "faild"
    browser.eval("document.getElementById('dry-run').click(); true")
    said = wait_for(lambda: browser.eval("document.getElementById('message').textContent").startswith("400"),
                    timeout=30, interval=0.2, what="the dry run's refusal")
    assert said
    seen = browser.eval("[document.getElementById('message').textContent, "
                        "document.getElementById('matched').textContent, document.getElementById('run').disabled]")
    assert seen[0].startswith("400 filter.status:") and seen[1:] == ["", True], seen
    screenshot(browser, "11-bulk-bad-filter.png")
