// The operator console's little JavaScript: same-origin calls to the JSON API (and to the
// console's own /ui/bulk routes), and refreshing the pages that follow running work.
"use strict";
(function () {
  const REFRESH = 1000 * (Number(document.body.dataset.refresh) || 2);
  const PAGE_SIZE = 25;
  const $ = (sel) => document.querySelector(sel);

  function say(text, bad) {
    const m = $("#message");
    m.textContent = text;
    m.className = bad ? "bad" : "";
  }

  async function call(method, url, body) {
    const init = { method, headers: { Accept: "application/json" }, credentials: "same-origin" };
    if (body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    const resp = await fetch(url, init);
    let data = null;
    try { data = await resp.json(); } catch (e) { data = null; }
    if (!resp.ok) {
      const text = data ? (data.message || data.error) : resp.statusText;
      const named = data && data.field && !text.startsWith(data.field + ":");
      const msg = named ? `${data.field}: ${text}` : text;
      throw new Error(`${resp.status} ${msg}`);
    }
    return data;
  }

  // The filters in the address: the page was opened with them (a select cannot show a value it
  // has no option for, so the form alone would drop a bad one), and apply() writes them there.
  function addressFilters(form) {
    const out = {};
    for (const [name, value] of new URLSearchParams(location.search)) {
      if (form.elements[name] && value.trim() !== "") out[name] = value.trim();
    }
    return out;
  }

  function filterValues(form) {
    const out = {};
    for (const el of form.elements) {
      if (el.name && el.value.trim() !== "") out[el.name] = el.value.trim();
    }
    return out;
  }

  function cell(text, href) {
    const td = document.createElement("td");
    if (href) {
      const a = document.createElement("a");
      a.href = href;
      a.textContent = text;
      td.appendChild(a);
    } else {
      td.textContent = text == null ? "" : text;
    }
    return td;
  }

  // -- instances: the table is drawn from GET /sagas and redrawn every few seconds ----------
  function instancesPage() {
    const form = $("#filters");
    let offset = Number(new URLSearchParams(location.search).get("offset")) || 0;
    let total = 0;

    async function load() {
      const filters = addressFilters(form);
      const query = new URLSearchParams({ ...filters, limit: PAGE_SIZE, offset });
      $("#to-bulk").href = "/ui/bulk?" + new URLSearchParams(filters);
      let page;
      try {
        page = await call("GET", "/sagas?" + query);
      } catch (err) {
        say(err.message, true);  // e.g. the API's 400 naming a bad filter: no rows rather than all of them
        $("#rows").replaceChildren();
        $("#total").textContent = $("#page").textContent = "";
        $("#instances").dataset.loaded = "refused";
        return;
      }
      total = page.total;
      const rows = $("#rows");
      rows.replaceChildren(...page.items.map((it) => {
        const tr = document.createElement("tr");
        tr.dataset.id = it.id;
        tr.dataset.state = it.state;
        tr.append(cell(it.id, "/ui/sagas/" + encodeURIComponent(it.id)), cell(it.type), cell(it.key),
                  cell(it.state), cell(it.created_at), cell(it.updated_at));
        return tr;
      }));
      $("#total").textContent = `${total} matching`;
      $("#page").textContent = total ? `${offset + 1}–${Math.min(offset + PAGE_SIZE, total)} of ${total}` : "";
      $("#prev").disabled = offset === 0;
      $("#next").disabled = offset + PAGE_SIZE >= total;
      $("#updated").textContent = "refreshed " + new Date().toLocaleTimeString();
      $("#instances").dataset.loaded = "true";
    }

    function apply() {
      offset = 0;
      history.replaceState(null, "", "?" + new URLSearchParams(filterValues(form)));
      say("");
      load();
    }
    $("#apply").addEventListener("click", apply);
    form.addEventListener("submit", (ev) => { ev.preventDefault(); apply(); });
    form.addEventListener("change", apply);
    $("#prev").addEventListener("click", () => { offset = Math.max(0, offset - PAGE_SIZE); load(); });
    $("#next").addEventListener("click", () => { offset += PAGE_SIZE; load(); });
    load();
    setInterval(load, REFRESH);
  }

  // -- one instance: the server renders the part that changes; it is swapped in every few seconds
  function instancePage() {
    const box = $("#instance");
    const id = box.dataset.id;
    const base = "/sagas/" + encodeURIComponent(id);

    async function refresh() {
      const active = document.activeElement;
      if (active && box.contains(active) && /^(TEXTAREA|SELECT|INPUT)$/.test(active.tagName)) return;
      const resp = await fetch(location.pathname + "?part=1", { credentials: "same-origin" });
      if (resp.ok) box.innerHTML = await resp.text();
    }

    box.addEventListener("click", async (ev) => {
      const button = ev.target.closest("button[data-action]");
      if (!button) return;
      const action = button.dataset.action;
      try {
        if (action === "restart") {
          await call("POST", `${base}/restart?step=${encodeURIComponent(button.dataset.step)}`);
          say(`Step ${button.dataset.step} restarted.`);
        } else if (action === "cancel") {
          if (!confirm("Cancel this workflow? Its compensations run.")) return;
          await call("POST", `${base}/cancel`);
          say("Cancelled.");
        } else if (action === "event") {
          const name = $("#event-name").value;
          let payload;
          try { payload = JSON.parse($("#event-payload").value || "{}"); } catch (e) {
            say("payload: not valid JSON", true);
            return;
          }
          await call("POST", `${base}/events/${encodeURIComponent(name)}`, payload);
          say(`Event ${name} sent.`);
        }
      } catch (err) {
        say(err.message, true);
      }
      document.activeElement && document.activeElement.blur();
      refresh();
    });
    setInterval(refresh, REFRESH);
  }

  // -- bulk: a dry run first (count and sample), then the run and its progress ----------------
  function bulkPage() {
    const action = $("#bulk");
    const filters = $("#filters");
    let timer = null;
    let current = null;

    function request(dryRun) {
      const a = filterValues(action);
      const req = { action: a.action, filter: filterValues(filters), dry_run: dryRun };
      if (a.action === "restart" && a.bulk_step) req.step = a.bulk_step;
      if (a.action === "event") {
        req.event = a.event;
        req.payload = JSON.parse(a.payload || "{}");
      }
      if (a.rate_per_second) req.rate_per_second = Number(a.rate_per_second);
      return req;
    }

    function stale() {  // the form changed: the count shown no longer holds
      $("#run").disabled = true;
      $("#matched").textContent = "";
      $("#sample").textContent = "";
    }
    action.addEventListener("input", stale);
    filters.addEventListener("input", stale);
    filters.addEventListener("submit", (ev) => ev.preventDefault());

    $("#dry-run").addEventListener("click", async () => {
      say("");
      try {
        const res = await call("POST", "/ui/bulk/run", request(true));
        $("#matched").textContent = `${res.matched} instance${res.matched === 1 ? "" : "s"} match`;
        $("#matched").dataset.matched = res.matched;
        $("#sample").textContent = res.sample.length ? "for example: " + res.sample.join(", ") : "";
        $("#run").textContent = `Run on ${res.matched}`;
        $("#run").disabled = res.matched === 0;
      } catch (err) {
        say(err.message, true);
      }
    });

    async function follow() {
      let st;
      try { st = await call("GET", "/ui/bulk/" + encodeURIComponent(current)); } catch (err) {
        say(err.message, true);
        return;
      }
      const finished = st.done + st.skipped + st.failed;
      $("#bulk-bar").max = Math.max(st.matched, 1);
      $("#bulk-bar").value = finished;
      $("#bulk-status").textContent = `${st.status}: ${st.done} done, ${st.skipped} skipped, ` +
        `${st.failed} failed of ${st.matched}`;
      $("#bulk-status").dataset.status = st.status;
      $("#bulk-errors").replaceChildren(...(st.errors || []).map((e) => {
        const li = document.createElement("li");
        li.textContent = typeof e === "string" ? e : JSON.stringify(e);
        return li;
      }));
      if (st.status !== "running") {
        clearInterval(timer);
        $("#bulk-cancel").hidden = true;
      }
    }

    $("#run").addEventListener("click", async () => {
      $("#run").disabled = true;
      try {
        const res = await call("POST", "/ui/bulk/run", request(false));
        current = res.bulk_id;
        say(`Bulk ${current} started on ${res.matched} instances.`);
        $("#progress").hidden = false;
        $("#progress").dataset.bulkId = current;
        $("#bulk-cancel").hidden = false;
        follow();
        timer = setInterval(follow, 1000);
      } catch (err) {
        say(err.message, true);
      }
    });

    $("#bulk-cancel").addEventListener("click", async () => {
      try { await call("POST", `/ui/bulk/${encodeURIComponent(current)}/cancel`); } catch (err) {
        say(err.message, true);
      }
      follow();
    });
  }

  const pages = { instances: instancesPage, instance: instancePage, bulk: bulkPage };
  if (pages[window.CONSOLE_PAGE]) pages[window.CONSOLE_PAGE]();
})();
