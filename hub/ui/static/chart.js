/* A small dependency-free SVG line chart for the autodl dashboard.
 * AutodlChart.draw(element, {title, series: [{name, points: [[epochMs, value], ...]}]})
 */
(function (global) {
  "use strict";
  var NS = "http://www.w3.org/2000/svg";
  var W = 600, H = 200, L = 48, R = 10, T = 10, B = 24;

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
    var title = document.createElement("h3");
    title.textContent = chart.title;
    container.appendChild(title);
    var xs = [], ys = [];
    chart.series.forEach(function (s) { s.points.forEach(function (p) { xs.push(p[0]); ys.push(p[1]); }); });
    var svg = el("svg", { viewBox: "0 0 " + W + " " + H, preserveAspectRatio: "none", role: "img" }, container);
    if (!xs.length) { el("text", { x: W / 2, y: H / 2, "text-anchor": "middle" }, svg).textContent = "no data"; return svg; }
    var x0 = Math.min.apply(null, xs), x1 = Math.max.apply(null, xs);
    var y0 = Math.min(0, Math.min.apply(null, ys)), y1 = Math.max.apply(null, ys);
    if (x1 === x0) { x0 -= 30000; x1 += 30000; }
    if (y1 === y0) { y1 = y0 + 1; }
    var step = niceStep(y1 - y0);
    y1 = Math.ceil(y1 / step) * step;
    y0 = Math.floor(y0 / step) * step;
    function px(x) { return L + (x - x0) / (x1 - x0) * (W - L - R); }
    function py(y) { return H - B - (y - y0) / (y1 - y0) * (H - T - B); }
    for (var g = y0; g <= y1 + step / 2; g += step) {
      el("line", { x1: L, x2: W - R, y1: py(g), y2: py(g), "class": "grid" }, svg);
      el("text", { x: L - 4, y: py(g) + 3, "text-anchor": "end" }, svg).textContent = fmt(g);
    }
    el("line", { x1: L, x2: L, y1: T, y2: H - B, "class": "axis" }, svg);
    el("line", { x1: L, x2: W - R, y1: H - B, y2: H - B, "class": "axis" }, svg);
    el("text", { x: L, y: H - 6 }, svg).textContent = clock(x0);
    el("text", { x: W - R, y: H - 6, "text-anchor": "end" }, svg).textContent = clock(x1);
    var legend = document.createElement("div");
    legend.className = "legend";
    chart.series.forEach(function (s, i) {
      var pts = s.points.slice().sort(function (a, b) { return a[0] - b[0]; });
      var coords = pts.map(function (p) { return px(p[0]).toFixed(1) + "," + py(p[1]).toFixed(1); }).join(" ");
      var line = el("polyline", { points: coords, "class": "line c" + (i % 6), "data-series": s.name,
                                  "data-count": pts.length, "vector-effect": "non-scaling-stroke" }, svg);
      el("title", {}, line).textContent = s.name + ": last " + fmt(pts[pts.length - 1][1]);
      var item = document.createElement("span");
      var swatch = document.createElement("i");
      swatch.className = "c" + (i % 6);
      item.appendChild(swatch);
      item.appendChild(document.createTextNode(s.name + " (last " + fmt(pts[pts.length - 1][1]) + ")"));
      legend.appendChild(item);
    });
    container.appendChild(legend);
    return svg;
  }

  global.AutodlChart = { draw: draw };
})(window);
