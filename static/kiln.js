// Live pages without reloads: a log that is still being written follows
// the build as it grows. Pages work without this script.
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
})();
