"""A message's HTML body made safe to show in the operator console (ammonia's sanitizer, via nh3).

What is kept: text, formatting, tables, links (http, https, mailto; opened in a new tab, with
``noopener``),
inline styles of a fixed list of properties whose values call no function but colours. What goes:
scripts and their content, event handlers, forms and their controls, frames, objects, embeds,
SVG and MathML (with content), ``<style>`` blocks (``@import``, ``url()``), ``<base>``, ``<meta>``,
``<link>``, and every URL that would fetch something: a remote image becomes ``BLOCKED_IMAGE``
(counted, so the page can say so), ``srcset``, ``background`` and CSS ``url()`` are dropped.
``cid:`` images are mapped to a URL the caller gives (the attachment's download), or dropped.

The result is served in a sandboxed frame (``IFRAME_SANDBOX``) with ``FRAME_CSP``: the sanitizer
and the policy each stop what the other might miss.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import nh3

# A response serving sanitized HTML: no script, no fetch but images of the console itself or
# data: URLs, inline styles only, no form, no base, no plugin; sandboxed even if framed elsewhere.
FRAME_CSP = (
    "default-src 'none'; img-src 'self' data:; style-src 'unsafe-inline'; font-src 'none'; "
    "connect-src 'none'; media-src 'none'; object-src 'none'; frame-src 'none'; form-action 'none'; "
    "base-uri 'none'; frame-ancestors 'self'; sandbox allow-popups allow-popups-to-escape-sandbox"
)
# The sandbox attribute of the iframe: no scripts, no same origin (no cookies), links may open tabs.
IFRAME_SANDBOX = "allow-popups allow-popups-to-escape-sandbox"
# What a remote image shows instead: a light grey 1x1 GIF (the image's size attributes stay).
BLOCKED_IMAGE = "data:image/gif;base64,R0lGODlhAQABAIAAAMzMzAAAACH5BAAAAAAALAAAAAABAAEAAAICRAEAOw=="

_TAGS = (nh3.ALLOWED_TAGS | {"font", "tfoot"}) - {"area", "map"}
# Removed with everything inside them (the rest of the tags not kept are removed, their text kept).
_DROPPED_WITH_CONTENT = {
    "script", "style", "svg", "math", "iframe", "object", "embed", "applet", "noscript", "template",
    "title", "textarea", "select", "button", "xmp", "noembed", "noframes",
}  # fmt: skip
_EVERYWHERE = {"style", "title", "dir", "lang", "align", "valign", "width", "height", "bgcolor"}
_ATTRIBUTES = {tag: set(allowed) for tag, allowed in nh3.ALLOWED_ATTRIBUTES.items()} | {
    "*": _EVERYWHERE,
    "font": {"color", "face", "size"},
    "table": {"align", "border", "cellpadding", "cellspacing", "summary"},
}
# Inline style properties kept; none of them takes a URL.
_STYLE_PROPERTIES = {
    "color", "background-color", "font", "font-family", "font-size", "font-style", "font-weight",
    "font-variant", "text-align", "text-decoration", "text-indent", "text-transform", "letter-spacing",
    "word-spacing", "line-height", "white-space", "vertical-align", "direction", "margin",
    "margin-top", "margin-right", "margin-bottom", "margin-left", "padding", "padding-top",
    "padding-right", "padding-bottom", "padding-left", "border", "border-top", "border-right",
    "border-bottom", "border-left", "border-color", "border-style", "border-width",
    "border-collapse", "border-spacing", "border-radius", "width", "height", "max-width",
    "min-width", "max-height", "min-height", "display", "list-style-type", "table-layout",
}  # fmt: skip
_URL_ATTRIBUTES = {"href", "src", "cite"}
_LINK = re.compile(r"(?:https?:|mailto:)", re.IGNORECASE)
_INLINE_IMAGE = re.compile(r"data:image/(?:png|gif|jpeg|webp);base64,[A-Za-z0-9+/=\s]*\Z", re.IGNORECASE)
# A declaration's value may call only colour functions; no escapes, comments or at-rules.
_FUNCTION = re.compile(r"([a-z-]*)\s*\(", re.IGNORECASE)
_COLOUR_FUNCTIONS = {"rgb", "rgba", "hsl", "hsla"}
_NEVER_IN_STYLE = re.compile(r"[\\<>@]|/\*|url|expression|javascript|behavior|binding", re.IGNORECASE)


@dataclass(frozen=True)
class SafeHtml:
    """Sanitized HTML, and how many remote resources (images, styles) it asked for that were blocked."""

    html: str
    remote_blocked: int


def sanitize_html(html: str, *, cid_url: Callable[[str], str | None]) -> SafeHtml:
    """``html`` with nothing left that runs, submits or fetches from elsewhere (see module);
    ``cid_url(content_id)`` gives the URL of an inline image part (None: it is dropped)."""
    blocked = 0

    def keep(tag: str, attribute: str, value: str) -> str | None:
        nonlocal blocked
        if attribute == "style":
            kept = _safe_style(value)
            blocked += kept != value and "url" in value.lower()
            return kept or None
        if attribute not in _URL_ATTRIBUTES:
            return value
        url = value.strip()
        if tag == "img" and attribute == "src":
            if url.lower().startswith("cid:"):
                return cid_url(url[4:].strip("<>"))
            if _INLINE_IMAGE.match(url):
                return url
            blocked += 1
            return BLOCKED_IMAGE
        return url if _LINK.match(url) else None

    cleaned = nh3.clean(
        html,
        tags=_TAGS,
        clean_content_tags=_DROPPED_WITH_CONTENT,
        attributes=_ATTRIBUTES,
        attribute_filter=keep,
        url_schemes={"http", "https", "mailto", "cid", "data"},
        filter_style_properties=_STYLE_PROPERTIES,
        link_rel="noopener noreferrer",
        # A link opens a new tab (the frame's sandboxed document is never navigated away).
        set_tag_attribute_values={"a": {"target": "_blank"}},
    )
    return SafeHtml(cleaned, blocked)


def _safe_style(style: str) -> str:
    """The declarations of ``style`` whose value fetches nothing and calls no function but colours."""
    kept = []
    for declaration in style.split(";"):
        if not declaration.strip() or _NEVER_IN_STYLE.search(declaration):
            continue
        if any(name.lower() not in _COLOUR_FUNCTIONS for name in _FUNCTION.findall(declaration)):
            continue
        kept.append(declaration.strip())
    return ";".join(kept)
