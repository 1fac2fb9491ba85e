// A small hand-written SVG line chart (no library, nothing downloaded): time on x, one or more
// series on y, min/max labels, and an accessible name with the latest value.
"use strict";
const Chart = (() => {
  const W = 320, H = 130, L = 36, R = 6, T = 8, B = 18;
  const COLORS = ["#0b5cad", "#b42318", "#1a7f37", "#9a6700", "#6941c6", "#c11574", "#026aa2", "#475467"];
  const NS = "http://www.w3.org/2000/svg";
  function node(tag, attrs, text) {
    const n = document.createElementNS(NS, tag);
    for (const [k, v] of Object.entries(attrs)) n.setAttribute(k, v);
    if (text !== undefined) n.textContent = text;
    return n;
  }
  function nice(v) {
    if (v <= 0) return 1;
    const p = Math.pow(10, Math.floor(Math.log10(v))), m = v / p;
    return (m <= 1 ? 1 : m <= 2 ? 2 : m <= 5 ? 5 : 10) * p;
  }
  function hhmm(ts) { const d = new Date(ts * 1000); return d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" }); }
  // series: [{name, points: [[ts, value], ...]}]; t0, t1: the window; max: a fixed top (percentages)
  function draw(svg, series, t0, t1, max) {
    svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
    const values = series.flatMap(s => s.points.map(p => p[1]));
    const top = max || nice(Math.max(0, ...values) * 1.1);
    const x = t => L + (W - L - R) * (t - t0) / Math.max(1e-9, t1 - t0);
    const y = v => T + (H - T - B) * (1 - Math.min(v, top) / top);
    const parts = [
      node("line", { class: "axis", x1: L, y1: H - B, x2: W - R, y2: H - B }),
      node("line", { class: "axis", x1: L, y1: T, x2: L, y2: H - B }),
      node("text", { x: L - 4, y: T + 8, "text-anchor": "end" }, String(+top.toPrecision(3))),
      node("text", { x: L - 4, y: H - B, "text-anchor": "end" }, "0"),
      node("text", { x: L, y: H - 4 }, hhmm(t0)),
      node("text", { x: W - R, y: H - 4, "text-anchor": "end" }, hhmm(t1)),
    ];
    series.forEach((s, i) => {
      const pts = s.points.filter(p => p[0] >= t0);
      if (!pts.length) return;
      const d = pts.map((p, j) => `${j ? "L" : "M"}${x(p[0]).toFixed(1)},${y(p[1]).toFixed(1)}`).join("");
      parts.push(node("path", { d, fill: "none", stroke: COLORS[i % COLORS.length], "stroke-width": 1.5, "vector-effect": "non-scaling-stroke" }));
      if (pts.length === 1) parts.push(node("circle", { cx: x(pts[0][0]), cy: y(pts[0][1]), r: 2, fill: COLORS[i % COLORS.length] }));
    });
    if (!values.length) parts.push(node("text", { x: (L + W) / 2, y: H / 2, "text-anchor": "middle" }, "no data in this window"));
    svg.replaceChildren(...parts);
  }
  return { draw, COLORS };
})();
