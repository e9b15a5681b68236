// The user panel: balance, alerts at 80 % and 100 %, per-service stats,
// paginated history, a 30-day chart and the plans table.
(function () {
  const { T, api, el, showMessage, session, num, date } = window.CG;
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

  function renderMe(me) {
    const total = me.credits.monthly_allowance + me.credits.bonus;
    const remaining = me.credits.remaining;
    const usedPct = total > 0 ? Math.min(100, Math.max(0, Math.round(((total - remaining) / total) * 100))) : 100;
    $("remaining").textContent = `${num(remaining)} ${T.of_total} ${num(total)}`;
    const bar = $("bar");
    $("bar-fill").style.width = `${100 - usedPct}%`;
    bar.setAttribute("aria-valuenow", String(100 - usedPct));
    bar.className = "bar" + (usedPct >= 100 ? " bad" : usedPct >= 80 ? " warn" : "");
    $("used-pct").textContent = `${usedPct} % ${T.used_pct} · ${T.monthly} ${num(me.credits.monthly_remaining)} · ${T.bonus} ${num(me.credits.bonus)}`;
    const alert = $("alert");
    if (remaining <= 0 || usedPct >= 100) showMessage(alert, T.alert_100, "error");
    else if (usedPct >= 80) showMessage(alert, T.alert_80, "warn");
    else showMessage(alert, "", "");
    $("daily").textContent = me.daily.limit == null
      ? `${num(me.daily.used)} (${T.daily_unlimited})`
      : `${num(me.daily.used)} / ${num(me.daily.limit)}`;
    $("plan").textContent = me.plan ? me.plan.name : "—";
    $("resets").textContent = `${T.resets} ${date(me.period.resets_at)}`;
    return me.plan ? me.plan.id : null;
  }

  function renderUsage(usage) {
    table($("services"), [T.service, T.credits, T.requests],
      usage.totals.map((t) => [t.module, num(t.credits), num(t.requests)]));
    const tx = usage.transactions;
    table($("history"), [T.date, T.kind, T.service, T.amount, T.balance_after],
      tx.items.map((t) => [date(t.occurred_at), T.kinds[t.kind] || t.kind, t.module || "—", num(t.amount),
        t.monthly_after == null ? "—" : num(t.monthly_after + t.bonus_after)]));
    const pages = Math.max(1, Math.ceil(tx.total / tx.per_page));
    $("page").textContent = `${T.page} ${tx.page} / ${pages}`;
    $("prev").disabled = tx.page <= 1;
    $("next").disabled = tx.page >= pages;
    const labels = usage.series.map((d) => d.date.slice(5));
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
    table($("plans"), [T.plan, T.price, T.per_month, T.per_day, T.modules],
      plans.map((p) => [p.id === current ? `${p.name} (${T.your_plan})` : p.name, num(p.price_dzd),
        num(p.monthly_credits), p.daily_limit == null ? T.unlimited : num(p.daily_limit), p.modules.join(", ")]), idx);
  }

  async function load() {
    const [me, usage, plans] = await Promise.all([
      get("/api/billing/me"),
      get(`/api/billing/usage?days=30&page=${page}&per_page=${PER_PAGE}`),
      fetch("/api/billing/plans").then((r) => r.json()),
    ]);
    const current = renderMe(me);
    renderUsage(usage);
    renderPlans(plans.plans, current);
  }

  const start = session(STORE, "account", load, () => { page = 1; });
  $("prev").addEventListener("click", () => { page = Math.max(1, page - 1); start(); });
  $("next").addEventListener("click", () => { page += 1; start(); });
})();
