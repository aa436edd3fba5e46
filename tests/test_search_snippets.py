"""Snippet marks: the scan that skips words no query word can mark finds exactly the marks of a
look at every word of the text (``[^\\W_]+``, each folded and compared), over generated text."""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from emailops.search import results
from emailops.search.query import parse

_EVERY_WORD = re.compile(r"[^\W_]+")
# Beyond ASCII: accents, CJK and Hangul, and letters whose case folds to ASCII (long s, Kelvin
# sign, dotted capital I, the fi ligature).
_LETTERS = "abcklmnsxyzKLS0123_ ,.-\n\tàéüßø\u0130\u017f\u212a\ufb01外贸客户开发한국"
_QUERY_WORDS = ["abc", "kl", "s", "zürich", "外贸", "客户开发", "x0", "\u017fa", "\u0130a", "ǆ"]


def _every_word_marks(text: str, wanted: results._Wanted, first_only: bool) -> list[tuple[int, int]]:
    """What the marks were before the scan: every word looked at."""
    return results._marks_of_words(_EVERY_WORD.finditer(text), wanted, first_only=first_only)


queries = st.lists(
    st.sampled_from(_QUERY_WORDS).map(lambda word: word + "*" if word.startswith("a") else word)
    | st.sampled_from(_QUERY_WORDS).map(lambda word: word + "*"),
    min_size=1,
    max_size=3,
).map(" OR ".join)


@settings(max_examples=400, deadline=None)
@given(
    text=st.text(alphabet=_LETTERS, max_size=120) | st.text(alphabet="abcksxyz KLS0_.", max_size=120),
    query=queries,
)
def test_the_scan_marks_what_a_look_at_every_word_marks(text: str, query: str) -> None:
    wanted = results._wanted(parse(query))
    for first_only in (False, True):
        assert results._marks(text, wanted, first_only=first_only) == _every_word_marks(
            text, wanted, first_only
        ), (text, query)


def test_marks_are_found_far_into_a_long_body() -> None:
    body = "filler " * 2_000 + "the Linux kernel, Zürich and 外贸客户"
    hit = results.snippet(body, parse("linux zurich 外贸"))
    assert [hit.text[a:b] for a, b in hit.marks] == ["Linux", "Zürich", "外贸"]
    assert results.snippet("no such word here", parse("linux")).marks == ()
