"""Readable text of an HTML body, for the index when a message has no text/plain part.

HTML5 tree building (lexbor via selectolax) is quadratic on crafted input: thousands of unclosed
elements make every end tag walk the whole stack of open elements (30,000 tags took seconds). So the
tree parser only gets markup with a bounded number of tags and of tags left open; anything else goes
through a linear tag stripper that gives slightly rougher text. Input is cut to ``MAX_HTML_CHARS``.
"""

from __future__ import annotations

import html as html_entities
import re

from selectolax.lexbor import LexborHTMLParser

MAX_HTML_CHARS = 600_000
MAX_TREE_TAGS = 20_000
MAX_UNCLOSED_TAGS = 1_000

_BLOCK_TAGS = "p|div|br|hr|tr|td|th|li|ul|ol|h[1-6]|table|blockquote|pre|section|article|header|footer"
# Text nodes are joined without a separator (so "wor<b>ld</b>" stays one word); a line break is put
# in front of block-level tags instead, so that paragraphs and cells do not run together.
# Bytes: lexbor parses UTF-8, and a bytes pattern is quicker than a str one (bench/README.md).
_BLOCK_TAG_RE = re.compile(rf"<(?=/?(?:{_BLOCK_TAGS})\b)".encode(), re.IGNORECASE)
_DROPPED_TAGS = ["script", "style", "template", "head"]
# Start tags that never or seldom deepen the tree: void elements and ones closed implicitly.
_SHALLOW_TAGS = (
    "<br",
    "<img",
    "<hr",
    "<meta",
    "<input",
    "<link",
    "<area",
    "<wbr",
    "<col",
    "<p",
    "<li",
    "<td",
    "<tr",
    "<th",
    "<!",
)

_ANY_TAG_RE = re.compile(r"<[^<>]*>")
_BLOCK_ONLY_RE = re.compile(rf"<(?:/?(?:{_BLOCK_TAGS})\b)[^<>]*>", re.IGNORECASE)


def html_to_text(html: str) -> str:
    """Visible text of ``html``: script, style and head dropped, whitespace collapsed, one line per block."""
    if not html.strip():
        return ""
    if len(html) > MAX_HTML_CHARS:
        html = html[:MAX_HTML_CHARS]
    text = _text_by_tree(html) if _tree_parser_is_safe(html) else _text_by_stripping(html)
    # Each line's whitespace collapsed, blank lines dropped (str.split is faster than the
    # equivalent regular expressions).
    lines = (" ".join(line.split()) for line in text.replace("\x00", "").split("\n"))
    return "\n".join(filter(None, lines))


def _tree_parser_is_safe(html: str) -> bool:
    tags = html.count("<")
    if tags <= MAX_UNCLOSED_TAGS:  # most mail: too few tags to leave too many open
        return True
    if tags > MAX_TREE_TAGS:
        return False
    lowered = html.lower()
    closing = lowered.count("</")
    shallow = sum(lowered.count(prefix) for prefix in _SHALLOW_TAGS)
    return tags - 2 * closing - shallow <= MAX_UNCLOSED_TAGS


def _text_by_tree(html: str) -> str:
    tree = LexborHTMLParser(_BLOCK_TAG_RE.sub(b"\n<", html.encode("utf-8", "replace")))
    tree.strip_tags(_DROPPED_TAGS)
    root = tree.body or tree.root
    return "" if root is None else root.text(separator="", strip=False)


def _text_by_stripping(html: str) -> str:
    """Linear fallback: drop comments, script and style blocks, then every tag; unescape entities."""
    text = _DROPPED_BLOCKS_RE.sub("", html)
    text = _BLOCK_ONLY_RE.sub("\n", text)
    return html_entities.unescape(_ANY_TAG_RE.sub("", text))


# An unterminated block runs to the end: each alternative either finds its end or takes the rest,
# so a later start is never rescanned (no quadratic retry on many unclosed comments).
_DROPPED_BLOCKS_RE = re.compile(
    r"<(?=[!sS])(?:!--(?:.*?-->|.*)|(script|style)\b(?:.*?</\1[^>]*>|.*))", re.DOTALL | re.IGNORECASE
)
