"""Header parameters: the ``; name=value`` list of ``Content-Type`` and ``Content-Disposition``.

Linear in the value: no regular expression here can backtrack more than once over its input.
"""

from __future__ import annotations

import re

from emailops.mime.charsets import decode_bytes, decode_encoded_words

_PARAM_RE = re.compile(r';\s*([^\s=;"]+)\s*=\s*("(?:[^"\\]|\\.)*"?|[^;]*)')
_QUOTED_PAIR_RE = re.compile(r"\\(.)")
_PERCENT_RE = re.compile(rb"%([0-9A-Fa-f]{2})")

# One RFC 2231 section of a parameter: its number, whether it is percent-encoded, its text.
_Section = tuple[int, bool, str]


def parse_params(text: str, problems: list[str]) -> tuple[str, dict[str, str]]:
    """``type/subtype; a=b; c*=utf-8''x%20y`` to the lower-cased main value and decoded parameters.

    Parameter names are lower-cased. RFC 2231 continuations (``name*0*``, ``name*1``) are joined and
    percent-decoded in their declared charset; RFC 2047 words in values (real-world filenames) decoded.
    """
    head, _, rest = text.partition(";")
    main = head.strip().lower()
    if not rest:
        return main, {}
    params, extended = _split_params(rest)
    for base, sections in extended.items():
        params[base] = _join_sections(sections, problems)
    for key, value in params.items():
        if "=?" in value:
            params[key] = decode_encoded_words(value, problems)
    return main, params


def _split_params(rest: str) -> tuple[dict[str, str], dict[str, list[_Section]]]:
    """Plain parameters (the first of a name wins) and the RFC 2231 sections of the others."""
    params: dict[str, str] = {}
    extended: dict[str, list[_Section]] = {}
    for match in _PARAM_RE.finditer(";" + rest):
        key = match.group(1).lower()
        value = _unquote(match.group(2).strip())
        if "*" in key:
            base, _, section = key.partition("*")
            encoded = section.endswith("*") or section == ""
            number = section.rstrip("*")
            index = int(number) if number.isdigit() and len(number) < 4 else 0
            extended.setdefault(base, []).append((index, encoded, value))
        elif key not in params:
            params[key] = value
    return params, extended


def _unquote(value: str) -> str:
    """A quoted string's content (also when its closing quote is missing); anything else as it is."""
    if not value.startswith('"'):
        return value
    value = value[1:-1] if value.endswith('"') and len(value) > 1 else value[1:]
    return _QUOTED_PAIR_RE.sub(r"\1", value) if "\\" in value else value


def _join_sections(sections: list[_Section], problems: list[str]) -> str:
    """One parameter's sections in order, decoded in the charset that its first section declares."""
    sections.sort(key=lambda item: item[0])
    charset: str | None = None
    chunks: list[bytes] = []
    for position, (_, encoded, value) in enumerate(sections):
        if encoded and position == 0 and value.count("'") >= 2:
            charset, _, value = value.split("'", 2)
        if encoded:
            chunks.append(_percent_decode(value))
        else:
            chunks.append(value.encode("utf-8", "surrogateescape"))
    return decode_bytes(b"".join(chunks), charset or None, problems)


def _percent_decode(value: str) -> bytes:
    data = value.encode("utf-8", "surrogateescape")
    if b"%" not in data:
        return data
    return _PERCENT_RE.sub(lambda m: bytes([int(m.group(1), 16)]), data)
