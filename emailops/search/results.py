"""What a search gives back: hits, threads, and snippets with the matched words marked.

Snippets are cut and marked here, in Python, from the message's text: the same on both backends.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from emailops.search.query import And, Node, Not, Or, Text, TextField
from emailops.store.search_terms import fold, tokens

SNIPPET_CHARS = 200
_SNIPPET_LEAD = 60
_SCANNED_CHARS = 20_000  # where a body is longer, its snippet comes from this much of its start


@dataclass(frozen=True)
class Snippet:
    text: str
    marks: tuple[tuple[int, int], ...]  # [start, end) character offsets of matched words in text

    def marked(self, start: str = "[", end: str = "]") -> str:
        out, at = [], 0
        for begin, finish in self.marks:
            out += [self.text[at:begin], start, self.text[begin:finish], end]
            at = finish
        out.append(self.text[at:])
        return "".join(out)


@dataclass(frozen=True)
class Hit:
    message_pk: int
    folder: str
    uidvalidity: int
    uid: int
    message_id: str | None
    sender: str
    subject: str
    date: datetime | None
    thread_key: str
    snippet: Snippet


@dataclass(frozen=True)
class ThreadHit:
    thread_key: str
    messages: int  # messages of the thread that match
    newest: datetime | None
    subject: str  # of its newest matching message


# A word of text (a run of letters or digits: [^\W_]+) that holds a character beyond ASCII:
# such a word is folded before it is compared, which no pattern can do, so each is looked at.
_BEYOND_ASCII_WORD = r"(?<![^\W_])[^\W_]*(?:(?![\x00-\x7f])[^\W_])[^\W_]*"
_BEYOND_ASCII_LETTER = re.compile(r"[^\W\x00-\x7f]")  # case-sensitive: the long s is beyond ASCII here


@dataclass(frozen=True)
class _Wanted:
    words: frozenset[str]
    prefixes: tuple[str, ...]
    runs: tuple[str, ...]  # CJK runs, found inside longer runs

    def candidates(self, text: str) -> re.Pattern[str]:
        """The words of ``text`` that may be marked: every word beyond ASCII, and the ASCII words
        equal to a wanted word or starting with a wanted prefix, in any case. Each is a whole
        word (a run of letters or digits); ``_chunk_marks`` decides. Scanning by this pattern
        skips the other words in C (a body's 20,000 characters: most of a search's time), and
        a text whose words are all ASCII (its dashes or spaces may not be) is scanned for the
        wanted words alone (2-3x faster)."""
        alternatives = [_BEYOND_ASCII_WORD] if _BEYOND_ASCII_LETTER.search(text) else []
        if self.words:
            listed = "|".join(re.escape(word) for word in sorted(self.words))
            alternatives.append(rf"(?<![^\W_])(?:{listed})(?![^\W_])")
        if self.prefixes:
            listed = "|".join(re.escape(prefix) for prefix in sorted(self.prefixes))
            alternatives.append(rf"(?<![^\W_])(?:{listed})[^\W_]*")
        return re.compile("|".join(alternatives) or "(?!)", re.IGNORECASE)  # (?!): matches nothing


# A snippet is of the body: words of other fields (from:, subject:...) did not match there.
_BODY_FIELDS = frozenset({TextField.ANY, TextField.BODY})


def _wanted(node: Node) -> _Wanted:
    words: set[str] = set()
    prefixes: list[str] = []
    runs: list[str] = []

    def visit(leaf: Node) -> None:
        if isinstance(leaf, Text) and leaf.field in _BODY_FIELDS:
            found = tokens(leaf.value)
            for index, token in enumerate(found):
                if token.cjk:
                    runs.append(token.text)
                elif leaf.prefix and index == len(found) - 1:
                    prefixes.append(token.text)
                else:
                    words.add(token.text)
        for child in getattr(leaf, "children", ()):
            visit(child)

    visit(node)
    return _Wanted(frozenset(words), tuple(prefixes), tuple(runs))


def _chunk_marks(chunk: re.Match[str], wanted: _Wanted) -> list[tuple[int, int]]:
    text = chunk.group()
    if text.isascii():  # one word, folded by lower()
        word = text.lower()
        hit = word in wanted.words or word.startswith(wanted.prefixes)
        return [chunk.span()] if hit else []
    marks: list[tuple[int, int]] = []
    folded = fold(text)
    for token in tokens(text):
        if token.cjk:
            for run in wanted.runs:
                at = folded.find(run)
                if at >= 0 and len(folded) == len(text):
                    marks.append((chunk.start() + at, chunk.start() + at + len(run)))
                elif at >= 0:
                    marks.append(chunk.span())
        elif token.text in wanted.words or token.text.startswith(wanted.prefixes):
            marks.append(chunk.span())
    return marks


def _marks(text: str, wanted: _Wanted, *, first_only: bool = False) -> list[tuple[int, int]]:
    return _marks_of_words(wanted.candidates(text).finditer(text), wanted, first_only=first_only)


def _marks_of_words(
    words: Iterable[re.Match[str]], wanted: _Wanted, *, first_only: bool = False
) -> list[tuple[int, int]]:
    """The merged marks of ``words`` (whole words of one text, in order) that ``wanted`` marks."""
    marks: list[tuple[int, int]] = []
    for chunk in words:
        marks += _chunk_marks(chunk, wanted)
        if marks and first_only:
            break
    merged: list[tuple[int, int]] = []
    for begin, end in sorted(set(marks)):
        if merged and begin < merged[-1][1]:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((begin, end))
    return merged


def snippet(body: str, node: Node) -> Snippet:
    """About ``SNIPPET_CHARS`` of ``body`` around its first matched word, whitespace collapsed,
    with every word of the query that matches the body (free or ``body:``, not under NOT) marked."""
    wanted = _wanted(_positive(node))
    scanned = body[:_SCANNED_CHARS]
    found = _marks(scanned, wanted, first_only=True) if wanted.words or wanted.prefixes or wanted.runs else []
    start = 0
    if found:
        start = max(0, found[0][0] - _SNIPPET_LEAD)
        space = scanned.rfind(" ", 0, start)
        start = space + 1 if space >= 0 and start - space < 20 else start
    text = " ".join(scanned[start : start + SNIPPET_CHARS * 2].split())[:SNIPPET_CHARS]
    return Snippet(text, tuple(_marks(text, wanted)))


def _positive(node: Node) -> Node:
    """``node`` without what is under a NOT (those words are not in the matches)."""
    if isinstance(node, Not):
        return And(())
    if isinstance(node, And):
        return And(tuple(_positive(c) for c in node.children))
    if isinstance(node, Or):
        return Or(tuple(_positive(c) for c in node.children))
    return node
