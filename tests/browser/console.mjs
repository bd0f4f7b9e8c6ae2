// Drives Debian's headless Chromium through the console of a real hub with
// real agents, as tests/tests/console.rs set them up (see its env). Each
// step waits on a condition with a deadline; the first failure exits 1
// with what was expected and what the page showed.

import { chromium } from "playwright-core";
import { writeFileSync } from "node:fs";

const env = (name) => {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set`);
  return value;
};
const hub = env("HUB");
const out = env("OUT_DIR");
const watched = env("AGENT_ID");
const hostile = env("HOSTILE_ID");
const job = env("JOB");

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  // As PITFALLS.md says: no attempts to reach the internet at start.
  args: ["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
const timings = {};
let failed = false;

async function step(name, body) {
  const started = Date.now();
  try {
    await body();
    timings[name] = Date.now() - started;
    console.log(`ok   ${name} (${timings[name]} ms)`);
  } catch (e) {
    failed = true;
    console.log(`FAIL ${name}: ${e.message}`);
    throw e;
  }
}

async function session() {
  const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
  const page = await context.newPage();
  page.on("dialog", async (d) => {
    failed = true;
    console.log(`FAIL a dialog opened (${d.message()}): page script ran`);
    await d.dismiss();
  });
  page.on("pageerror", (e) => console.log(`page error: ${e.message}`));
  return { context, page };
}

async function signInWithToken(page, token) {
  await page.goto(`${hub}/console/sign-in`);
  await page.fill("#token", token);
  await Promise.all([page.waitForURL(`${hub}/console/`), page.click("#sign-in")]);
}

async function text(page, selector) {
  return (await page.textContent(selector))?.trim();
}

try {
  // 1. The demo's one-time link signs an admin in; the overview counts.
  const admin = await session();
  await step("sign in with a one-time link", async () => {
    await admin.page.goto(env("LINK"));
    await Promise.all([admin.page.waitForURL(`${hub}/console/`), admin.page.click("#continue")]);
  });
  await step("the overview shows the right counts", async () => {
    const deadline = Date.now() + 20000;
    for (;;) {
      const counts = [await text(admin.page, "#count-devices"), await text(admin.page, "#count-online"), await text(admin.page, "#count-never")];
      if (counts.join(",") === env("WANT_COUNTS")) break;
      if (Date.now() > deadline) throw new Error(`counts ${counts} (devices, online, never), want ${env("WANT_COUNTS")}`);
      await admin.page.waitForTimeout(500);
      await admin.page.reload();
    }
    await admin.page.screenshot({ path: `${out}/overview.png`, fullPage: true });
  });

  // 2. A device named with markup is text, on the list and on its page.
  await step("a device named with markup shows as text", async () => {
    await admin.page.goto(`${hub}/console/devices`);
    const name = await text(admin.page, `#row-${hostile} td a`);
    if (name !== "<script>alert(1)</script>") throw new Error(`the name shows as ${JSON.stringify(name)}`);
    await admin.page.goto(`${hub}/console/devices/${hostile}`);
    const title = await text(admin.page, "#device-name");
    if (!title.startsWith("<script>alert(1)</script>")) throw new Error(`the heading is ${JSON.stringify(title)}`);
    const injected = await admin.page.locator("main script").count();
    if (injected !== 0) throw new Error(`${injected} script elements inside the page body`);
  });

  // 3. A stopped agent turns offline on the open page, without a reload.
  await step("a stopped agent turns offline without a reload", async () => {
    await admin.page.goto(`${hub}/console/devices`);
    await admin.page.waitForFunction(() => document.body.dataset.live === "open");
    const state = `#row-${env("STOP_ID")} .state`;
    if ((await text(admin.page, state)) !== "online") throw new Error(`not online before the stop: ${await text(admin.page, state)}`);
    await admin.page.evaluate(() => { window.__notReloaded = true; });
    process.kill(Number(env("STOP_PID")), "SIGKILL");
    await admin.page.waitForFunction((s) => document.querySelector(s)?.textContent.trim() === "offline", state, { timeout: 30000 });
    if (!(await admin.page.evaluate(() => window.__notReloaded === true))) throw new Error("the page was reloaded");
  });

  // 3b. The stopped agent's offline alert fires: the overview lists it,
  // and a silence is set from there.
  await step("a firing alert shows on the overview and is silenced there", async () => {
    const row = `#alerts tr.alert.firing[data-device="${env("STOP_ID")}"]`;
    const deadline = Date.now() + 30000;
    for (;;) {
      await admin.page.goto(`${hub}/console/`);
      if ((await admin.page.locator(row).count()) > 0) break;
      if (Date.now() > deadline) throw new Error("no firing alert for the stopped device on the overview");
      await admin.page.waitForTimeout(500);
    }
    const why = await text(admin.page, `${row} td:nth-child(6)`);
    if (!why.startsWith("offline for")) throw new Error(`the alert says ${JSON.stringify(why)}`);
    await Promise.all([admin.page.waitForURL(/done=silence/), admin.page.click(`${row} button.silence`)]);
    const notice = await text(admin.page, ".notice");
    if (!notice.includes("Silence set")) throw new Error(`notice ${JSON.stringify(notice)}`);
    const held = await text(admin.page, `${row} .held`);
    if (held !== "(silenced)") throw new Error(`the alert shows ${JSON.stringify(held)}`);
    await admin.page.screenshot({ path: `${out}/overview-alert.png`, fullPage: true });
  });

  // 3c. The stopped device says since when and why, without stale figures.
  await step("an offline device says since when and why", async () => {
    const deadline = Date.now() + 30000;
    let why = "";
    for (;;) {
      await admin.page.goto(`${hub}/console/devices/${env("STOP_ID")}`);
      why = (await admin.page.locator("#device-offline").count()) > 0 ? await text(admin.page, "#device-offline") : "";
      if (why.includes("timed out")) break;
      if (Date.now() > deadline) throw new Error(`the page says ${JSON.stringify(why)}`);
      await admin.page.waitForTimeout(500);
    }
    if (!/^Offline since .+ ago: timed out/.test(why)) throw new Error(`the page says ${JSON.stringify(why)}`);
    const at = await admin.page.getAttribute("#device-offline span[title]", "title");
    if (!/^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC$/.test(at ?? "")) throw new Error(`no time on hover: ${at}`);
    await admin.page.goto(`${hub}/console/devices`);
    const cells = await admin.page.locator(`#row-${env("STOP_ID")} td.num`).allTextContents();
    if (cells[0].trim() !== "-" || cells[1].trim() !== "-") throw new Error(`stale figures in the list: ${cells}`);
    const rowWhy = await text(admin.page, `#row-${env("STOP_ID")} .why`);
    if (!rowWhy.startsWith("timed out")) throw new Error(`the list says ${JSON.stringify(rowWhy)}`);
    await admin.page.screenshot({ path: `${out}/device-offline.png`, fullPage: true });
  });

  // 4. A device page draws charts from the hub's telemetry.
  await step("a device page shows charts with data", async () => {
    await admin.page.goto(`${hub}/console/devices/${watched}?window=1h`);
    await admin.page.waitForSelector("#charts[data-ready=yes]", { timeout: 15000 });
    const samples = Number(await admin.page.getAttribute("#charts", "data-samples"));
    if (!(samples > 0)) throw new Error(`the charts read ${samples} samples`);
    const canvases = await admin.page.locator("#charts canvas").count();
    if (canvases < 4) throw new Error(`${canvases} charts drawn, want 4`);
    // Times are in one zone, and say which: the charts' time axis and the
    // next run.
    const zone = await admin.page.locator("#charts .u-legend .u-label").first().textContent();
    if (zone !== "Time (UTC)") throw new Error(`the time is labelled ${JSON.stringify(zone)}`);
    const next = await text(admin.page, "#jobs tbody tr td:nth-child(3)");
    if (!/^in .+ \(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC\)$/.test(next)) throw new Error(`next run reads ${JSON.stringify(next)}`);
    await admin.page.screenshot({ path: `${out}/device.png`, fullPage: true });
  });
  await admin.context.close();

  // 5. An operator runs a job; its run appears on the device page.
  const operator = await session();
  await step("an operator runs a job and its run appears", async () => {
    await signInWithToken(operator.page, env("OPERATOR_TOKEN"));
    await operator.page.goto(`${hub}/console/devices/${watched}`);
    const before = await operator.page.locator(`tr.run[data-job="${job}"]`).count();
    await operator.page.click(`button.run-job[data-job="${job}"]`);
    const summary = await text(operator.page, "#summary");
    if (!summary.includes(`Run job ${job}`)) throw new Error(`the confirmation says ${JSON.stringify(summary)}`);
    await Promise.all([operator.page.waitForURL(/done=command/), operator.page.click("#confirm")]);
    const notice = await text(operator.page, ".notice");
    if (!notice.includes("queued")) throw new Error(`notice ${JSON.stringify(notice)}`);
    const deadline = Date.now() + 20000;
    for (;;) {
      const runs = await operator.page.locator(`tr.run[data-job="${job}"]`).allTextContents();
      if (runs.length > before && runs.some((r) => r.includes("command"))) break;
      if (Date.now() > deadline) throw new Error(`no run by command appeared: ${JSON.stringify(runs)}`);
      await operator.page.waitForTimeout(500);
      await operator.page.reload();
    }
  });
  // 5a. A bad label: the form comes back with its input, the error at the
  // top, in sight without scrolling.
  await step("a bad label keeps its input and shows the error at the top", async () => {
    await operator.page.goto(`${hub}/console/devices/${watched}`);
    await operator.page.fill("#labels", "group=browser\nBad Key=x");
    await operator.page.click("form:has(#labels) button[type=submit]");
    await operator.page.waitForSelector("#form-error");
    const box = await operator.page.locator("#form-error").boundingBox();
    const height = operator.page.viewportSize().height;
    if (!box || box.y + box.height > height) throw new Error(`the error is out of sight at ${box?.y} (viewport ${height})`);
    const kept = await operator.page.inputValue("#labels");
    if (kept !== "group=browser\nBad Key=x") throw new Error(`the input became ${JSON.stringify(kept)}`);
  });

  // 5b. A bulk command: its result page lists each device's command and
  // fills in by itself until all are done; the command shows on the
  // device page with what it was.
  await step("a bulk command's result page fills in live", async () => {
    await operator.page.goto(`${hub}/console/bulk?selector=${encodeURIComponent("group=browser")}`);
    await operator.page.selectOption("form:has(input[value=command]) select[name=kind]", "echo");
    await operator.page.fill("form:has(input[value=command]) textarea[name=args]", "hello from\nthe browser");
    await operator.page.click("form:has(input[value=command]) button[type=submit]");
    await Promise.all([operator.page.waitForURL(/\/console\/commands\?from=/), operator.page.click("#confirm")]);
    const first = await text(operator.page, "#commands-summary");
    if (!first.startsWith("3 commands")) throw new Error(`the result page says ${JSON.stringify(first)}`);
    // No reload from here: the page refreshes itself while any is not done.
    await operator.page.waitForFunction(() => document.querySelector("#commands-summary")?.textContent.includes("2 succeeded"), null, { timeout: 20000 });
    const summary = await text(operator.page, "#commands-summary");
    if (!summary.includes("1 waiting (1 for offline devices)")) throw new Error(`the result page says ${JSON.stringify(summary)}`);
    if ((await operator.page.locator("meta[http-equiv=refresh]").count()) !== 1) throw new Error("not refreshing while one waits");
    const waiting = await text(operator.page, `#commands tr.command[data-state=queued]`);
    if (!waiting.includes("leaving") || !waiting.includes("waits for the device (offline)")) throw new Error(`the waiting line says ${JSON.stringify(waiting)}`);
    const args = await operator.page.locator("#commands tr.command td:first-child").first().textContent();
    if (!args.includes("echo") || !args.includes("'hello from'")) throw new Error(`the command reads ${JSON.stringify(args)}`);
    await operator.page.screenshot({ path: `${out}/bulk-result.png`, fullPage: true });
    await operator.page.goto(`${hub}/console/commands`);
    const pending = await operator.page.locator(`#commands tr.command a[href="/console/devices/${env("STOP_ID")}"]`).count();
    if (pending !== 1) throw new Error(`the waiting list shows ${pending} commands for the stopped device`);
    await operator.page.goto(`${hub}/console/devices/${watched}`);
    const mine = await text(operator.page, "#device-commands #commands tr.command[data-state=done]");
    if (!mine.includes("echo") || !mine.includes("succeeded")) throw new Error(`the device page says ${JSON.stringify(mine)}`);
  });
  // 5c. The audit log reads as what people did: the device by its name
  // (found by it), what changed, who; the review before an action marked
  // as a preview.
  await step("the audit log names devices and says what changed", async () => {
    await operator.page.goto(`${hub}/console/audit?target=gw-one`);
    const rows = await operator.page.locator("#audit tr.entry").allTextContents();
    const labels = rows.find((r) => r.includes("labels: +group=browser"));
    if (!labels || !labels.includes("gw-one")) throw new Error(`no labelled entry naming gw-one: ${JSON.stringify(rows)}`);
    const run = rows.find((r) => r.includes(`run_job ${job}`) && r.includes("operator in a browser (console"));
    if (!run) throw new Error(`no run by the operator: ${JSON.stringify(rows)}`);
    if (!rows.some((r) => r.includes("preview: command: run_job") && r.includes("preview (200)"))) {
      throw new Error(`no marked preview: ${JSON.stringify(rows)}`);
    }
    await operator.page.screenshot({ path: `${out}/audit.png`, fullPage: true });
  });
  await operator.context.close();

  // 6. A viewer sees no action; a forged POST is refused.
  const viewer = await session();
  await step("a viewer sees no action buttons and a forged POST gets 403", async () => {
    await signInWithToken(viewer.page, env("VIEWER_TOKEN"));
    await viewer.page.goto(`${hub}/console/devices/${watched}`);
    const actions = await viewer.page.locator("form[action$='/act'], button.run-job, button.backup-now").count();
    if (actions !== 0) throw new Error(`${actions} action forms shown to a viewer`);
    const status = await viewer.page.evaluate(async ([id, job]) => {
      const csrf = document.querySelector("input[name=csrf]").value;
      const body = new URLSearchParams({ csrf, action: "run_job", job, confirm: "yes" });
      const response = await fetch(`/console/devices/${id}/act`, { method: "POST", body });
      return response.status;
    }, [watched, job]);
    if (status !== 403) throw new Error(`the forged POST answered ${status}`);
  });
  await viewer.context.close();
} catch (e) {
  failed = true;
} finally {
  writeFileSync(`${out}/timings.json`, JSON.stringify(timings, null, 2));
  await browser.close();
}
process.exit(failed ? 1 : 0);
