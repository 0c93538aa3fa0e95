/* Device page: fetch the device's telemetry as charts and redraw them every few seconds. */
(function () {
  "use strict";
  var box = document.getElementById("charts");
  var windowSelect = document.getElementById("window");
  if (!box) return;

  function load() {
    var url = box.getAttribute("data-url") + "?minutes=" + encodeURIComponent(windowSelect.value);
    fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } })
      .then(function (r) { if (!r.ok) throw new Error("HTTP " + r.status); return r.json(); })
      .then(function (data) {
        box.textContent = "";
        if (!data.charts.length) {
          var p = document.createElement("p");
          p.className = "muted";
          p.id = "charts-empty";
          p.textContent = "no telemetry in this window";
          box.appendChild(p);
        }
        data.charts.forEach(function (chart) {
          var div = document.createElement("div");
          box.appendChild(div);
          window.AutodlChart.draw(div, chart);
        });
        box.setAttribute("data-loaded", String(Date.now()));
      })
      .catch(function (err) { box.setAttribute("data-error", String(err)); });
  }

  windowSelect.addEventListener("change", load);
  load();
  setInterval(load, 5000);
})();
