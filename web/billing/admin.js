// The admin panel: global stats and charts, users with filters and
// actions (grant, block, unblock, change plan), CSV export, audit trail.
(function () {
  const { T, api, el, fill, showMessage, session, setTimeZone, save, num, date, day, month } = window.CG;
  const $ = (id) => document.getElementById(id);
  const STORE = "creditgate.admin_key";
  const PER_PAGE = 20;
  const state = { page: 1, plans: [], charts: {} };

  document.title = T.title_admin;
  const labels = {
    title: T.title_admin, logout: T.disconnect, connect: T.connect, "key-hint": T.key_hint,
    "l-users": T.users, "l-revenue": T.revenue, "l-today": T.today, "l-month": T.this_month,
    "t-revenue": T.revenue_by_plan, "t-consumption": T.consumption_30d, "t-split": T.plan_split,
    "t-users": T.users, "l-plan": T.plan, "l-status": T.status, "l-q": T.search, export: T.export_csv,
    prev: T.previous, next: T.next, "t-audit": T.audit, "grant-title": T.grant,
    "l-grant-credits": T.grant_amount, "l-grant-reason": T.grant_reason, "grant-cancel": T.cancel,
    "grant-submit": T.grant, "t-top": T.top_consumers, "t-usage-export": T.usage_export,
    "l-usage-from": T.usage_from, "l-usage-to": T.usage_to, "usage-export": T.usage_download,
    "t-create": T.create_user, "l-create-name": T.create_name, "l-create-email": T.create_email,
    "l-create-plan": T.create_plan, "create-submit": T.create_submit, "secret-note": T.secret_note,
    "l-secret-key": T.api_key, "secret-close": T.key_done, "user-key-create": T.key_new,
    "keys-dialog-close": T.close,
  };
  for (const [id, text] of Object.entries(labels)) $(id).textContent = text;
  document.querySelector('label[for="key"]').textContent = T.admin_key;

  const key = () => sessionStorage.getItem(STORE);
  const call = (path, opts = {}) => api(path, { header: "X-Admin-Key", key: key(), ...opts });
  const get = (path) => call(path).then((r) => r.json());
  const result = (text, kind) => showMessage($("result"), text, kind);

  function table(node, head, rows) {
    node.replaceChildren(
      el("thead", {}, el("tr", {}, head.map((h) => el("th", { scope: "col" }, h)))),
      el("tbody", {}, rows.map((cells) => el("tr", {}, cells.map((c) => el("td", {}, c))))),
    );
  }

  function chart(id, config) {
    if (state.charts[id]) state.charts[id].destroy();
    config.options = { animation: false, responsive: true, ...(config.options || {}) };
    state.charts[id] = new Chart($(id), config);
  }

  function renderStats(stats) {
    setTimeZone(stats.timezone);
    $("users-total").textContent = num(stats.users.total);
    $("users-detail").textContent = Object.entries(stats.users.by_status)
      .map(([s, n]) => `${T[s] || s} : ${num(n)}`).join(" · ");
    $("revenue").textContent = `${num(stats.revenue.monthly_dzd)} ${T.dzd}`;
    const sum = (m) => Object.values(m).reduce((a, x) => a + x.credits, 0);
    $("today").textContent = num(sum(stats.consumption.today));
    $("month").textContent = num(sum(stats.consumption.this_month));
    const plans = state.plans;
    // Monthly recurring revenue over the last 12 months (plan and block
    // history), the current month last.
    const mrr = stats.revenue.by_month || [];
    chart("revenue-chart", {
      type: "bar",
      data: { labels: mrr.map((m) => month(m.month, "short")),
        datasets: [{ label: T.revenue, data: mrr.map((m) => m.dzd), backgroundColor: "#0b6e4f" }] },
      options: { plugins: { legend: { display: false } } },
    });
    chart("consumption-chart", {
      type: "line",
      data: { labels: (stats.daily || []).map((d) => `${d.date.slice(8)}/${d.date.slice(5, 7)}`),
        datasets: [{ label: T.credits, data: (stats.daily || []).map((d) => d.credits), borderColor: "#0b6e4f", fill: false }] },
      options: { plugins: { legend: { display: false } } },
    });
    chart("split-chart", {
      type: "doughnut",
      data: { labels: plans.map((p) => p.name),
        datasets: [{ data: plans.map((p) => stats.users.by_plan[p.id] || 0),
          backgroundColor: ["#9ccfb9", "#0b6e4f", "#f2b84b", "#5b8def", "#b3261e", "#777"] }] },
    });
  }

  const planName = (id) => (state.plans.find((p) => p.id === id) || { name: id }).name;

  function renderTop(stats) {
    const rows = stats.top_consumers.map((c) => [c.name, c.user_id, planName(c.plan), num(c.credits)]);
    table($("top"), [T.name, "ID", T.plan, T.credits], rows.length ? rows : [[T.no_data, "", "", ""]]);
  }

  function actionButtons(user) {
    const blocked = user.status === "blocked";
    const planSelect = el("select", { "aria-label": `${T.change_plan} — ${user.name}` },
      state.plans.map((p) => el("option", { value: p.id, ...(p.id === user.plan ? { selected: "" } : {}) }, p.name)));
    planSelect.addEventListener("change", () => changePlan(user, planSelect));
    return el("div", { class: "row" },
      el("button", { type: "button", class: "secondary", onclick: () => openGrant(user) }, T.grant),
      el("button", { type: "button", class: "secondary", "aria-label": `${T.keys} — ${user.name}`, onclick: () => openKeys(user) }, T.keys),
      el("button", { type: "button", class: "secondary", onclick: () => setBlocked(user, !blocked) }, blocked ? T.unblock : T.block),
      planSelect);
  }

  async function loadUsers() {
    const q = new URLSearchParams({ page: state.page, per_page: PER_PAGE });
    if ($("f-plan").value) q.set("plan", $("f-plan").value);
    if ($("f-status").value) q.set("status", $("f-status").value);
    if ($("f-q").value.trim()) q.set("q", $("f-q").value.trim());
    const list = await get(`/api/admin/billing/users?${q}`);
    table($("users"), ["ID", T.name, T.plan, T.status, T.remaining, T.used_month, T.actions],
      list.users.map((u) => [u.id, u.name, planName(u.plan), T[u.status] || u.status, num(u.credits_remaining), num(u.used_this_month), actionButtons(u)]));
    const pages = Math.max(1, Math.ceil(list.total / list.per_page));
    $("page").textContent = `${T.page} ${list.page} / ${pages}`;
    $("prev").disabled = list.page <= 1;
    $("next").disabled = list.page >= pages;
  }

  async function loadAudit() {
    const audit = await get("/api/admin/billing/audit?per_page=20");
    table($("audit"), [T.date, T.actor, T.action, T.user, T.details],
      audit.entries.map((e) => [date(e.at), e.actor, e.action, e.user_id || "—", JSON.stringify(e.details)]));
  }

  async function loadAll() {
    const [plans, stats] = await Promise.all([
      fetch("/api/billing/plans").then((r) => r.json()),
      get("/api/admin/billing/stats?days=30&months=12"),
    ]);
    state.plans = plans.plans;
    if ($("create-plan").options.length === 0) {
      $("create-plan").append(...state.plans.map((p) => el("option", { value: p.id }, p.name)));
    }
    if ($("f-plan").options.length === 0) {
      $("f-plan").append(el("option", { value: "" }, T.all), ...state.plans.map((p) => el("option", { value: p.id }, p.name)));
      $("f-status").append(el("option", { value: "" }, T.all), el("option", { value: "active" }, T.active), el("option", { value: "blocked" }, T.blocked));
    }
    renderStats(stats);
    renderTop(stats);
    defaultRange(stats.timezone);
    await Promise.all([loadUsers(), loadAudit()]);
  }

  async function act(work, done) {
    try {
      await work();
      result(done, "ok");
      await loadAll();
    } catch (e) {
      result(e.message, "error");
    }
  }

  function setBlocked(user, block) {
    if (!confirm(fill(block ? T.confirm_block : T.confirm_unblock, { name: user.name }))) return;
    act(() => call(`/api/admin/billing/users/${encodeURIComponent(user.id)}/${block ? "block" : "unblock"}`, { method: "POST", body: {} }),
      fill(block ? T.done_block : T.done_unblock, { name: user.name }));
  }

  function changePlan(user, select) {
    const plan = state.plans.find((p) => p.id === select.value);
    if (!plan || !confirm(fill(T.confirm_plan, { name: user.name, plan: plan.name }))) {
      select.value = user.plan;
      return;
    }
    act(() => call(`/api/admin/billing/users/${encodeURIComponent(user.id)}/plan`, { method: "PUT", body: { plan: plan.id } }),
      fill(T.done_plan, { name: user.name, plan: plan.name }));
  }

  // A new key is shown once, in its own dialog; closing it forgets it.
  function showSecret(name, key) {
    $("secret-title").textContent = fill(T.secret_title, { name });
    $("secret-key").value = key;
    $("secret-dialog").showModal();
    $("secret-key").select();
  }
  $("secret-close").addEventListener("click", () => {
    $("secret-key").value = "";
    $("secret-dialog").close();
  });
  $("secret-dialog").addEventListener("close", () => { $("secret-key").value = ""; });

  $("create-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const body = { name: $("create-name").value.trim(), plan: $("create-plan").value };
    const email = $("create-email").value.trim();
    if (email) body.email = email;
    try {
      const created = await (await call("/api/admin/billing/users", { method: "POST", body })).json();
      $("create-form").reset();
      result(fill(T.created_user, { name: created.user.name }), "ok");
      showSecret(created.user.name, created.api_key);
      await loadAll();
    } catch (e) {
      result(e.message, "error");
    }
  });

  let keysOf = null;
  async function renderUserKeys() {
    const user = keysOf;
    const detail = await get(`/api/admin/billing/users/${encodeURIComponent(user.id)}`);
    const rows = detail.keys.map((k) => {
      const cells = [k.name || "—", `${k.prefix}…`, date(k.created_at), k.last_used_at ? date(k.last_used_at) : T.key_never_used];
      if (k.revoked_at) return [...cells, T.key_revoked];
      const revoke = el("button", { type: "button", class: "secondary", "aria-label": `${T.key_revoke} ${k.prefix}…` }, T.key_revoke);
      revoke.addEventListener("click", async () => {
        if (!confirm(fill(T.confirm_admin_revoke, { prefix: k.prefix, name: user.name }))) return;
        try {
          await call(`/api/admin/billing/users/${encodeURIComponent(user.id)}/keys/${k.id}`, { method: "DELETE" });
          await renderUserKeys();
          showMessage($("keys-dialog-message"), fill(T.done_admin_revoke, { prefix: k.prefix }), "ok");
        } catch (e) {
          showMessage($("keys-dialog-message"), e.message, "error");
        }
      });
      return [...cells, revoke];
    });
    table($("user-keys"), [T.key_name, T.key_prefix, T.date, T.key_last_used, T.actions], rows);
  }
  async function openKeys(user) {
    keysOf = user;
    $("keys-dialog-title").textContent = fill(T.keys_of, { name: user.name });
    showMessage($("keys-dialog-message"), "", "");
    try {
      await renderUserKeys();
      $("keys-dialog").showModal();
    } catch (e) {
      result(e.message, "error");
    }
  }
  $("keys-dialog-close").addEventListener("click", () => $("keys-dialog").close());
  $("user-key-create").addEventListener("click", async () => {
    const user = keysOf;
    try {
      const created = await (await call(`/api/admin/billing/users/${encodeURIComponent(user.id)}/keys`, { method: "POST", body: {} })).json();
      await renderUserKeys();
      showSecret(user.name, created.api_key);
    } catch (e) {
      showMessage($("keys-dialog-message"), e.message, "error");
    }
  });

  let granting = null;
  function openGrant(user) {
    granting = user;
    $("grant-credits").value = "";
    $("grant-reason").value = "";
    $("grant-dialog").showModal();
    $("grant-credits").focus();
  }
  $("grant-cancel").addEventListener("click", () => $("grant-dialog").close());
  $("grant-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const credits = Number($("grant-credits").value);
    const reason = $("grant-reason").value.trim();
    const user = granting;
    $("grant-dialog").close();
    if (!user || !confirm(fill(T.confirm_grant, { credits: num(credits), name: user.name }))) return;
    act(() => call("/api/admin/billing/grant", { method: "POST", body: { user_id: user.id, credits, reason } }),
      fill(T.done_grant, { credits: num(credits), name: user.name }));
  });

  // Exports need the admin header, so they are fetched, then saved.
  async function download(path, file, done) {
    try {
      await save(await call(path), file);
      result(done, "ok");
    } catch (e) {
      result(e.message, "error");
    }
  }
  $("export").addEventListener("click", () => download("/api/admin/billing/export.csv", "utilisateurs.csv", T.done_export));
  // The ledger's operations over a range of local days, this month (in the
  // deployment's time zone) by default.
  function defaultRange(timeZone) {
    if ($("usage-from").value) return;
    let today;
    try {
      today = new Intl.DateTimeFormat("en-CA", { timeZone }).format(new Date());
    } catch (_) {
      today = new Date().toISOString().slice(0, 10);
    }
    $("usage-from").value = `${today.slice(0, 8)}01`;
    $("usage-to").value = today;
  }
  $("usage-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const from = $("usage-from").value;
    const to = $("usage-to").value;
    download(`/api/admin/billing/usage.csv?${new URLSearchParams({ from, to })}`, `operations-${from}-${to}.csv`,
      fill(T.done_usage_export, { from: day(from), to: day(to) }));
  });

  for (const id of ["f-plan", "f-status"]) $(id).addEventListener("change", () => { state.page = 1; loadUsers().catch((e) => result(e.message, "error")); });
  $("f-q").addEventListener("input", () => { state.page = 1; loadUsers().catch((e) => result(e.message, "error")); });
  $("filters").addEventListener("submit", (ev) => ev.preventDefault());
  $("prev").addEventListener("click", () => { state.page = Math.max(1, state.page - 1); loadUsers(); });
  $("next").addEventListener("click", () => { state.page += 1; loadUsers(); });

  session(STORE, "console", loadAll);
})();
