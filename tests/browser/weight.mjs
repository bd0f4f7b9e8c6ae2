// Page weight of the console's overview in Chromium: bytes transferred
// (headers and bodies, as the network saw them) on a first visit and on a
// second visit with the browser's cache. Prints a Markdown table.
import { chromium } from "playwright-core";

const browser = await chromium.launch({ executablePath: process.env.CHROMIUM || "/usr/bin/chromium", args: ["--no-sandbox", "--disable-gpu",
  "--disable-quic", "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"] });
const context = await browser.newContext();
const page = await context.newPage();
await page.goto(process.env.LINK);
await Promise.all([page.waitForURL(/\/console\/$/), page.click("#continue")]);
const cdp = await context.newCDPSession(page);
await cdp.send("Network.enable");

async function visit(label) {
  let bytes = 0;
  let requests = 0;
  const done = (e) => { bytes += e.encodedDataLength; requests += 1; };
  cdp.on("Network.loadingFinished", done);
  const started = Date.now();
  await page.goto(`${process.env.HUB}/console/`, { waitUntil: "load" });
  const loaded = Date.now() - started;
  await page.waitForTimeout(300);
  const paint = await page.evaluate(() => performance.getEntriesByName("first-contentful-paint")[0]?.startTime);
  cdp.off("Network.loadingFinished", done);
  const fcp = paint === undefined ? "not reported" : `${paint.toFixed(0)} ms`;
  console.log(`| ${label} | ${requests} | ${bytes} B | ${fcp} | ${loaded} ms |`);
}

console.log("| visit | requests | bytes transferred | first contentful paint | load |");
console.log("|---|---|---|---|---|");
await cdp.send("Network.clearBrowserCache");
await visit("first (empty cache)");
await visit("again (cached)");
await browser.close();
