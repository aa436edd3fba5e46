// The overview's live part: while a page has #live, its event stream (data-events) replaces
// it with each new version the server sends. A file of ours: the CSP allows no inline script.
let source = null;

// What a control is to its user: a redrawn part has a new element for the same control.
function sameControl(one, other) {
  return one.tagName === other.tagName && one.id === other.id &&
    one.getAttribute("href") === other.getAttribute("href") &&
    one.textContent.trim() === other.textContent.trim();
}

function redraw(target, html) {
  // The keyboard keeps its place: focus inside the part moves to the same control redrawn.
  const focused = target.contains(document.activeElement) ? document.activeElement : null;
  target.innerHTML = html;
  if (focused) {
    const again = Array.from(target.getElementsByTagName(focused.tagName))
      .find((candidate) => sameControl(candidate, focused));
    if (again) again.focus({ preventScroll: true });
  }
}

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
    redraw(target, event.data);
    if (window.htmx) window.htmx.process(target);
  });
}

document.addEventListener("DOMContentLoaded", follow);
document.addEventListener("htmx:afterSettle", follow);
