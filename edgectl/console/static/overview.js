// The overview: every gateway with presence, config and health; sortable, filterable, polled live.
"use strict";
(() => {
  const { api, el, pill, ago, num, configText, showSession, every } = Console;
  const POLL_MS = Number(new URLSearchParams(location.search).get("poll")) || 2000;
  const tbody = document.querySelector("#gateways tbody");
  const rows = new Map();  // id -> {tr, sig}: rows are updated in place, so keyboard focus stays put
  let data = { gateways: [], counts: {}, now: 0 };
  let sortKey = "id", sortDir = 1;
  const COUNT_LABELS = [["total", "gateways"], ["online", "online"], ["offline", "offline"], ["unhealthy", "with a health flag"],
    ["rejecting", "rejecting config"], ["hot", "hot"], ["memory", "memory"], ["offloading", "offloading heavily"], ["buffered", "telemetry buffered"]];
  const FLAG_TEXT = { offline: "offline", rejecting: "rejecting config", hot: "hot", memory: "memory", offloading: "offloading heavily", buffered: "telemetry buffered" };

  const flagSelect = document.getElementById("flag-filter");
  for (const [flag, text] of Object.entries(FLAG_TEXT)) flagSelect.append(el("option", { value: flag, text }));
  document.getElementById("filters").addEventListener("submit", e => e.preventDefault());
  for (const id of ["filter", "state-filter", "flag-filter"]) document.getElementById(id).addEventListener("input", render);
  for (const button of document.querySelectorAll("th button[data-sort]")) {
    button.addEventListener("click", () => {
      const key = button.dataset.sort;
      sortDir = key === sortKey ? -sortDir : 1;
      sortKey = key;
      for (const th of document.querySelectorAll("#gateways th")) th.removeAttribute("aria-sort");
      button.parentElement.setAttribute("aria-sort", sortDir > 0 ? "ascending" : "descending");
      render();
    });
  }

  function sortValue(g, key) {
    switch (key) {
      case "groups": return g.groups.join(",");
      case "config": return configText(g.config);
      case "flags": return g.flags.length;
      default: return g[key] ?? "";
    }
  }
  function matches(g) {
    const text = document.getElementById("filter").value.trim().toLowerCase();
    const state = document.getElementById("state-filter").value;
    const flag = flagSelect.value;
    if (state && g.state !== state) return false;
    if (flag === "unhealthy" && !g.flags.length) return false;
    if (flag && flag !== "unhealthy" && !g.flags.includes(flag)) return false;
    if (!text) return true;
    return [g.id, g.version, g.model, ...g.groups].some(v => v && String(v).toLowerCase().includes(text));
  }
  function cells(g) {
    const presence = el("td", { "data-state": g.state }, pill(g.state), " ",
      el("span", { class: "note", text: g.state === "online" ? `since ${ago(g.since, data.now)}` : `since ${ago(g.since, data.now)}${g.reason ? ` (${g.reason})` : ""}` }));
    const cfg = el("td", { class: "config" });
    for (const [target, v] of Object.entries(g.config)) {
      const same = v.desired === null || v.desired === v.applied;
      cfg.append(el("div", { text: `${target}: ${v.desired ?? "–"} / ${v.applied ?? "–"}`, class: same ? null : "bad",
        title: same ? "reported as desired" : "the gateway has not applied the desired version" }));
    }
    if (g.report && g.report.status && g.report.status !== "applied") cfg.append(pill(g.report.status));
    const flags = el("td", { class: "flags" }, ...g.flags.map(f => pill(FLAG_TEXT[f] || f, "flag")));
    if (!g.flags.length) flags.append(el("span", { class: "ok", text: "ok" }));
    return [
      el("th", { scope: "row" }, el("a", { href: `/gateway/${encodeURIComponent(g.id)}`, text: g.id })),
      presence, flags, el("td", { text: num(g.cpu) }), el("td", { text: num(g.mem) }), cfg,
      el("td", { text: g.model ?? (g.engine_up === false ? "engine down" : "–") }), el("td", { text: g.groups.join(", ") || "–" }),
      el("td", { text: g.version ?? "–" }), el("td", { text: g.boot ?? "–" }),
    ];
  }
  function render() {
    const list = data.gateways.filter(matches).sort((a, b) => {
      const x = sortValue(a, sortKey), y = sortValue(b, sortKey);
      return (x < y ? -1 : x > y ? 1 : 0) * sortDir || (a.id < b.id ? -1 : 1);
    });
    const seen = new Set();
    list.forEach((g, index) => {
      seen.add(g.id);
      const sig = JSON.stringify([g, Math.round(data.now / 10)]);
      let entry = rows.get(g.id);
      if (!entry) { entry = { tr: el("tr", { "data-gateway": g.id }), sig: "" }; rows.set(g.id, entry); }
      if (entry.sig !== sig) { entry.tr.replaceChildren(...cells(g)); entry.sig = sig; }
      const at = tbody.children[index];
      if (at !== entry.tr) tbody.insertBefore(entry.tr, at || null);  // moved only when the order changed
    });
    for (const [id, entry] of rows) if (!seen.has(id)) { entry.tr.remove(); if (!data.gateways.some(g => g.id === id)) rows.delete(id); }
    document.getElementById("empty").hidden = data.gateways.length > 0;
    const counts = document.getElementById("counts");
    counts.replaceChildren(...COUNT_LABELS.filter(([k]) => k in data.counts && (data.counts[k] || ["total", "online", "offline", "unhealthy"].includes(k)))
      .map(([k, label]) => el("li", { "data-count": k }, el("b", { text: data.counts[k] }), label)));
  }
  showSession();
  every(POLL_MS, async () => {
    const r = await api("/api/v1/gateways");
    if (r.ok) { data = r.body; render(); }
  });
})();
