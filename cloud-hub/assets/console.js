// Outpost console: live rows of the device list (server-sent events) and
// the device page's charts (uPlot). No inline script anywhere: the page's
// Content-Security-Policy allows only the hub's own files.
"use strict";

function liveRows() {
  const body = document.getElementById("rows");
  if (!body || !window.EventSource) return;
  const ids = Array.from(body.querySelectorAll("tr[data-id]")).map((tr) => tr.dataset.id);
  if (ids.length === 0) return;
  const url = body.dataset.stream + "?ids=" + encodeURIComponent(ids.join(","));
  const source = new EventSource(url);
  source.addEventListener("row", (event) => {
    const change = JSON.parse(event.data);
    const row = document.getElementById("row-" + change.id);
    if (!row) return;
    // The hub rendered and escaped this HTML with the page's own template.
    row.innerHTML = change.html;
    row.classList.remove("changed");
    void row.offsetWidth;
    row.classList.add("changed");
  });
  document.body.dataset.live = "open";
  source.addEventListener("open", () => { document.body.dataset.live = "open"; });
  source.addEventListener("error", () => { document.body.dataset.live = "retrying"; });
}

function bytesPerSecond(v) {
  if (v == null) return "-";
  const units = ["B/s", "KiB/s", "MiB/s", "GiB/s"];
  let i = 0;
  while (v >= 1024 && i < units.length - 1) { v /= 1024; i++; }
  return v.toFixed(v < 10 ? 1 : 0) + " " + units[i];
}

// Shades the periods whose samples reached the hub late.
function latePlugin(late) {
  return {
    hooks: {
      drawClear: (u) => {
        const ctx = u.ctx;
        ctx.save();
        ctx.fillStyle = "rgba(240, 160, 40, 0.18)";
        for (const [from, to] of late) {
          const x0 = u.valToPos(from, "x", true);
          const x1 = Math.max(u.valToPos(to, "x", true), x0 + 2);
          ctx.fillRect(x0, u.bbox.top, x1 - x0, u.bbox.height);
        }
        ctx.restore();
      },
    },
  };
}

function chart(el, title, data, series, late, width, scale) {
  const box = document.createElement("div");
  box.className = "chart";
  box.dataset.chart = title;
  el.appendChild(box);
  const opts = {
    title: title,
    width: width,
    height: 180,
    plugins: [latePlugin(late)],
    scales: scale ? { y: scale } : {},
    // Points as well as lines: a bucket between two empty ones (a device
    // that just started, or a gap) still shows.
    series: [{ label: "Time (UTC)" }].concat(series.map((s) => Object.assign({ points: { show: true, size: 3 } }, s))),
    // The console shows every time in UTC, and says so.
    tzDate: (ts) => uPlot.tzDate(new Date(ts * 1e3), "Etc/UTC"),
    axes: [{ label: "UTC", labelSize: 18 }, { size: 70, values: series[0].fmt ? (u, vals) => vals.map(series[0].fmt) : undefined }],
  };
  new uPlot(opts, [data.t].concat(series.map((s) => data[s.key])), box);
}

async function charts() {
  const el = document.getElementById("charts");
  if (!el || !window.uPlot) return;
  const response = await fetch(el.dataset.series, { credentials: "same-origin" });
  if (!response.ok) { el.textContent = "Charts are not available: " + response.status; return; }
  const data = await response.json();
  el.dataset.samples = String(data.samples);
  if (data.samples === 0) { el.textContent = "No telemetry in this window."; return; }
  const width = Math.max(300, Math.min(el.clientWidth, 1200) / 2 - 16);
  const pct = { range: [0, 100] };
  chart(el, "CPU %", data, [{ key: "cpu", label: "CPU", stroke: "#2a6fdb", spanGaps: false }], data.late, width, pct);
  chart(el, "Memory %", data, [{ key: "mem", label: "memory", stroke: "#8a3ffc" }], data.late, width, pct);
  chart(el, "Fullest disk %", data, [{ key: "disk", label: "disk", stroke: "#198038" }], data.late, width, pct);
  chart(el, "Network", data, [
    { key: "rx", label: "received", stroke: "#0072c3", value: (u, v) => bytesPerSecond(v), fmt: bytesPerSecond },
    { key: "tx", label: "sent", stroke: "#da1e28", value: (u, v) => bytesPerSecond(v) },
  ], data.late, width, null);
  el.dataset.ready = "yes";
}

document.addEventListener("DOMContentLoaded", () => {
  liveRows();
  charts().catch((e) => { const el = document.getElementById("charts"); if (el) el.textContent = String(e); });
});
