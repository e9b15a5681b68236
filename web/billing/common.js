// Shared by both panels: API calls with the key from the session, readable
// errors, number and date formats. No request ever leaves this origin.
(function () {
  const T = window.I18N;
  // French formats whatever the browser's locale: fr-DZ gives 12-hour
  // times in Chromium. Times are shown in the deployment's time zone (the
  // API says which), where the gateway counts days and periods.
  const fmt = new Intl.NumberFormat("fr-FR");
  const cents = new Intl.NumberFormat("fr-FR", { minimumFractionDigits: 2, maximumFractionDigits: 2 });
  let timeZone = "Africa/Algiers";
  const dateTimeFmt = () => new Intl.DateTimeFormat("fr-FR", {
    timeZone, day: "numeric", month: "short", year: "numeric", hour: "2-digit", minute: "2-digit", hourCycle: "h23",
  });
  let dateFmt = dateTimeFmt();
  // A calendar date ("2026-12-01") is the same day everywhere: shown as is.
  const dayFmt = new Intl.DateTimeFormat("fr-FR", { timeZone: "UTC", day: "numeric", month: "long", year: "numeric" });
  // A period ("2026-11"), as a month: "novembre 2026", or "nov. 26" short.
  const monthFmt = {
    long: new Intl.DateTimeFormat("fr-FR", { timeZone: "UTC", month: "long", year: "numeric" }),
    short: new Intl.DateTimeFormat("fr-FR", { timeZone: "UTC", month: "short", year: "2-digit" }),
  };
  function setTimeZone(tz) {
    if (!tz || tz === timeZone) return;
    try {
      new Intl.DateTimeFormat("fr-FR", { timeZone: tz });
      timeZone = tz;
      dateFmt = dateTimeFmt();
    } catch (_) { /* a zone this browser does not know: keep the default */ }
  }

  class ApiError extends Error {
    constructor(code, message) { super(message); this.code = code; }
  }

  async function api(path, { header, key, method = "GET", body } = {}) {
    const headers = { [header]: key };
    if (body !== undefined) headers["Content-Type"] = "application/json";
    let response;
    try {
      response = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
    } catch (_) {
      throw new ApiError("network", T.errors.network);
    }
    if (!response.ok) {
      let code = "default";
      try { code = (await response.json()).error.code || "default"; } catch (_) { /* not JSON */ }
      throw new ApiError(code, T.errors[code] || T.errors.default);
    }
    return response;
  }

  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) {
      if (k === "class") node.className = v;
      else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
      else if (v !== undefined && v !== null) node.setAttribute(k, v);
    }
    for (const c of children.flat()) node.append(c instanceof Node ? c : document.createTextNode(String(c ?? "")));
    return node;
  }

  function fill(template, values) {
    return template.replace(/\{(\w+)\}/g, (_, k) => values[k] ?? "");
  }

  /// Saves a fetched file (exports, invoices: they need the key header, so
  /// a plain link cannot fetch them).
  async function save(response, filename) {
    const blob = await response.blob();
    const link = el("a", { href: URL.createObjectURL(blob), download: filename });
    document.body.append(link);
    link.click();
    link.remove();
  }

  function showMessage(box, text, kind) {
    box.textContent = text;
    box.className = "message " + kind;
    box.hidden = !text;
  }

  /// The login flow both panels share: the key lives in sessionStorage
  /// under `store`; `load` fills the panel (`panelId`) or throws, which
  /// brings the login form back with a readable message. Returns `start`,
  /// to reload the panel.
  function session(store, panelId, load, onLogin = () => {}) {
    const $ = (id) => document.getElementById(id);
    const start = async () => {
      try {
        await load();
        $("login").hidden = true;
        $(panelId).hidden = false;
        $("logout").hidden = false;
      } catch (e) {
        sessionStorage.removeItem(store);
        $(panelId).hidden = true;
        $("login").hidden = false;
        showMessage($("login-error"), e.message, "error");
      }
    };
    $("login-form").addEventListener("submit", (ev) => {
      ev.preventDefault();
      showMessage($("login-error"), "", "");
      sessionStorage.setItem(store, $("key").value.trim());
      $("key").value = "";
      onLogin();
      start();
    });
    $("logout").addEventListener("click", () => {
      sessionStorage.removeItem(store);
      location.reload();
    });
    if (sessionStorage.getItem(store)) start();
    return start;
  }

  window.CG = { T, api, el, fill, showMessage, session, ApiError, setTimeZone, save,
    num: (n) => fmt.format(n),
    money: (n) => `${fmt.format(n)} DZD`,
    centimes: (c) => `${cents.format(c / 100)} DZD`,
    date: (s) => dateFmt.format(new Date(s)),
    day: (d) => dayFmt.format(new Date(`${d}T00:00:00Z`)),
    month: (period, style = "long") => monthFmt[style].format(new Date(`${period}-01T00:00:00Z`)) };
})();
