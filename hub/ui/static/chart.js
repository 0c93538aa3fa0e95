/* A small dependency-free SVG line chart for the autodl dashboard.
 * AutodlChart.draw(element, {title, unit, series: [{name, points: [[epochMs, value], ...]}]})
 * One unit per chart: "bytes" (axis in B, KB, MB or GB, by the largest value), "ms" (ms, or s
 * from a second up), "s", "%", "req/s", "count"; the axis leaves room for its widest label.
 */
(function (global) {
  "use strict";
  var NS = "http://www.w3.org/2000/svg";
  var W = 600, H = 200, R = 10, T = 10, B = 24, CHAR = 6.5;
  var BYTES = ["B", "KB", "MB", "GB", "TB"];

  // The scale of an axis (or a value): divide by `div`, then append `suffix`.
  function scale(unit, max) {
    var a = Math.abs(max), i = 0;
    if (unit === "bytes") {
      while (a >= 1024 && i < BYTES.length - 1) { a /= 1024; i += 1; }
      return { div: Math.pow(1024, i), suffix: " " + BYTES[i] };
    }
    if (unit === "ms") return a >= 1000 ? { div: 1000, suffix: " s" } : { div: 1, suffix: " ms" };
    if (unit === "s") return a < 1 && a > 0 ? { div: 0.001, suffix: " ms" } : { div: 1, suffix: " s" };
    if (unit === "%") return { div: 1, suffix: "%" };
    if (unit === "req/s") return { div: 1, suffix: "/s" };
    if (unit === "°C") return { div: 1, suffix: " °C" };
    return { div: 1, suffix: "" };
  }

  function withUnit(v, unit) {
    var s = scale(unit, v);
    return fmt(v / s.div) + s.suffix;
  }

  function el(name, attrs, parent) {
    var node = document.createElementNS(NS, name);
    Object.keys(attrs || {}).forEach(function (k) { node.setAttribute(k, attrs[k]); });
    if (parent) parent.appendChild(node);
    return node;
  }

  function niceStep(span) {
    var raw = span / 4, mag = Math.pow(10, Math.floor(Math.log10(raw || 1)));
    var norm = raw / mag;
    return (norm <= 1 ? 1 : norm <= 2 ? 2 : norm <= 5 ? 5 : 10) * mag;
  }

  function fmt(v) {
    var a = Math.abs(v);
    if (a >= 1e6) return (v / 1e6).toFixed(1) + "M";
    if (a >= 1e3) return (v / 1e3).toFixed(1) + "k";
    return a >= 10 || v === 0 ? String(Math.round(v * 10) / 10) : v.toPrecision(2);
  }

  function clock(ms) {
    var d = new Date(ms);
    return [d.getHours(), d.getMinutes(), d.getSeconds()].map(function (n) { return n < 10 ? "0" + n : n; }).join(":");
  }

  function draw(container, chart) {
    container.textContent = "";
    container.className = "chart";
    container.setAttribute("data-chart", chart.key || chart.title);
    var unit = chart.unit || "count";
    var title = document.createElement("h3");
    title.textContent = chart.title + (unit === "count" ? "" : " (" + scale(unit, 0).suffix.trim() + ")");
    container.appendChild(title);
    var xs = [], ys = [];
    chart.series.forEach(function (s) { s.points.forEach(function (p) { xs.push(p[0]); ys.push(p[1]); }); });
    var svg = el("svg", { viewBox: "0 0 " + W + " " + H, preserveAspectRatio: "none", role: "img" }, container);
    if (!xs.length) { el("text", { x: W / 2, y: H / 2, "text-anchor": "middle" }, svg).textContent = "no data"; return svg; }
    var x0 = Math.min.apply(null, xs), x1 = Math.max.apply(null, xs);
    // The axis counts in one scaled unit (e.g. MB), chosen by the largest value drawn.
    var axis = scale(unit, Math.max.apply(null, ys.map(Math.abs)));
    ys = ys.map(function (v) { return v / axis.div; });
    var y0 = Math.min(0, Math.min.apply(null, ys)), y1 = Math.max.apply(null, ys);
    if (x1 === x0) { x0 -= 30000; x1 += 30000; }
    if (y1 === y0) { y1 = y0 + 1; }
    var step = niceStep(y1 - y0);
    y1 = Math.ceil(y1 / step) * step;
    y0 = Math.floor(y0 / step) * step;
    var ticks = [];
    for (var g = y0; g <= y1 + step / 2; g += step) ticks.push([g, fmt(g) + axis.suffix]);
    var widest = Math.max.apply(null, ticks.map(function (t) { return t[1].length; }));
    var L = Math.max(40, Math.ceil(widest * CHAR) + 10);
    svg.setAttribute("data-axis-unit", axis.suffix.trim());
    function px(x) { return L + (x - x0) / (x1 - x0) * (W - L - R); }
    function py(y) { return H - B - (y - y0) / (y1 - y0) * (H - T - B); }
    ticks.forEach(function (t) {
      el("line", { x1: L, x2: W - R, y1: py(t[0]), y2: py(t[0]), "class": "grid" }, svg);
      el("text", { x: L - 4, y: py(t[0]) + 3, "text-anchor": "end", "class": "tick" }, svg).textContent = t[1];
    });
    el("line", { x1: L, x2: L, y1: T, y2: H - B, "class": "axis" }, svg);
    el("line", { x1: L, x2: W - R, y1: H - B, y2: H - B, "class": "axis" }, svg);
    el("text", { x: L, y: H - 6 }, svg).textContent = clock(x0);
    el("text", { x: W - R, y: H - 6, "text-anchor": "end" }, svg).textContent = clock(x1);
    var legend = document.createElement("div");
    legend.className = "legend";
    chart.series.forEach(function (s, i) {
      var pts = s.points.slice().sort(function (a, b) { return a[0] - b[0]; });
      var coords = pts.map(function (p) { return px(p[0]).toFixed(1) + "," + py(p[1] / axis.div).toFixed(1); }).join(" ");
      var line = el("polyline", { points: coords, "class": "line c" + (i % 6), "data-series": s.name,
                                  "data-count": pts.length, "vector-effect": "non-scaling-stroke" }, svg);
      var last = withUnit(pts[pts.length - 1][1], unit);
      el("title", {}, line).textContent = s.name + ": last " + last;
      var item = document.createElement("span");
      var swatch = document.createElement("i");
      swatch.className = "c" + (i % 6);
      item.appendChild(swatch);
      item.appendChild(document.createTextNode(s.name + " (last " + last + ")"));
      legend.appendChild(item);
    });
    container.appendChild(legend);
    return svg;
  }

  global.AutodlChart = { draw: draw };
})(window);
