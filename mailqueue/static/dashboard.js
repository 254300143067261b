// The dashboard refreshes its panel every few seconds, from the same server only
// (the page's Content-Security-Policy allows nothing else). Without JavaScript
// the page reloads itself instead (its <noscript> refresh).
(function () {
  "use strict";
  var every = Number(document.body.getAttribute("data-refresh-seconds")) || 5;
  var refreshes = 0;
  function refresh() {
    fetch("panel", {credentials: "same-origin", cache: "no-store"})
      .then(function (response) {
        if (!response.ok) { throw new Error("HTTP " + response.status); }
        return response.text();
      })
      .then(function (html) {
        document.getElementById("panel").innerHTML = html;
        refreshes += 1;
        document.body.setAttribute("data-refreshes", String(refreshes));
        document.body.removeAttribute("data-stale");
      })
      .catch(function () { document.body.setAttribute("data-stale", "true"); })
      .then(function () { window.setTimeout(refresh, every * 1000); });
  }
  window.setTimeout(refresh, every * 1000);
}());
