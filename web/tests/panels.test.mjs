// The panels as a person uses them: headless Debian chromium, a real
// gateway, Redis and Postgres (started by scripts/browser-tests.sh, which
// passes GATEWAY, ADMIN_KEY and SCREENSHOTS in the environment).
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { mkdirSync, readFileSync } from "node:fs";
import { chromium } from "playwright-core";
import { AxeBuilder } from "@axe-core/playwright";

const GATEWAY = process.env.GATEWAY;
const ADMIN_KEY = process.env.ADMIN_KEY;
const SHOTS = process.env.SCREENSHOTS;
const origin = new URL(GATEWAY).origin;
let browser;

const admin = (path, opts = {}) =>
  fetch(GATEWAY + "/api/admin/billing" + path, {
    ...opts,
    headers: { "X-Admin-Key": ADMIN_KEY, "Content-Type": "application/json", ...(opts.headers || {}) },
  });

async function newUser(name, plan) {
  const r = await admin("/users", { method: "POST", body: JSON.stringify({ name, plan }) });
  assert.equal(r.status, 201);
  return r.json();
}

const call = (key, path) => fetch(GATEWAY + path, { headers: { Authorization: `Bearer ${key}` } });

/// A page that records every request it makes.
async function page(width = 1280) {
  // A browser far from Algiers, in English: the panels must still show
  // French and the deployment's time zone.
  const context = await browser.newContext({ viewport: { width, height: 900 }, acceptDownloads: true,
    timezoneId: "America/New_York", locale: "en-US" });
  const p = await context.newPage();
  p.requests = [];
  p.on("request", (req) => p.requests.push(req.url()));
  p.dialogs = [];
  p.on("dialog", (d) => { p.dialogs.push(d.message()); d.accept(); });
  return p;
}

function assertSameOrigin(p) {
  assert.ok(p.requests.length > 3, "the page made requests");
  const foreign = p.requests.filter((u) => !u.startsWith(origin) && !u.startsWith("blob:") && !u.startsWith("data:"));
  assert.deepEqual(foreign, [], "requests left the gateway's origin");
}

async function shoot(p, name) {
  if (!SHOTS) return;
  mkdirSync(SHOTS, { recursive: true });
  await p.screenshot({ path: `${SHOTS}/${name}.png`, fullPage: true });
}

async function until(what, check, timeout = 10000) {
  const deadline = Date.now() + timeout;
  for (;;) {
    const value = await check();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

before(async () => {
  browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync"],
  });
});

after(async () => {
  await browser?.close();
});

test("user panel shows the exact balance, the 80 % alert, the chart and the history", async () => {
  const created = await newUser("Yasmine Kaci", "mini"); // 10 credits, park costs 2
  const key = created.api_key;
  for (let i = 0; i < 4; i++) assert.equal((await call(key, "/park/search?plate=" + i)).status, 200);
  // History is served from the ledger: wait until the flusher has it.
  await until("the ledger", async () => {
    const r = await fetch(GATEWAY + "/api/billing/usage", { headers: { "X-API-Key": key } });
    return (await r.json()).transactions.total === 4;
  });

  const p = await page();
  await p.goto(GATEWAY + "/billing/");
  await p.getByLabel("Clé API").fill(key);
  await p.getByRole("button", { name: "Se connecter" }).click();
  await p.locator("#account").waitFor({ state: "visible" });

  assert.equal(await p.locator("#remaining").textContent(), "2 sur 10");
  const width = await p.locator("#bar-fill").evaluate((e) => e.style.width);
  assert.equal(width, "20%", "the bar shows the 20 % left");
  assert.match(await p.locator("#alert").textContent(), /plus de 80 %/);
  assert.equal(await p.locator("#bar").getAttribute("aria-valuenow"), "20");

  const painted = await p.locator("#chart").evaluate((canvas) => {
    const data = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
    let n = 0;
    for (let i = 3; i < data.length; i += 4) if (data[i] !== 0) n++;
    return n;
  });
  assert.ok(painted > 100, `the chart is drawn (${painted} painted pixels)`);

  const rows = await p.locator("#history tbody tr").allTextContents();
  assert.equal(rows.length, 4);
  // Services by their French label; times in French, 24-hour, Algiers time.
  assert.ok(rows.every((r) => r.includes("Débit") && r.includes("Recherche de véhicules")), rows.join("\n"));
  assert.ok(rows.every((r) => /\d{1,2} [a-zéû.]+ \d{4}.*\d{2}:\d{2}/.test(r) && !/AM|PM/.test(r)), rows.join("\n"));
  const newest = (await (await fetch(GATEWAY + "/api/billing/usage", { headers: { "X-API-Key": key } })).json())
    .transactions.items[0].occurred_at;
  const algiers = new Intl.DateTimeFormat("fr-FR", { timeZone: "Africa/Algiers", hour: "2-digit", minute: "2-digit", hourCycle: "h23" })
    .format(new Date(newest));
  assert.ok(rows[0].includes(algiers), `${algiers} (Algiers) in ${rows[0]}`);
  // The renewal is the 1st of next month in Algiers, as a date.
  const next = new Date(Date.UTC(new Date().getUTCFullYear(), new Date().getUTCMonth() + 1, 1));
  const renewal = new Intl.DateTimeFormat("fr-FR", { timeZone: "UTC", day: "numeric", month: "long", year: "numeric" }).format(next);
  assert.equal(await p.locator("#resets").textContent(), `Renouvellement le ${renewal}`);
  // Plans cheapest first, prices in French DZD.
  const planRows = await p.locator("#plans tbody tr").allTextContents();
  assert.deepEqual(await p.locator("#plans tbody tr td:first-child").allTextContents(),
    ["Free", "Mini (Votre offre)", "Starter", "Pro", "Business", "Enterprise"]);
  assert.match(planRows[0], /Gratuit/);
  assert.match(planRows[2], /2\u202f000 DZD/);
  assert.match(planRows[5], /Modèles personnalisés · SLA 99,9 % · Support 24\/7/);
  // Each service by its label, with its description, price and whether
  // the plan opens it.
  const costRows = await p.locator("#costs tbody tr").allTextContents();
  const park = costRows.find((r) => r.startsWith("Recherche de véhicules"));
  assert.ok(park && park.includes("Recherche dans le parc automobile") && /2oui$/.test(park), costRows.join("\n"));
  const legal = costRows.find((r) => r.startsWith("Assistant juridique"));
  assert.ok(legal && /3non$/.test(legal), costRows.join("\n"));
  const current = await p.locator("#plans tr.current").textContent();
  assert.match(current, /Mini \(Votre offre\)/);
  await shoot(p, "user-desktop");

  // A fifth call empties the account: the 100 % alert.
  assert.equal((await call(key, "/park/search")).status, 200);
  await p.reload();
  await p.locator("#account").waitFor({ state: "visible" });
  assert.match(await p.locator("#alert").textContent(), /Crédits épuisés/);

  const mobile = await page(375);
  await mobile.goto(GATEWAY + "/billing/");
  await mobile.getByLabel("Clé API").fill(key);
  await mobile.keyboard.press("Enter"); // keyboard only
  await mobile.locator("#account").waitFor({ state: "visible" });
  const overflow = await mobile.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
  assert.ok(overflow <= 1, `no horizontal scroll at 375 px (${overflow}px)`);
  await shoot(mobile, "user-375");
  assertSameOrigin(p);
  assertSameOrigin(mobile);
});

test("user panel: a key is created with a copy-once dialog, scoped, listed and revoked", async () => {
  const created = await newUser("Karim Benali", "starter"); // rag, park, legal
  const p = await page();
  await p.goto(GATEWAY + "/billing/");
  await p.getByLabel("Clé API").fill(created.api_key);
  await p.getByRole("button", { name: "Se connecter" }).click();
  await p.locator("#account").waitFor({ state: "visible" });
  assert.equal(await p.locator("#keys tbody tr").count(), 1);
  // The plan's rate limit is in the plans table.
  assert.match(await p.locator("#plans tr.current").textContent(), /60 \(rafale de 20\)/);

  await p.getByLabel("Nom de la clé").fill("Intégration RAG");
  await p.getByRole("checkbox", { name: "Recherche documentaire (RAG)" }).check();
  await p.getByRole("button", { name: "Créer la clé" }).click();
  const dialog = p.getByRole("dialog", { name: "Votre nouvelle clé" });
  await dialog.waitFor({ state: "visible" });
  assert.match(await dialog.textContent(), /ne sera plus jamais affichée/);
  const newKey = await p.locator("#new-key").inputValue();
  assert.match(newKey, /^cg_[0-9a-f]{48}$/);
  assert.equal((await call(newKey, "/rag/q")).status, 200);
  const outside = await call(newKey, "/legal/q");
  assert.equal(outside.status, 403);
  assert.equal((await outside.json()).error.code, "key_scope");
  await p.getByRole("button", { name: "J'ai copié la clé" }).click();
  await dialog.waitFor({ state: "hidden" });
  assert.equal(await p.locator("#new-key").inputValue(), "", "the key is gone from the page");

  const row = p.locator("#keys tbody tr", { hasText: "Intégration RAG" });
  assert.match(await row.textContent(), /Recherche documentaire \(RAG\).*Jamais/);
  assert.equal(await p.locator("#keys tbody tr").count(), 2);
  await shoot(p, "user-keys");

  await p.getByRole("button", { name: "Révoquer Intégration RAG" }).click();
  await until("the revocation", async () => /est révoquée/.test(await p.locator("#keys-message").textContent()));
  assert.match(p.dialogs.at(-1), /Révoquer la clé « Intégration RAG »/);
  // The message comes once the list is reloaded: the key is gone from it.
  assert.equal(await p.locator("#keys tbody tr").count(), 1);
  assert.equal((await call(newKey, "/rag/q")).status, 401, "revoked at once");

  // A name too long for the server: a readable message, nothing created.
  await p.getByLabel("Nom de la clé").evaluate((i) => i.removeAttribute("maxlength"));
  await p.getByLabel("Nom de la clé").fill("x".repeat(65));
  await p.getByRole("button", { name: "Créer la clé" }).click();
  await until("the refusal", async () => /1 à 64 caractères/.test(await p.locator("#keys-message").textContent()));
  assert.equal(await p.locator("#keys tbody tr").count(), 1);
  assertSameOrigin(p);
});

test("user panel: the daily bar and its alerts, then a banner saying why calls are refused", async () => {
  const created = await newUser("Samir Haddad", "free"); // 20 credits a day, park costs 2
  const key = created.api_key;
  for (let i = 0; i < 8; i++) assert.equal((await call(key, "/park/q")).status, 200); // 16 of 20
  const p = await page();
  await p.goto(GATEWAY + "/billing/");
  await p.getByLabel("Clé API").fill(key);
  await p.getByRole("button", { name: "Se connecter" }).click();
  await p.locator("#account").waitFor({ state: "visible" });
  assert.equal(await p.locator("#daily").textContent(), "16 / 20");
  assert.equal(await p.locator("#daily-bar").getAttribute("aria-valuenow"), "80");
  assert.equal(await p.locator("#daily-fill").evaluate((e) => e.style.width), "80%");
  assert.match(await p.locator("#daily-alert").textContent(), /plus de 80 % de votre limite quotidienne/);
  assert.equal(await p.locator("#banner").isVisible(), false);

  for (let i = 0; i < 2; i++) assert.equal((await call(key, "/park/q")).status, 200); // 20 of 20
  assert.equal((await call(key, "/park/q")).status, 429);
  await p.reload();
  await p.locator("#account").waitFor({ state: "visible" });
  assert.match(await p.locator("#daily-alert").textContent(), /Limite quotidienne atteinte/);
  assert.match(await p.locator("#daily-bar").getAttribute("class"), /bad/);

  assert.equal((await admin(`/users/${created.user.id}/block`, { method: "POST", body: JSON.stringify({ reason: "impayé" }) })).status, 200);
  await p.reload();
  await p.locator("#account").waitFor({ state: "visible" });
  const banner = p.getByRole("alert");
  assert.match(await banner.textContent(), /Compte suspendu : vos appels sont refusés\. Contactez votre administrateur/);
  assert.equal(await p.locator("#daily-alert").isVisible(), false, "the banner says it all");
  await shoot(p, "user-blocked");
  assertSameOrigin(p);
});

test("user panel: the invoices, with a draft for the current month, download as PDFs", async () => {
  const created = await newUser("Amine Cherif", "starter"); // 2 000 DZD HT a month
  const p = await page();
  await p.goto(GATEWAY + "/billing/");
  await p.getByLabel("Clé API").fill(created.api_key);
  await p.getByRole("button", { name: "Se connecter" }).click();
  await p.locator("#account").waitFor({ state: "visible" });
  const rows = await p.locator("#invoices tbody tr").allTextContents();
  assert.equal(rows.length, 1, "a new account: the current month's draft only");
  assert.match(rows[0], /Brouillon/);
  assert.match(rows[0], /2\u202f000,00 DZD/);
  assert.match(rows[0], /2\u202f380,00 DZD/);
  const [download] = await Promise.all([
    p.waitForEvent("download"),
    p.getByRole("button", { name: /^Télécharger la facture de / }).click(),
  ]);
  assert.match(download.suggestedFilename(), /^facture-\d{4}-\d{2}\.pdf$/);
  const pdf = readFileSync(await download.path());
  assert.equal(pdf.subarray(0, 5).toString(), "%PDF-");
  await shoot(p, "user-invoices");
  assertSameOrigin(p);

  // A free account has none, and says why.
  const free = await newUser("Nour Free", "free");
  const q = await page();
  await q.goto(GATEWAY + "/billing/");
  await q.getByLabel("Clé API").fill(free.api_key);
  await q.getByRole("button", { name: "Se connecter" }).click();
  await q.locator("#account").waitFor({ state: "visible" });
  assert.match(await q.locator("#invoices-message").textContent(), /Aucune facture/);
});

test("admin panel: a user is created with the key shown once, then its keys are listed, added and revoked", async () => {
  const p = await page();
  await p.goto(GATEWAY + "/billing/admin.html");
  await p.getByLabel("Clé d'administration").fill(ADMIN_KEY);
  await p.getByRole("button", { name: "Se connecter" }).click();
  await p.locator("#console").waitFor({ state: "visible" });

  await p.getByLabel("Nom", { exact: true }).fill("Meriem Bouzid");
  await p.getByLabel("E-mail (facultatif)").fill("meriem@example.dz");
  await p.getByLabel("Offre souscrite").selectOption("starter");
  await p.getByRole("button", { name: "Créer", exact: true }).click();
  const secret = p.getByRole("dialog", { name: "Clé API de Meriem Bouzid" });
  await secret.waitFor({ state: "visible" });
  assert.match(await secret.textContent(), /ne sera plus jamais affichée/);
  const first = await p.locator("#secret-key").inputValue();
  assert.match(first, /^cg_[0-9a-f]{48}$/);
  assert.equal((await call(first, "/legal/x")).status, 200, "the new user's key works at once, on its plan");
  await p.getByRole("button", { name: "J'ai copié la clé" }).click();
  await secret.waitFor({ state: "hidden" });
  assert.equal(await p.locator("#secret-key").inputValue(), "", "the key is gone from the page");

  await p.getByLabel("Recherche").fill("Meriem");
  await until("the new user's row", async () => (await p.locator("#users tbody tr").count()) === 1);
  await p.getByRole("button", { name: "Clés — Meriem Bouzid" }).click();
  const keys = p.getByRole("dialog", { name: "Clés API de Meriem Bouzid" });
  await keys.waitFor({ state: "visible" });
  assert.equal(await p.locator("#user-keys tbody tr").count(), 1);
  await p.getByRole("button", { name: "Nouvelle clé" }).click();
  await secret.waitFor({ state: "visible" });
  const second = await p.locator("#secret-key").inputValue();
  assert.notEqual(second, first);
  await p.getByRole("button", { name: "J'ai copié la clé" }).click();
  await until("two keys listed", async () => (await p.locator("#user-keys tbody tr").count()) === 2);

  const prefix = first.slice(0, 11);
  await p.getByRole("button", { name: `Révoquer ${prefix}…` }).click();
  await until("the revocation", async () => /est révoquée/.test(await p.locator("#keys-dialog-message").textContent()));
  assert.ok(p.dialogs.some((m) => m.startsWith(`Révoquer la clé ${prefix}… de Meriem Bouzid`)), p.dialogs.join("|"));
  assert.equal((await call(first, "/rag/x")).status, 401, "revoked at once");
  assert.equal((await call(second, "/rag/x")).status, 200);
  assert.match(await p.locator("#user-keys tbody tr", { hasText: prefix }).textContent(), /révoquée/);
  await p.getByRole("button", { name: "Fermer" }).click();
  await keys.waitFor({ state: "hidden" });
  assert.deepEqual(await axe(p), [], "admin panel after the dialogs");
  assertSameOrigin(p);
});

test("a wrong key gives a readable message and shows no data", async () => {
  for (const [path, label] of [["/billing/", "Clé API"], ["/billing/admin.html", "Clé d'administration"]]) {
    const p = await page();
    await p.goto(GATEWAY + path);
    await p.getByLabel(label).fill("definitely-not-a-key");
    await p.getByRole("button", { name: "Se connecter" }).click();
    const error = p.locator("#login-error");
    await error.waitFor({ state: "visible" });
    assert.equal(await error.textContent(), "Clé invalide ou révoquée. Vérifiez la clé saisie.");
    assert.ok(!(await error.textContent()).includes("{"), "no raw JSON");
    assert.equal(await p.locator("#account, #console").isVisible(), false);
    assertSameOrigin(p);
  }
});

test("admin panel: stats, filters, grant, plan change, block and CSV export", async () => {
  const target = await newUser("Karim Benali", "mini");
  await newUser("Nadia Free", "free");
  const p = await page();
  await p.goto(GATEWAY + "/billing/admin.html");
  await p.getByLabel("Clé d'administration").fill(ADMIN_KEY);
  await p.getByRole("button", { name: "Se connecter" }).click();
  await p.locator("#console").waitFor({ state: "visible" });

  const stats = await (await admin("/stats?days=30&months=12")).json();
  // The revenue chart: twelve months of recurring revenue, this month last.
  const mrr = await p.locator("#revenue-chart").evaluate((c) => Chart.getChart(c).data.datasets[0].data);
  assert.equal(mrr.length, 12);
  assert.equal(mrr.at(-1), stats.revenue.monthly_dzd);
  assert.deepEqual(mrr, stats.revenue.by_month.map((m) => m.dzd));
  assert.equal(await p.locator("#users-total").textContent(), String(stats.users.total));
  const revenue = (await p.locator("#revenue").textContent()).replace(/\D/g, "");
  assert.equal(revenue, String(stats.revenue.monthly_dzd));
  for (const id of ["#revenue-chart", "#consumption-chart", "#split-chart"]) {
    const painted = await p.locator(id).evaluate((c) => {
      const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
      let n = 0;
      for (let i = 3; i < d.length; i += 4) if (d[i]) n++;
      return n;
    });
    assert.ok(painted > 0, `${id} is drawn`);
  }

  // Filter by plan narrows the table to that plan.
  const all = await p.locator("#users tbody tr").count();
  await p.getByLabel("Offre", { exact: true }).selectOption("mini");
  await until("the filtered table", async () => (await p.locator("#users tbody tr").count()) < all);
  const planCells = await p.locator("#users tbody tr td:nth-child(3)").allTextContents();
  assert.ok(planCells.length > 0 && planCells.every((c) => c === "Mini"), planCells.join(","));
  const minis = (await (await admin("/users?plan=mini&per_page=200")).json()).total;
  assert.equal(planCells.length, Math.min(minis, 20));

  // Grant 25 credits to the target: the table and the proxy see them at once.
  await p.getByLabel("Recherche").fill(target.user.id);
  await until("the searched row", async () => (await p.locator("#users tbody tr").count()) === 1);
  const row = p.locator("#users tbody tr").first();
  await row.getByRole("button", { name: "Offrir des crédits" }).click();
  await p.getByLabel("Nombre de crédits").fill("25");
  await p.getByLabel("Motif").fill("Geste commercial");
  await p.locator("#grant-submit").click();
  await until("the grant result", async () => (await p.locator("#result").textContent()).includes("25 crédits offerts"));
  await until("the new balance in the table", async () =>
    (await p.locator("#users tbody tr td:nth-child(5)").first().textContent()).replace(/\D/g, "") === "35");
  const detail = await (await admin("/users/" + target.user.id)).json();
  assert.equal(detail.credits.bonus, 25);

  // Change plan to Starter: legal (not in Mini) opens up through the proxy.
  await p.getByLabel("Offre", { exact: true }).selectOption("");
  await until("the row without the plan filter", async () => (await p.locator("#users tbody tr").count()) === 1);
  assert.equal((await call(target.api_key, "/legal/x")).status, 403);
  await p.locator("#users tbody tr").first().getByLabel(/Changer d'offre/).selectOption("starter");
  await until("the plan result", async () => (await p.locator("#result").textContent()).includes("offre Starter"));
  assert.ok(p.dialogs.some((m) => m.startsWith("Passer Karim Benali à l'offre Starter")), p.dialogs.join("|"));
  assert.equal((await (await admin("/users/" + target.user.id)).json()).plan.id, "starter");
  assert.equal((await call(target.api_key, "/legal/x")).status, 200); // 3 of 35
  for (let i = 0; i < 16; i++) assert.equal((await call(target.api_key, "/park/x")).status, 200); // 35 of 35
  assert.equal((await call(target.api_key, "/park/x")).status, 402);

  // Block: the proxy answers 403 at once.
  await p.locator("#users tbody tr").first().getByRole("button", { name: "Bloquer" }).click();
  await until("the block result", async () => (await p.locator("#result").textContent()).includes("est bloqué"));
  assert.ok(p.dialogs.some((m) => m.startsWith("Bloquer Karim Benali")), p.dialogs.join("|"));
  const blocked = await call(target.api_key, "/rag/x");
  assert.equal(blocked.status, 403);
  assert.equal((await blocked.json()).error.code, "blocked");
  await shoot(p, "admin-desktop");

  // The ledger's operations over a date range: today's charges of the target.
  const today = new Intl.DateTimeFormat("en-CA", { timeZone: "Africa/Algiers" }).format(new Date());
  assert.equal(await p.getByLabel("Au (inclus)", { exact: true }).inputValue(), today);
  const charges = (csv) => csv.trim().split("\n").filter((l) => l.includes(target.user.id) && l.includes(",charge,")).length;
  await until("the target's 17 charges in the ledger", async () =>
    charges(await (await admin(`/usage.csv?from=${today}&to=${today}`)).text()) === 17);
  await p.getByLabel("Du", { exact: true }).fill(today);
  const [usageFile] = await Promise.all([
    p.waitForEvent("download"),
    p.getByRole("button", { name: "Télécharger" }).click(),
  ]);
  assert.equal(usageFile.suggestedFilename(), `operations-${today}-${today}.csv`);
  // 1 legal and 16 park calls were charged (the refused ones were not).
  assert.equal(charges(readFileSync(await usageFile.path(), "utf8")), 17);
  await until("the export message", async () => /Opérations du/.test(await p.locator("#result").textContent()));

  // The month's biggest consumers, as the stats have them once the
  // ledger has the charges above (the reload reads them again).
  await p.reload();
  await p.locator("#console").waitFor({ state: "visible" });
  await until("the top consumers table", async () => (await p.locator("#top tbody tr").count()) > 0);
  const top = (await (await admin("/stats")).json()).top_consumers;
  assert.ok(top.length > 0);
  const topRows = await p.locator("#top tbody tr").allTextContents();
  assert.equal(topRows.length, top.length);
  for (const c of top) {
    assert.ok(topRows.some((r) => r.includes(c.name) && r.includes(c.user_id) && r.includes(String(c.credits))), `${c.user_id} in ${topRows}`);
  }

  // CSV export downloads a file whose rows are the users.
  const [download] = await Promise.all([
    p.waitForEvent("download"),
    p.getByRole("button", { name: "Exporter (CSV)" }).click(),
  ]);
  const file = await download.path();
  const lines = readFileSync(file, "utf8").trim().split("\n");
  assert.equal(lines[0], "id,name,email,plan,status,created_at");
  const users = (await (await admin("/users?per_page=200")).json()).users.map((u) => u.id).sort();
  assert.deepEqual(lines.slice(1).map((l) => l.split(",")[0]).sort(), users);

  const mobile = await page(375);
  await mobile.goto(GATEWAY + "/billing/admin.html");
  await mobile.getByLabel("Clé d'administration").fill(ADMIN_KEY);
  await mobile.keyboard.press("Enter");
  await mobile.locator("#console").waitFor({ state: "visible" });
  const overflow = await mobile.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
  assert.ok(overflow <= 1, `no horizontal page scroll at 375 px (${overflow}px)`);
  await shoot(mobile, "admin-375");
  assertSameOrigin(p);
  assertSameOrigin(mobile);
});

/// Serious and critical violations axe-core finds on the page as it is now.
async function axe(p) {
  const result = await new AxeBuilder({ page: p }).withTags(["wcag2a", "wcag2aa", "wcag21a", "wcag21aa"]).analyze();
  return result.violations
    .filter((v) => v.impact === "serious" || v.impact === "critical")
    .map((v) => `${v.id} (${v.impact}): ${v.nodes.map((n) => n.target.join(" ")).slice(0, 5).join(", ")}`);
}

/// Tabs through the page and returns the ids (or text) of what took focus.
async function tabStops(p, n) {
  const seen = [];
  for (let i = 0; i < n; i++) {
    await p.keyboard.press("Tab");
    seen.push(await p.evaluate(() => {
      const e = document.activeElement;
      return e ? (e.id || e.getAttribute("aria-label") || e.textContent.trim().slice(0, 30) || e.tagName) : "";
    }));
  }
  return seen;
}

test("both panels pass axe-core (no serious or critical violation) and work from the keyboard", async () => {
  const created = await newUser("Lina Amrani", "free");
  for (let i = 0; i < 3; i++) assert.equal((await call(created.api_key, "/rag/q")).status, 200);
  await until("the ledger", async () => {
    const r = await fetch(GATEWAY + "/api/billing/usage", { headers: { "X-API-Key": created.api_key } });
    return (await r.json()).transactions.total === 3;
  });

  const user = await page();
  await user.goto(GATEWAY + "/billing/");
  assert.deepEqual(await axe(user), [], "login form");
  await user.getByLabel("Clé API").focus();
  await user.keyboard.type(created.api_key);
  await user.keyboard.press("Enter");
  await until("the user panel", async () =>
    (await user.locator("#account").isVisible()) || (await user.locator("#login-error").isVisible()));
  assert.equal(await user.locator("#login-error").isVisible(), false, await user.locator("#login-error").textContent());
  assert.deepEqual(await axe(user), [], "user panel");
  const userStops = await tabStops(user, 40);
  for (const id of ["logout", "key-name", "key-expires", "key-create"]) {
    assert.ok(userStops.includes(id), `${id} is reachable with Tab: ${userStops.join(", ")}`);
  }
  assert.ok(userStops.some((s) => /^Révoquer cg_[0-9a-f]+…$/.test(s)), "a key's revoke button is reachable, named");

  const adminPage = await page();
  await adminPage.goto(GATEWAY + "/billing/admin.html");
  await adminPage.getByLabel("Clé d'administration").focus();
  await adminPage.keyboard.type(ADMIN_KEY);
  await adminPage.keyboard.press("Enter");
  await adminPage.locator("#console").waitFor({ state: "visible" });
  await until("the users table", async () => (await adminPage.locator("#users tbody tr").count()) > 0);
  assert.deepEqual(await axe(adminPage), [], "admin panel");
  const adminStops = await tabStops(adminPage, 80);
  for (const id of ["logout", "f-plan", "f-status", "usage-from", "usage-to", "usage-export", "export"]) {
    assert.ok(adminStops.includes(id), `${id} is reachable with Tab: ${adminStops.join(", ")}`);
  }
  assertSameOrigin(user);
  assertSameOrigin(adminPage);
});
