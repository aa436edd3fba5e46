// The overview's live part: while a page has #live, its event stream (data-events) replaces
// it with each new version the server sends. A file of ours: the CSP allows no inline script.
let source = null;

function follow() {
  const live = document.getElementById("live");
  if (!live) {
    if (source) { source.close(); source = null; }
    return;
  }
  if (source || !window.EventSource) return;
  source = new EventSource(live.dataset.events);
  source.addEventListener("overview", (event) => {
    const target = document.getElementById("live");
    if (!target) return;
    target.innerHTML = event.data;
    if (window.htmx) window.htmx.process(target);
  });
}

document.addEventListener("DOMContentLoaded", follow);
document.addEventListener("htmx:afterSettle", follow);
