"""Text leaves of a query as terms (``terms.py``), in a form both compilers render: FTS5 query
text on SQLite, a tsquery on PostgreSQL. Every term is ``[a-z0-9]`` only, so no value a user
types can become FTS5 or tsquery syntax."""

from __future__ import annotations

from dataclasses import dataclass

from emailops.search.query import And, Node, Not, Or, Text, TextField
from emailops.store.search_terms import (
    FREE_TEXT_TAGS,
    MAX_VALUE_CHARS,
    Tag,
    cjk_terms,
    encode,
    fold,
    tokens,
)


@dataclass(frozen=True)
class Phrase:
    """Terms at consecutive positions (one term: a word); ``prefix``: the last one is a prefix."""

    terms: tuple[str, ...]
    prefix: bool


@dataclass(frozen=True)
class AnyOf:
    phrases: tuple[Phrase, ...]


@dataclass(frozen=True)
class AllOf:
    """Every one of ``required``, none of ``excluded`` (at least one required: FTS5 needs it)."""

    required: tuple[TextExpr, ...]
    excluded: tuple[TextExpr, ...]


TextExpr = AnyOf | AllOf

_NAME_TAGS = {
    TextField.FROM: ((Tag.FROM_NAME, Tag.FROM_ADDRESS),),
    TextField.TO: ((Tag.TO_NAME, Tag.TO_ADDRESS),),
    TextField.CC: ((Tag.CC_NAME, Tag.CC_ADDRESS),),
    TextField.RECIPIENT: ((Tag.TO_NAME, Tag.TO_ADDRESS), (Tag.CC_NAME, Tag.CC_ADDRESS)),
}
_WORD_TAGS = {
    TextField.ANY: FREE_TEXT_TAGS,
    TextField.SUBJECT: (Tag.SUBJECT,),
    TextField.BODY: (Tag.BODY,),
    TextField.ATTACHMENT: (Tag.ATTACHMENT,),
}


def _word_terms(value: str, prefix: bool) -> tuple[list[str], bool]:
    """The unencoded terms a phrase of ``value`` asks for at consecutive positions, and whether
    the last is a prefix. A CJK run is its pairs, plus its last character where something follows
    it (the run ends there); a lone CJK character at the end is a prefix of the pair it starts."""
    found = tokens(value)
    terms: list[str] = []
    for index, token in enumerate(found):
        last = index == len(found) - 1
        if not token.cjk:
            terms.append(token.text)
        elif last and len(token.text) == 1:
            terms.append(token.text)
            prefix = True
        else:
            terms.extend(cjk_terms(token.text, ends_run=not last))
    return terms, prefix


def _phrase(tag: Tag, terms: list[str], prefix: bool) -> Phrase:
    return Phrase(tuple(tag + encode(t) for t in terms), prefix)


def text_leaf(leaf: Text) -> AnyOf:
    """What one ``Text`` leaf matches: its phrase in any of the field's tags."""
    terms, prefix = _word_terms(leaf.value, leaf.prefix)
    if leaf.field in _WORD_TAGS:
        return AnyOf(tuple(_phrase(tag, terms, prefix) for tag in _WORD_TAGS[leaf.field]))
    whole = fold(leaf.value.strip())[:MAX_VALUE_CHARS]
    phrases: list[Phrase] = []
    for name_tag, address_tag in _NAME_TAGS[leaf.field]:
        phrases.append(Phrase((address_tag + encode(whole),), leaf.prefix))
        if terms:
            phrases.append(_phrase(name_tag, terms, prefix))
    return AnyOf(tuple(phrases))


def text_expr(node: Node) -> TextExpr | None:
    """``node`` as one text expression, or None when it is not text alone or cannot be one
    (a NOT without a positive term beside it, an OR with a NOT in it)."""
    if isinstance(node, Text):
        return text_leaf(node)
    if isinstance(node, Or):
        parts = [text_expr(child) for child in node.children]
        if any(p is None for p in parts):
            return None
        phrases: list[Phrase] = []
        others: list[TextExpr] = []
        for part in parts:
            if isinstance(part, AnyOf):
                phrases.extend(part.phrases)
            elif part is not None:
                others.append(part)
        if others:
            return None  # an OR of ANDs: the SQL combines them (FTS5 and tsquery could, kept simple)
        return AnyOf(tuple(phrases))
    if isinstance(node, And):
        required: list[TextExpr] = []
        excluded: list[TextExpr] = []
        for child in node.children:
            target = excluded if isinstance(child, Not) else required
            part = text_expr(child.child if isinstance(child, Not) else child)
            if part is None:
                return None
            target.append(part)
        return AllOf(tuple(required), tuple(excluded)) if required else None
    return None


def positive_text(node: Node) -> list[AnyOf]:
    """The text leaves not under a NOT: what relevance ranks on."""
    if isinstance(node, Text):
        return [text_leaf(node)]
    if isinstance(node, (And, Or)):
        return [leaf for child in node.children for leaf in positive_text(child)]
    return []
