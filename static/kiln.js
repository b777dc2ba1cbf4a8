// Live pages without reloads. Pages work without this script; with it, a
// log that is still being written follows the build as it grows, and a page
// marked data-live reloads its content when /api/events says something it
// shows has changed.
(function () {
  var log = document.getElementById("log");
  if (log && log.dataset.follow) {
    var url = log.dataset.follow;
    fetch(url).then(function (r) {
      var reader = r.body.getReader();
      var decoder = new TextDecoder();
      var first = true;
      function pump() {
        return reader.read().then(function (x) {
          if (x.done) { return; }
          var text = decoder.decode(x.value, { stream: true });
          if (first) { log.textContent = ""; first = false; }
          log.appendChild(document.createTextNode(text));
          window.scrollTo(0, document.body.scrollHeight);
          return pump();
        });
      }
      return pump();
    });
  }

  var main = document.querySelector("main[data-live]");
  if (!main || !window.EventSource) { return; }
  var filter = main.dataset.live;
  var events = new EventSource("/api/events" + (filter ? "?" + filter : ""));
  var waiting = false;
  // At most one reload a second, however many builds finish at once.
  function reload() {
    if (waiting) { return; }
    waiting = true;
    setTimeout(function () {
      fetch(location.href, { headers: { Accept: "text/html" } })
        .then(function (r) { return r.ok ? r.text() : null; })
        .then(function (html) {
          waiting = false;
          if (!html) { return; }
          var fresh = new DOMParser().parseFromString(html, "text/html").querySelector("main");
          if (fresh) {
            main.innerHTML = fresh.innerHTML;
            main.dataset.updated = String(Date.now());
          }
        }, function () { waiting = false; });
    }, 1000);
  }
  ["eval_started", "eval_finished", "build_queued", "step_started", "build_finished", "deployment_changed", "lagged"]
    .forEach(function (name) { events.addEventListener(name, reload); });
  events.addEventListener("open", function () { main.dataset.events = "connected"; });
})();
