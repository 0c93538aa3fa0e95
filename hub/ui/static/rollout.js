/* Rollout page: refresh the live part (progress, analysis, devices, actions) every two seconds. */
(function () {
  "use strict";
  var live = document.getElementById("live");
  if (!live) return;
  var last = null;

  function refresh() {
    if (document.hidden) return;
    fetch(live.getAttribute("data-url"), { credentials: "same-origin" })
      .then(function (r) { if (!r.ok) throw new Error("HTTP " + r.status); return r.text(); })
      .then(function (html) {
        // Swap only when something changed, so a button under the pointer stays put.
        if (html !== last) { live.innerHTML = html; last = html; }
        live.setAttribute("data-refreshed", String(Date.now()));
      })
      .catch(function (err) { live.setAttribute("data-error", String(err)); });
  }

  setInterval(refresh, 2000);
})();
