"""The console is accessible and plain (issue 23, item 7), in a real browser (chromium via
Playwright, as tests/test_console_browser.py), as an admin with a mailbox of realistic data.

At 400 % zoom, emulated as WCAG 1.4.10 measures it (a 1280x720 window at a device scale of 4: a
320 CSS px wide viewport), on every page of the navigation, on a message, on what shows on demand
(the search help, a rules text refused, a rules diff) and on the Rules page as a viewer:
- the page never scrolls sideways (a wide table scrolls inside its own box);
- every control is shown (only a hidden input or the inside of a closed <details> may be not);
- every control has an accessible name, as Chromium's accessibility tree computes it;
- Tab, from the top, reaches every control, first the skip link; each focused control is in the
  window, not covered or clipped, with a focus ring of at least 3:1 against what surrounds it.
With the keyboard alone: the skip link moves into the main content, a table scrolls with the arrow
keys, an unknown reply is marked sent (Enter, then its confirmation), a lockout is lifted (Space),
and the overview's live update leaves the focus where it was.
No request leaves the console, and each vendored asset's licence is served beside it.
Screenshots at 400 % go to the test's tmp folder (screenshots/).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from emailops.actions.quarantine import release_quarantined
from emailops.rules.versions import save_rules
from emailops.store import folders, messages
from emailops.users import sign_in_throttle
from prod.console.app import STATIC
from tests.console_helpers import (
    CLI,
    Console,
    MovingClock,
    add_failed_model_job,
    add_unknown_reply_and_quarantined_message,
    add_users,
    console_settings,
)
from tests.index_helpers import index_engine
from tests.test_console_browser import Page, browser, serving  # noqa: F401 (fixtures)
from tests.test_console_rules import ACK, BAD, THANKS
from tests.test_store import NOW, fetched

pytestmark = pytest.mark.timeout(300)

# 400 % of a 1280x720 window: 320x180 CSS px drawn on 1280x720 device pixels.
ZOOMED = {"viewport": {"width": 320, "height": 180}, "device_scale_factor": 4}
ACCOUNT = "bob@example.test@127.0.0.1"  # the account of console_settings
# Subjects as mail brings them: long, and one word longer than the whole window.
SUBJECTS = (
    "Invoice 2026-0412 for the maintenance of the ventilation systems in building C",
    "Re: Re: Fwd: question about the contract renewal and the new payment terms for next year",
    "Payment-reminder-INV-2026-0412-accounts-payable-department-of-example-org-final-notice",
)
# A vendored asset is named NAME-VERSION.EXT (htmx-2.0.11.min.js); its licence is NAME-LICENSE.txt.
VENDORED = re.compile(r"(?P<name>[a-z][a-z0-9]*(?:-[a-z][a-z0-9]*)*)-\d+(?:\.\d+)+(?:\.min)?\.(?:js|css)")

# An element's path in the document, a selector that finds it again (and the same element when
# the overview's live part is redrawn the same).
PATH_JS = """
  const path = (el) => {
    const parts = [];
    for (let e = el; e && e !== document.documentElement; e = e.parentElement) {
      let i = 1;
      for (let s = e.previousElementSibling; s; s = s.previousElementSibling) {
        if (s.tagName === e.tagName) i++;
      }
      parts.unshift(`${e.tagName.toLowerCase()}:nth-of-type(${i})`);
    }
    return "html > " + parts.join(" > ");
  };
"""

# Every element a keyboard user may have to reach.
CONTROLS_JS = """
() => {
  PATH
  // A control taken out of the Tab order (tabindex="-1") stays in: it has to be reached.
  const selector =
    'a[href], button, input, select, textarea, summary, iframe, [tabindex]:not([tabindex^="-"])';
  return Array.from(document.querySelectorAll(selector))
    .filter((el) => !el.disabled && !el.matches("input[type=hidden]"))
    .map((el) => {
      const outer = el.tagName === "SUMMARY" ? el.parentElement.parentElement : el;
      return {
        key: path(el),
        shown: el.checkVisibility(),
        folded: !!outer.closest("details:not([open])"),
        html: el.outerHTML.slice(0, 160),
      };
    });
}
""".replace("  PATH\n", PATH_JS)

# The focused element: where it is, whether it is what a click at the middle of its part in the
# window would hit, its ring; with ``reveal``, once scrolled into view as far as its boxes allow.
FOCUSED_JS = """
(reveal) => {
  const el = document.activeElement;
  if (!el || el === document.body || el === document.documentElement) return null;
  PATH
  if (reveal) el.scrollIntoView({block: "nearest", inline: "nearest"});
  const r = el.getBoundingClientRect();
  const width = document.documentElement.clientWidth, height = document.documentElement.clientHeight;
  // A link over several lines is several boxes: it is hit when the middle of one is.
  const hit = Array.from(el.getClientRects()).some((box) => {
    const left = Math.max(box.left, 0), right = Math.min(box.right, width);
    const top = Math.max(box.top, 0), bottom = Math.min(box.bottom, height);
    if (right <= left || bottom <= top) return false;
    const found = document.elementFromPoint((left + right) / 2, (top + bottom) / 2);
    return !!found && (found === el || el.contains(found));
  });
  let background = "rgb(255, 255, 255)";
  for (let e = el.parentElement; e; e = e.parentElement) {
    const color = getComputedStyle(e).backgroundColor;
    if (color !== "rgba(0, 0, 0, 0)" && color !== "transparent") { background = color; break; }
  }
  const style = getComputedStyle(el);
  return {
    key: path(el), html: el.outerHTML.slice(0, 160), left: r.left, right: r.right, top: r.top,
    bottom: r.bottom, width, height, hit,
    focusVisible: el.matches(":focus-visible"), outlineStyle: style.outlineStyle,
    outlineWidth: parseFloat(style.outlineWidth), outlineColor: style.outlineColor, background,
  };
}
""".replace("  PATH\n", PATH_JS)


def _luminance(css_color: str) -> float:
    red, green, blue = (int(c) / 255 for c in re.findall(r"\d+(?:\.\d+)?", css_color)[:3])

    def linear(c: float) -> float:
        return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4

    return 0.2126 * linear(red) + 0.7152 * linear(green) + 0.0722 * linear(blue)


def contrast(one: str, other: str) -> float:
    """WCAG's contrast ratio of two CSS rgb() colours."""
    light, dark = sorted((_luminance(one), _luminance(other)), reverse=True)
    return (light + 0.05) / (dark + 0.05)


@pytest.fixture
def busy_console(tmp_path: Path) -> Iterator[tuple[str, Console, dict[str, Any]]]:
    """The console served, its mailbox as an admin finds it on a working day: messages with long
    subjects, an outbox reply of unknown outcome, a quarantined message, a failed model draft,
    a locked-out user, two saved rules versions and the audit rows all that made."""
    db_url = f"sqlite:///{tmp_path / 'index.sqlite3'}"
    engine = index_engine(db_url)
    add_users(engine)
    rules_file = tmp_path / "rules.toml"
    console = Console(console_settings(tmp_path, db_url, rules_file=rules_file), engine, MovingClock())
    reply_id, quarantined = add_unknown_reply_and_quarantined_message(engine)
    with engine.begin() as conn:
        folder = folders.ensure_folder(conn, ACCOUNT, "INBOX")
        batch = [fetched(n, subject=subject) for n, subject in enumerate(SUBJECTS, start=20)]
        inserted = messages.insert_messages(conn, folder.id, 1, batch, baseline_uidnext=1, now=NOW)
    job_id = add_failed_model_job(engine)
    save_rules(engine, rules_file, ACK, actor=CLI)
    save_rules(engine, rules_file, THANKS, actor=CLI)
    policy = sign_in_throttle.ThrottlePolicy(max_failures=1)
    assert sign_in_throttle.record_failure(engine, "vic", "203.0.113.9", console.clock(), policy)
    facts = {"reply": reply_id, "quarantined": quarantined, "job": job_id, "message": inserted[20]}
    with serving(console) as base:
        yield base, console, facts


class Walk:
    """A zoomed tab signed in as ann that records every address it asks for."""

    def __init__(self, chromium: Any, base: str) -> None:
        self.tab = Page(chromium, base, **ZOOMED)
        self.page = self.tab.page
        self.base = base
        self.requested: list[str] = []
        self.page.on("request", lambda request: self.requested.append(request.url))
        self.cdp = self.page.context.new_cdp_session(self.page)
        self.cdp.send("Accessibility.enable")

    def controls(self) -> list[dict[str, Any]]:
        return list(self.page.evaluate(CONTROLS_JS))

    def names(self, keys: list[str]) -> dict[str, tuple[str, str]]:
        """Each element's (role, accessible name) from Chromium's accessibility tree."""
        root = self.cdp.send("DOM.getDocument", {"depth": 0})["root"]["nodeId"]
        found = {}
        for key in keys:
            node = self.cdp.send("DOM.querySelector", {"nodeId": root, "selector": key})["nodeId"]
            tree = self.cdp.send("Accessibility.getPartialAXTree", {"nodeId": node, "fetchRelatives": False})
            ax = tree["nodes"][0]
            found[key] = (ax.get("role", {}).get("value", ""), str(ax.get("name", {}).get("value", "")))
        return found

    def tab_to(self, text: str) -> None:
        """Tab from where the focus is until it is on the element reading ``text``."""
        for _ in range(200):
            self.page.keyboard.press("Tab")
            if self.page.evaluate("document.activeElement.textContent") == text:
                return
        raise AssertionError(f"Tab never reached {text!r}")

    def tab_through(self) -> list[dict[str, Any]]:
        """Tab from the top of the page until focus leaves the page or comes round again."""
        # The start of the page (past an autofocus): focus on the root, which then takes no focus.
        self.page.evaluate(
            "() => { const root = document.documentElement; root.tabIndex = -1; root.focus();"
            " root.removeAttribute('tabindex'); window.scrollTo(0, 0); }"
        )
        seen: list[dict[str, Any]] = []
        for _ in range(400):
            self.page.keyboard.press("Tab")
            focused = self.page.evaluate(FOCUSED_JS, False)
            if focused is None or (seen and focused["key"] == seen[0]["key"]):
                return seen
            # A control partly shown at the edge of a table's box is revealed by scrolling that box.
            focused["revealed"] = self.page.evaluate(FOCUSED_JS, True)
            seen.append(focused)
        raise AssertionError(f"Tab never left the page: {[f['html'] for f in seen[-5:]]}")


def check_page(walk: Walk, title: str, shots: Path, state: str = "") -> dict[str, tuple[str, str]]:
    """The zoomed page's checks (see the module's docstring), its screenshot named after its title
    and ``state``; the controls' (role, name)."""
    page = walk.page
    page.wait_for_function("t => document.querySelector('h1')?.textContent === t", arg=title)
    scroll_width, width = page.evaluate(
        "[document.documentElement.scrollWidth, document.documentElement.clientWidth]"
    )
    assert width == 320 and scroll_width <= width, (title, scroll_width)
    shot = "-".join(filter(None, ["zoom-400", title.lower().replace(" ", "-"), state]))
    # caret="initial": Playwright's default hides the caret by leaving style="" on each input,
    # which htmx's next swap copies over (setAttribute) and the CSP then refuses.
    page.screenshot(path=str(shots / f"{shot}.png"), full_page=True, caret="initial")

    controls = walk.controls()
    assert controls, title
    hidden = [c["html"] for c in controls if not c["shown"] and not c["folded"]]
    assert hidden == [], (title, hidden)
    shown = [c for c in controls if c["shown"]]

    names = walk.names([c["key"] for c in shown])
    nameless = [(c["html"], names[c["key"]]) for c in shown if not names[c["key"]][1].strip()]
    assert nameless == [], (title, nameless)

    focused = walk.tab_through()
    assert focused and "skip-link" in focused[0]["html"], (title, focused[:1])
    for f in focused:
        where = (title, f["html"])
        assert f["focusVisible"], where
        assert f["right"] > 0 and f["left"] < f["width"], (*where, f["left"], f["right"])
        assert f["bottom"] > 0 and f["top"] < f["height"], (*where, f["top"], f["bottom"])
        assert f["hit"], (*where, "covered or clipped")
        revealed = f["revealed"]
        if revealed["right"] - revealed["left"] <= revealed["width"]:  # nothing of it beyond the window
            inside = revealed["left"] >= -0.5 and revealed["right"] <= revealed["width"] + 0.5
            assert inside, (*where, revealed)
        assert revealed["hit"], (*where, "covered or clipped once scrolled into view")
        assert f["outlineStyle"] != "none" and f["outlineWidth"] >= 2, (*where, f["outlineStyle"])
        ratio = contrast(f["outlineColor"], f["background"])
        assert ratio >= 3, (*where, f["outlineColor"], f["background"], ratio)
    unreached = {c["key"] for c in shown} - {f["key"] for f in focused}
    assert unreached == set(), (title, [c["html"] for c in shown if c["key"] in unreached])

    return names


def test_every_page_reflows_at_400_percent_and_works_with_the_keyboard_alone(
    busy_console: tuple[str, Console, dict[str, Any]],
    browser: Any,  # noqa: F811
    tmp_path: Path,
) -> None:
    base, console, facts = busy_console
    shots = tmp_path / "screenshots"
    shots.mkdir()
    walk = Walk(browser, base)
    page = walk.page

    page.goto(base + "/sign-in")
    names = check_page(walk, "Sign in", shots)
    assert sorted(name for _, name in names.values()) == sorted(
        ["Skip to main content", "Username", "Password", "Sign in"]
    )
    assert ("button", "Sign in") in names.values()
    walk.tab.sign_in("ann")

    nav = page.get_by_role("navigation", name="Main").get_by_role("link")
    pages = [(link.inner_text(), link.get_attribute("href")) for link in nav.all()]
    assert [title for title, _ in pages] == [
        *("Overview", "Search", "Outbox", "Quarantine", "Drafts", "Rules", "Accounts", "Users"),
        *("Audit log", "Settings"),
    ]
    pages.append((f"Message {facts['message']}", f"/messages/{facts['message']}"))
    page.goto(base + "/accounts")
    account = page.locator("main table a").first
    pages.append((f"Account {account.inner_text()}", str(account.get_attribute("href"))))
    for title, href in pages:
        page.goto(base + href)
        check_page(walk, title, shots)

    # The realistic data is on the pages walked: each action named after what it acts on.
    page.goto(base + "/outbox")
    page.get_by_role("button", name=f"Mark sent reply {facts['reply']}").wait_for()
    page.goto(base + "/drafts")
    page.get_by_role("button", name=f"Retry job {facts['job']}").wait_for()
    page.goto(base + "/quarantine")
    page.get_by_role("button", name="Release INBOX 7").wait_for()

    # The overview's live updates leave the keyboard where it was: on the same control redrawn.
    page.goto(base + "/")
    count = page.locator("#count-quarantined")
    assert count.inner_text() == "1"
    fetch = page.get_by_role("button", name=re.compile(r"^Fetch INBOX of .+ now$")).inner_text()
    walk.tab_to(fetch)
    (released,) = release_quarantined(console.engine, [facts["quarantined"]], account=ACCOUNT, actor=CLI)
    assert released.done, released
    count.filter(has_text="0").wait_for(timeout=15_000)
    assert page.evaluate("document.activeElement.textContent") == fetch
    assert page.evaluate("document.activeElement.matches(':focus-visible')")

    # What shows on demand reflows too: the query language's help, opened from the keyboard ...
    page.goto(base + "/messages")
    page.locator("#query-help > summary").focus()
    page.keyboard.press("Enter")
    page.wait_for_function("() => document.getElementById('query-help').open")
    check_page(walk, "Search", shots, "help")
    # ... and a rules text refused at its lines.
    page.goto(base + "/rules")
    page.get_by_label("Rules (TOML)").fill(BAD)
    page.get_by_role("button", name="Save").press("Enter")
    page.locator("#problem-line-14").wait_for()
    check_page(walk, "Rules", shots, "refused")
    # ... and the change a rules text would make (a box that scrolls sideways, like a table's).
    page.get_by_label("Rules (TOML)").fill(ACK)
    page.get_by_role("button", name="Check and show the change").press("Enter")
    page.locator("pre.diff").wait_for()
    names = check_page(walk, "Rules", shots, "change")
    assert ("region", "The change") in names.values()

    # The skip link takes the keyboard past the header: the next Tab is in the main content.
    page.goto(base + "/audit")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.textContent") == "Skip to main content"
    page.keyboard.press("Enter")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.closest('main') !== null")
    assert page.evaluate("document.activeElement.id") == "actor"
    # A table wider than the window scrolls in its own box, with the arrow keys.
    region = page.get_by_role("region", name="Audit log entries")
    assert region.evaluate("box => box.scrollWidth > box.clientWidth")
    assert region.evaluate("box => box.scrollLeft") == 0
    region.focus()
    page.keyboard.press("ArrowRight")
    page.wait_for_function("() => document.activeElement.scrollLeft > 0")
    assert page.evaluate("document.documentElement.scrollWidth") <= 320

    # An unknown reply marked sent with the keyboard alone: Enter, then its confirmation.
    page.goto(base + "/outbox")
    confirmations: list[str] = []
    page.on("dialog", lambda dialog: (confirmations.append(dialog.message), dialog.accept()))
    label = f"Mark sent reply {facts['reply']}"
    walk.tab_to(label)
    page.keyboard.press("Enter")
    notice = f"Reply {facts['reply']} of bob@example.test resolved as sent: now sent."
    page.get_by_role("status").filter(has_text=notice).wait_for()
    assert confirmations == [f"Mark sent reply {facts['reply']} (Re: question to carol@example.org)?"]
    assert page.get_by_role("button", name=label).count() == 0

    # A lockout lifted with Space.
    page.goto(base + "/users")
    walk.tab_to("Lift lockout of vic")
    page.keyboard.press("Space")
    page.get_by_role("status").filter(has_text="Lockout of vic lifted.").wait_for()
    assert page.get_by_role("button", name="Lift lockout of vic").count() == 0
    assert walk.tab.violations == []

    # A viewer reads the rules file in a box of its own, which the keyboard reaches and scrolls.
    page.get_by_role("button", name="Sign out").press("Enter")
    page.get_by_role("heading", name="Sign in").wait_for()
    walk.tab.sign_in("vic")
    page.goto(base + "/rules")
    names = check_page(walk, "Rules", shots, "viewer")
    assert ("region", "The rules file") in names.values()

    # Nothing but the console was asked for anything, and what it vendors comes with its licence.
    assert any(url.startswith(base + "/static/") for url in walk.requested)
    elsewhere = [url for url in walk.requested if not url.startswith(base + "/")]
    assert elsewhere == []
    vendored = {m["name"] for path in STATIC.iterdir() if (m := VENDORED.fullmatch(path.name))}
    assert "htmx" in vendored
    loaded = {m["name"] for url in walk.requested if (m := VENDORED.fullmatch(url.rsplit("/static/", 1)[-1]))}
    assert loaded <= vendored and "htmx" in loaded
    for name in vendored:
        licence = page.request.get(f"{base}/static/{name}-LICENSE.txt")
        assert licence.status == 200 and licence.headers["content-type"].startswith("text/plain"), name
        assert "Permission" in licence.text() or "License" in licence.text(), name
    shown = sorted(path.name for path in shots.glob("*.png"))
    assert len(shown) == 1 + len(pages) + 4, shown
