// The user panel: balance, alerts at 80 % and 100 %, per-service stats,
// paginated history, a 30-day chart, the user's API keys and the plans
// table.
(function () {
  const { T, api, el, fill, showMessage, session, setTimeZone, save, num, money, centimes, date, day, month } = window.CG;
  const $ = (id) => document.getElementById(id);
  const STORE = "creditgate.user_key";
  const PER_PAGE = 10;
  let page = 1;
  let chart = null;

  // Static labels from the strings table.
  document.title = T.title_user;
  $("title").textContent = T.title_user;
  $("logout").textContent = T.disconnect;
  $("connect").textContent = T.connect;
  document.querySelector('label[for="key"]').textContent = T.api_key;
  $("key-hint").textContent = T.key_hint;
  $("credits-title").textContent = T.credits_remaining;
  $("l-remaining").textContent = T.credits_remaining;
  $("l-daily").textContent = T.daily;
  $("l-plan").textContent = T.plan;
  $("chart-title").textContent = T.chart_30d;
  $("chart").setAttribute("aria-label", T.chart_30d);
  $("services-title").textContent = T.per_service;
  $("history-title").textContent = T.history;
  $("plans-title").textContent = T.plans;
  $("invoices-title").textContent = T.invoices_title;
  $("costs-title").textContent = T.costs_title;
  $("keys-title").textContent = T.keys_title;
  $("l-key-name").textContent = T.key_name;
  $("l-key-expires").textContent = T.key_expires;
  $("l-key-modules").textContent = T.key_scope;
  $("key-create").textContent = T.key_create;
  $("key-dialog-title").textContent = T.key_created_title;
  $("key-dialog-note").textContent = T.key_created_note;
  $("l-new-key").textContent = T.key_created_title;
  $("key-copy").textContent = T.key_copy;
  $("key-dialog-close").textContent = T.key_done;
  $("prev").textContent = T.previous;
  $("next").textContent = T.next;

  const key = () => sessionStorage.getItem(STORE);
  const get = (path) => api(path, { header: "X-API-Key", key: key() }).then((r) => r.json());

  function table(node, head, rows, currentRow) {
    node.replaceChildren(
      el("thead", {}, el("tr", {}, head.map((h) => el("th", { scope: "col" }, h)))),
      el("tbody", {}, rows.map((cells, i) => el("tr", { class: currentRow === i ? "current" : "" }, cells.map((c) => el("td", {}, c))))),
    );
  }

  // Module id -> its label, from /api/billing/credit-costs.
  let labels = {};
  const label = (m) => (m ? labels[m] || m : "—");

  const pct = (used, total) => (total > 0 ? Math.min(100, Math.max(0, Math.round((used / total) * 100))) : 100);
  const level = (p) => (p >= 100 ? " bad" : p >= 80 ? " warn" : "");

  function renderMe(me) {
    setTimeZone(me.timezone);
    const renewal = day(me.period.renews_on);
    const total = me.credits.monthly_allowance + me.credits.bonus;
    const remaining = me.credits.remaining;
    const usedPct = pct(total - remaining, total);
    $("remaining").textContent = `${num(remaining)} ${T.of_total} ${num(total)}`;
    const bar = $("bar");
    $("bar-fill").style.width = `${100 - usedPct}%`;
    bar.setAttribute("aria-valuenow", String(100 - usedPct));
    bar.className = "bar" + level(usedPct);
    $("used-pct").textContent = `${usedPct} % ${T.used_pct} · ${T.monthly} ${num(me.credits.monthly_remaining)} · ${T.bonus} ${num(me.credits.bonus)}`;
    // What stops the calls, and what to do about it, first.
    const banner = $("banner");
    if (me.status === "blocked") showMessage(banner, T.banner_blocked, "error");
    else if (me.auto_blocked) showMessage(banner, fill(T.banner_auto_blocked, { day: renewal }), "error");
    else showMessage(banner, "", "");
    const alert = $("alert");
    if (me.status === "blocked" || me.auto_blocked) showMessage(alert, "", "");
    else if (remaining <= 0 || usedPct >= 100) showMessage(alert, fill(T.alert_100, { day: renewal }), "error");
    else if (usedPct >= 80) showMessage(alert, T.alert_80, "warn");
    else showMessage(alert, "", "");
    const limit = me.daily.limit;
    const dailyBar = $("daily-bar");
    const dailyAlert = $("daily-alert");
    if (limit == null) {
      $("daily").textContent = num(me.daily.used);
      $("daily-note").textContent = T.daily_unlimited;
      dailyBar.hidden = true;
      showMessage(dailyAlert, "", "");
    } else {
      const dailyPct = pct(me.daily.used, limit);
      $("daily").textContent = `${num(me.daily.used)} / ${num(limit)}`;
      $("daily-note").textContent = fill(T.daily_of, { used: num(me.daily.used), limit: num(limit) });
      dailyBar.hidden = false;
      dailyBar.className = "bar" + level(dailyPct);
      dailyBar.setAttribute("aria-valuenow", String(dailyPct));
      $("daily-fill").style.width = `${dailyPct}%`;
      if (me.status === "blocked" || me.auto_blocked || remaining <= 0) showMessage(dailyAlert, "", "");
      else if (dailyPct >= 100) showMessage(dailyAlert, T.daily_100, "error");
      else if (dailyPct >= 80) showMessage(dailyAlert, T.daily_80, "warn");
      else showMessage(dailyAlert, "", "");
    }
    $("plan").textContent = me.plan ? me.plan.name : "—";
    $("resets").textContent = `${T.resets} ${renewal}`;
    return me.plan ? me.plan.id : null;
  }

  function renderUsage(usage) {
    table($("services"), [T.service, T.credits, T.requests],
      usage.totals.map((t) => [label(t.module), num(t.credits), num(t.requests)]));
    const tx = usage.transactions;
    table($("history"), [T.date, T.kind, T.service, T.amount, T.balance_after],
      tx.items.map((t) => [date(t.occurred_at), T.kinds[t.kind] || t.kind, label(t.module), num(t.amount),
        t.monthly_after == null ? "—" : num(t.monthly_after + t.bonus_after)]));
    const pages = Math.max(1, Math.ceil(tx.total / tx.per_page));
    $("page").textContent = `${T.page} ${tx.page} / ${pages}`;
    $("prev").disabled = tx.page <= 1;
    $("next").disabled = tx.page >= pages;
    const labels = usage.series.map((d) => `${d.date.slice(8)}/${d.date.slice(5, 7)}`);
    const data = usage.series.map((d) => d.credits);
    if (chart) chart.destroy();
    chart = new Chart($("chart"), {
      type: "bar",
      data: { labels, datasets: [{ label: T.credits, data, backgroundColor: "#0b6e4f" }] },
      options: { animation: false, responsive: true, plugins: { legend: { display: false } } },
    });
  }

  function renderPlans(plans, current) {
    const idx = plans.findIndex((p) => p.id === current);
    table($("plans"), [T.plan, T.price, T.per_month, T.per_day, T.rate, T.modules, T.features],
      plans.map((p) => [p.id === current ? `${p.name} (${T.your_plan})` : p.name,
        p.price_dzd === 0 ? T.free : money(p.price_dzd),
        num(p.monthly_credits), p.daily_limit == null ? T.unlimited : num(p.daily_limit),
        p.rate_limit ? fill(T.rate_value, { rate: num(p.rate_limit.per_minute), burst: num(p.rate_limit.burst) }) : T.unlimited,
        p.modules.map(label).join(", "), p.features.length ? p.features.join(" · ") : "—"]), idx);
  }

  async function downloadInvoice(inv) {
    try {
      await save(await api(inv.pdf, { header: "X-API-Key", key: key() }), `facture-${inv.period}.pdf`);
    } catch (e) {
      showMessage($("invoices-message"), e.message, "error");
    }
  }

  function renderCosts(costs, plan) {
    const mine = new Set(plan ? plan.modules : []);
    table($("costs"), [T.service, T.description, T.cost_per_call, T.in_your_plan],
      costs.modules.map((m) => [m.label, m.description || "—", num(m.cost), mine.has(m.module) ? T.yes : T.no]));
  }

  function renderInvoices(answer) {
    const rows = answer.invoices.slice().reverse().map((inv) => {
      const button = el("button", { type: "button", class: "secondary",
        "aria-label": fill(T.invoice_download_label, { period: month(inv.period) }) }, T.invoice_download);
      button.addEventListener("click", () => downloadInvoice(inv));
      return [month(inv.period), inv.number || T.invoice_draft,
        centimes(inv.total_ht_centimes), centimes(inv.total_ttc_centimes), button];
    });
    table($("invoices"), [T.invoice_period, T.invoice_number, T.invoice_total_ht, T.invoice_total_ttc, T.actions], rows);
    showMessage($("invoices-message"), rows.length ? "" : T.invoices_none, "ok");
  }

  const send = (path, method, body) => api(path, { header: "X-API-Key", key: key(), method, body });

  function renderKeys(answer) {
    $("keys-count").textContent = fill(T.keys_count, { n: answer.keys.length, max: answer.max_keys });
    const now = Date.now();
    const rows = answer.keys.map((k) => {
      const expired = k.expires_at && Date.parse(k.expires_at) <= now;
      const revoke = el("button", { type: "button", class: "secondary", "aria-label": `${T.key_revoke} ${k.name || `${k.prefix}…`}` }, T.key_revoke);
      revoke.addEventListener("click", () => revokeKey(k));
      return [k.name || "—", `${k.prefix}…`, k.modules ? k.modules.map(label).join(", ") : T.key_scope_all,
        k.expires_at ? `${date(k.expires_at)}${expired ? ` (${T.key_expired})` : ""}` : T.key_never,
        k.last_used_at ? date(k.last_used_at) : T.key_never_used, revoke];
    });
    table($("keys"), [T.key_name, T.key_prefix, T.key_scope, T.key_expires, T.key_last_used, T.actions], rows);
  }

  function renderModuleChoices(plan) {
    const box = $("key-modules");
    const legend = box.querySelector("legend");
    const choices = (plan ? plan.modules : []).map((m) => el("label", {},
      el("input", { type: "checkbox", name: "module", value: m }), label(m)));
    box.replaceChildren(legend, ...choices);
  }

  async function revokeKey(k) {
    if (!confirm(fill(T.confirm_revoke, { name: k.name }))) return;
    try {
      await send(`/api/billing/keys/${k.id}`, "DELETE");
      // The list first, then the message: when it says so, the list shows it.
      renderKeys(await get("/api/billing/keys"));
      showMessage($("keys-message"), fill(T.done_revoke, { name: k.name }), "ok");
    } catch (e) {
      showMessage($("keys-message"), e.message, "error");
    }
  }

  $("key-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const body = { name: $("key-name").value.trim() };
    const day = $("key-expires").value;
    // The end of the chosen day, in the user's own time zone.
    if (day) body.expires_at = new Date(`${day}T23:59:59`).toISOString();
    const modules = [...document.querySelectorAll('#key-modules input[name="module"]:checked')].map((c) => c.value);
    if (modules.length) body.modules = modules;
    try {
      const created = await (await send("/api/billing/keys", "POST", body)).json();
      showMessage($("keys-message"), "", "");
      $("key-form").reset();
      renderKeys(await get("/api/billing/keys"));
      $("new-key").value = created.api_key;
      showMessage($("key-copy-message"), "", "");
      $("key-dialog").showModal();
      $("new-key").select();
    } catch (e) {
      showMessage($("keys-message"), e.message, "error");
    }
  });
  $("key-copy").addEventListener("click", async () => {
    $("new-key").select();
    try {
      await navigator.clipboard.writeText($("new-key").value);
      showMessage($("key-copy-message"), T.key_copied, "ok");
    } catch (_) {
      // Without clipboard access the key stays selected for Ctrl+C.
    }
  });
  $("key-dialog-close").addEventListener("click", () => {
    $("new-key").value = "";
    $("key-dialog").close();
  });
  // Shown once: the key leaves the page with the dialog, however it closes.
  $("key-dialog").addEventListener("close", () => { $("new-key").value = ""; });

  async function load() {
    const [me, usage, plans, keys, costs, invoices] = await Promise.all([
      get("/api/billing/me"),
      get(`/api/billing/usage?days=30&page=${page}&per_page=${PER_PAGE}`),
      fetch("/api/billing/plans").then((r) => r.json()),
      get("/api/billing/keys"),
      fetch("/api/billing/credit-costs").then((r) => r.json()),
      get("/api/billing/invoices").catch(() => ({ invoices: [] })),
    ]);
    labels = Object.fromEntries(costs.modules.map((m) => [m.module, m.label]));
    const current = renderMe(me);
    renderUsage(usage);
    renderKeys(keys);
    renderModuleChoices(me.plan);
    renderPlans(plans.plans, current);
    renderInvoices(invoices);
    renderCosts(costs, me.plan);
  }

  const start = session(STORE, "account", load, () => { page = 1; });
  $("prev").addEventListener("click", () => { page = Math.max(1, page - 1); start(); });
  $("next").addEventListener("click", () => { page += 1; start(); });
})();
