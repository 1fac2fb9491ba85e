// Shared by the console's pages: API calls (with the CSRF header on writes), formatting, session banner.
"use strict";
const Console = (() => {
  let session = null;
  async function getSession() {
    if (!session) {
      const r = await fetch("/api/v1/session", { credentials: "same-origin" });
      if (!r.ok) throw new Error(`session: HTTP ${r.status}`);
      session = await r.json();
    }
    return session;
  }
  async function api(path, options = {}) {
    const init = { credentials: "same-origin", ...options, headers: { ...(options.headers || {}) } };
    if (init.method && init.method !== "GET") {
      const s = await getSession();
      init.headers[s.csrf_header] = s.csrf;
      init.headers["Content-Type"] = "application/json";
    }
    const r = await fetch(path, init);
    let body = null;
    try { body = await r.json(); } catch (e) { body = null; }
    return { status: r.status, ok: r.ok, body };
  }
  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "text") node.textContent = v; else node.setAttribute(k, v === true ? "" : v);
    }
    for (const c of children) if (c !== null && c !== undefined) node.append(c);
    return node;
  }
  function pill(text, cls) { return el("span", { class: `pill ${cls || String(text).replace(/\s+/g, "-")}`, text }); }
  function ago(ts, now) {
    if (typeof ts !== "number") return "–";
    const s = Math.max(0, (now || Date.now() / 1000) - ts);
    if (s < 120) return `${Math.round(s)} s ago`;
    if (s < 7200) return `${Math.round(s / 60)} min ago`;
    if (s < 172800) return `${Math.round(s / 3600)} h ago`;
    return `${Math.round(s / 86400)} d ago`;
  }
  function clock(ts) { return typeof ts === "number" ? new Date(ts * 1000).toLocaleString() : "–"; }
  function num(v, digits = 0) { return typeof v === "number" ? v.toFixed(digits) : "–"; }
  function configText(config) {
    return Object.entries(config || {}).map(([t, v]) => `${t}: ${v.desired ?? "–"} / ${v.applied ?? "–"}`).join("; ") || "–";
  }
  async function showSession() {
    const node = document.getElementById("session");
    try {
      const s = await getSession();
      node.textContent = `${s.user} · ${s.read_only ? "read-only (no signing key)" : "pushes signed, key " + s.key_fingerprint.slice(0, 12) + "…"}`
        + (s.broker_connected ? "" : " · broker unreachable");
    } catch (e) { node.textContent = `Cannot reach the console: ${e.message}`; }
  }
  function every(ms, fn) {  // poll; a slow answer is not overlapped by the next call
    let stopped = false;
    (async function loop() { while (!stopped) { try { await fn(); } catch (e) { console.warn(e); } await new Promise(r => setTimeout(r, ms)); } })();
    return () => { stopped = true; };
  }
  return { api, el, pill, ago, clock, num, configText, getSession, showSession, every };
})();
