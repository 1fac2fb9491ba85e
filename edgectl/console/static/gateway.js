// One gateway: summary, live charts over a chosen window, its reported config per key, pushes.
"use strict";
(() => {
  const { api, el, pill, ago, clock, num, showSession, getSession, every } = Console;
  const params = new URLSearchParams(location.search);
  const POLL_MS = Number(params.get("poll")) || 1000;
  const id = decodeURIComponent(location.pathname.split("/").pop());
  const base = `/api/v1/gateways/${encodeURIComponent(id)}`;
  const CHARTS = [
    { key: "cpu", label: "CPU", unit: "%", max: 100 }, { key: "mem", label: "Memory", unit: "%", max: 100 },
    { key: "temp", label: "Temperature", unit: "°C" }, { key: "gpu", label: "GPU", unit: "%", max: 100, optional: true },
    { key: "tps", label: "Tokens/s", unit: "tok/s" }, { key: "queue", label: "Queue depth", unit: "requests" },
    { key: "ttft_ms", label: "Time to first token", unit: "ms" }, { key: "cache_hit", label: "Cache hit rate", unit: "%", max: 100 },
    { key: "offload", label: "Offloads by reason", unit: "per sample", multi: true }, { key: "errors", label: "Errors", unit: "per sample" },
  ];
  let points = [], windowS = 900, lastTs = 0, detail = null, watching = null;
  document.getElementById("gw-title").textContent = id;
  document.title = `${id} · Fleet console`;

  // -- charts ---------------------------------------------------------------------------------
  const figures = new Map();
  for (const spec of CHARTS) {
    const caption = el("figcaption", {}, spec.label, el("span", { class: "latest", text: "–" }));
    const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
    svg.setAttribute("role", "img");
    const legend = el("div", { class: "legend" });
    const fig = el("figure", { class: "chart", "data-series": spec.key, "data-points": "0", hidden: spec.optional || null }, caption, svg, legend);
    document.getElementById("charts").append(fig);
    figures.set(spec.key, { fig, svg, caption, legend, spec });
  }
  function drawCharts(now) {
    const t0 = now - windowS;
    for (const { fig, svg, caption, legend, spec } of figures.values()) {
      let series;
      if (spec.multi) {
        const reasons = [...new Set(points.flatMap(p => Object.keys(p[spec.key] || {})))].sort();
        // a point with sidecar figures but no offload offloaded nothing: zero, not a gap
        const counted = points.filter(p => p[spec.key] || typeof p.requests === "number");
        series = reasons.map(r => ({ name: r, points: counted.map(p => [p.ts, (p[spec.key] || {})[r] || 0]) }));
        legend.replaceChildren(...reasons.map((r, i) => el("span", { style: null, text: `${i ? " · " : ""}■ ${r}` })));
        legend.querySelectorAll("span").forEach((s, i) => { s.style.color = Chart.COLORS[i % Chart.COLORS.length]; });
      } else {
        series = [{ name: spec.key, points: points.filter(p => typeof p[spec.key] === "number").map(p => [p.ts, p[spec.key]]) }];
      }
      const count = series.reduce((n, s) => n + s.points.length, 0);
      if (spec.optional) fig.hidden = count === 0;
      fig.dataset.points = String(count);
      const newest = Math.max(0, ...series.map(s => s.points.length ? s.points[s.points.length - 1][0] : 0));
      if (newest) fig.dataset.lastTs = String(newest);  // the newest point drawn (tests and the benchmark read it)
      const last = series.length === 1 && series[0].points.length ? series[0].points[series[0].points.length - 1][1] : null;
      const latest = last === null ? (spec.multi && count ? `${count} points` : "–") : `${+last.toFixed(2)} ${spec.unit}`;
      caption.querySelector(".latest").textContent = latest;
      svg.setAttribute("aria-label", `${spec.label} over the last ${Math.round(windowS / 60)} minutes: ${count ? `latest ${latest}` : "no data"}`);
      Chart.draw(svg, series, t0, now, spec.max);
    }
  }
  async function loadSeries(full) {
    const since = full ? 0 : lastTs;
    const r = await api(`${base}/series?window=${windowS}${since ? `&since=${since}` : ""}`);
    if (!r.ok) return;
    if (full) points = [];
    for (const p of r.body.points) if (p.ts > lastTs || full) points.push(p);
    points.sort((a, b) => a.ts - b.ts);
    if (points.length) lastTs = points[points.length - 1].ts;
    const t0 = r.body.now - windowS;
    points = points.filter(p => p.ts >= t0);
    drawCharts(r.body.now);
    document.getElementById("live").textContent = `live · updated ${new Date().toLocaleTimeString()}`;
  }
  document.getElementById("window").addEventListener("change", e => { windowS = Number(e.target.value); lastTs = 0; loadSeries(true); });

  // -- summary and reported config ------------------------------------------------------------
  function summary(d) {
    const items = [
      ["Presence", el("span", { "data-state": d.state }, pill(d.state), ` since ${ago(d.since, d.now)}`, d.reason ? ` (${d.reason})` : "")],
      ["Boot", d.boot ?? "–"], ["Version", d.version ?? "–"], ["Groups", d.groups.join(", ") || "–"],
      ["Model", d.model ?? (d.engine_up === false ? "engine down" : "–")],
      ["Config (desired / reported)", Object.entries(d.config).map(([t, v]) => `${t}: ${v.desired ?? "–"} / ${v.applied ?? "–"}`).join("; ")],
      ["Last telemetry", ago(d.telemetry_ts, d.now)],
      ["Health", d.flags.length ? el("span", {}, ...d.flags.map(f => pill(f, "flag"))) : el("span", { class: "ok", text: "ok" })],
      ["Unsigned pushes", d.allow_unsigned ? "accepted (lab)" : "refused"],
    ];
    document.getElementById("summary").replaceChildren(...items.map(([k, v]) => el("div", {}, el("dt", { text: k }), el("dd", {}, v))));
  }
  function reported(d) {
    const rep = d.reported;
    document.getElementById("report-line").textContent = rep
      ? `Last report: ${rep.status} for ${rep.target} version ${rep.version} (${ago(rep.ts, d.now)}); in force: ${Object.entries(rep.applied || {}).map(([t, v]) => `${t}=${v}`).join(" ") || "nothing pushed"}`
        + (rep.needs_restart && rep.needs_restart.length ? `; restart pending for ${rep.needs_restart.join(", ")}` : "")
      : "No report from this gateway yet.";
    const tbody = document.querySelector("#keys tbody");
    tbody.replaceChildren(...d.keys.map(k => el("tr", { "data-key": k.key },
      el("td", { text: `${k.target} v${k.version}` }), el("th", { scope: "row", text: k.key }), el("td", {}, el("code", { text: JSON.stringify(k.value) })),
      el("td", {}, pill(k.status, k.status.replace(/\s+/g, "-"))), el("td", { text: k.reason || "" }))));
    if (!d.keys.length) tbody.append(el("tr", {}, el("td", { colspan: 5, class: "note", text: "Nothing pushed to this gateway or its groups." })));
    const docReasons = rep && rep.status === "rejected" ? Object.entries(rep.reasons || {}).filter(([k]) => !k.includes(".") || !d.keys.some(x => x.key === k)) : [];
    document.getElementById("doc-reasons").replaceChildren(...docReasons.map(([k, v]) => el("li", { text: `${k}: ${v}` })));
  }
  function targets(d) {
    const select = document.getElementById("target");
    const wanted = [d.id, ...d.groups.map(g => `group:${g}`)];
    if ([...select.options].map(o => o.value).join() === wanted.join()) return;
    const chosen = select.value;
    select.replaceChildren(...wanted.map(t => el("option", { value: t, text: t.startsWith("group:") ? `${t} (every member)` : `${t} (this gateway)` })));
    if (wanted.includes(chosen)) select.value = chosen;
  }
  async function loadDetail() {
    const r = await api(base);
    if (r.status === 404) { document.getElementById("summary").replaceChildren(el("p", { class: "bad", text: r.body.error.message })); return; }
    if (!r.ok) return;
    detail = r.body;
    summary(detail); reported(detail); targets(detail);
    if (watching) checkWatch();
  }
  async function loadPushes() {
    const r = await api(`${base}/pushes`);
    if (!r.ok) return;
    const tbody = document.querySelector("#pushes tbody");
    tbody.replaceChildren(...r.body.pushes.map(p => el("tr", { "data-version": p.version },
      el("td", { text: clock(p.issued_at ?? p.seen) }), el("td", { text: p.target }), el("td", { text: p.version }),
      el("td", { text: p.issued_by || "–" }), el("td", { text: p.signed ? "yes" : "no" }),
      el("td", {}, p.report ? pill(p.report.status) : el("span", { class: "note", text: "no report" }),
        p.report && Object.keys(p.report.reasons).length ? el("div", { class: "note", text: Object.entries(p.report.reasons).map(([k, v]) => `${k}: ${v}`).join("; ") }) : null),
      el("td", {}, el("code", { text: JSON.stringify(p.config) })))));
    if (!r.body.pushes.length) tbody.append(el("tr", {}, el("td", { colspan: 7, class: "note", text: "No push seen yet." })));
  }

  // -- push -------------------------------------------------------------------------------------
  const result = document.getElementById("push-result");
  function showReasons(title, reasons, cls, listClass = "reasons") {
    result.replaceChildren(el("p", { class: cls, text: title }),
      el("ul", { class: listClass }, ...Object.entries(reasons || {}).map(([k, v]) => el("li", { "data-key": k, text: `${k}: ${v}` }))));
  }
  function body() {
    return JSON.stringify({ target: document.getElementById("target").value, toml: document.getElementById("toml").value,
      force: document.getElementById("force").checked });
  }
  document.getElementById("validate").addEventListener("click", async () => {
    result.dataset.outcome = "validating";
    const r = await api("/api/v1/validate", { method: "POST", body: body() });
    if (r.ok && r.body.ok) { result.dataset.outcome = "valid"; result.replaceChildren(el("p", { class: "ok", text: "Valid: the gateways' rules accept this config." })); }
    else { result.dataset.outcome = "invalid"; showReasons(r.ok ? "The gateways would refuse this config:" : r.body.error.message, r.ok ? r.body.reasons : r.body.error.reasons, "bad"); }
  });
  document.getElementById("push-form").addEventListener("submit", async e => {
    e.preventDefault();
    result.dataset.outcome = "pushing";
    const r = await api("/api/v1/push", { method: "POST", body: body() });
    if (r.status !== 202) { result.dataset.outcome = "refused"; showReasons(r.body ? r.body.error.message : `HTTP ${r.status}`, r.body && r.body.error.reasons, "bad"); return; }
    watching = { target: r.body.target, version: r.body.version };
    result.dataset.outcome = "pushed";
    result.replaceChildren(el("p", { text: `Pushed version ${r.body.version} to ${r.body.target} as ${r.body.issued_by}; waiting for the gateway's report…` }));
    loadDetail(); loadPushes();
  });
  function checkWatch() {
    const rep = detail.reported;
    if (!rep || rep.target !== watching.target || rep.version !== watching.version) return;
    watching = null;
    result.dataset.outcome = rep.status;
    if (rep.status === "rejected") showReasons(`Rejected by ${detail.id} (version ${rep.version}):`, rep.reasons, "bad");
    else showReasons(`${rep.status === "applied" ? "Applied" : "Partly applied"} by ${detail.id}: version ${rep.version} in force.`, rep.results, rep.status === "applied" ? "ok" : "bad", "results");
    loadPushes();
  }

  getSession().then(s => {
    if (s.read_only) {
      document.getElementById("read-only").hidden = false;
      document.getElementById("push").disabled = true;
      document.getElementById("push").title = "read-only: the console has no signing key";
    }
  }).catch(() => {});
  showSession();
  loadSeries(true).then(() => every(POLL_MS, () => loadSeries(false)));
  every(Math.max(POLL_MS, 1000), loadDetail);
  every(3000, loadPushes);
})();
