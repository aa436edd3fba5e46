"""Header parameters: the ``; name=value`` list of ``Content-Type`` and ``Content-Disposition``.

Linear in the value: no regular expression here can backtrack more than once over its input.
"""

from __future__ import annotations

import re

from emailops.mime.charsets import decode_bytes, decode_encoded_words

_PARAM_RE = re.compile(r';\s*([^\s=;"]+)\s*=\s*("(?:[^"\\]|\\.)*"?|[^;]*)')


def parse_params(text: str, problems: list[str]) -> tuple[str, dict[str, str]]:
    """``type/subtype; a=b; c*=utf-8''x%20y`` to the lower-cased main value and decoded parameters.

    Parameter names are lower-cased. RFC 2231 continuations (``name*0*``, ``name*1``) are joined and
    percent-decoded in their declared charset; RFC 2047 words in values (real-world filenames) decoded.
    """
    head, _, rest = text.partition(";")
    main = head.strip().lower()
    params: dict[str, str] = {}
    if not rest:
        return main, params
    extended: dict[str, list[tuple[int, bool, str]]] = {}
    for match in _PARAM_RE.finditer(";" + rest):
        key = match.group(1).lower()
        value = match.group(2).strip()
        if value.startswith('"'):
            value = value[1:-1] if value.endswith('"') and len(value) > 1 else value[1:]
            if "\\" in value:
                value = re.sub(r"\\(.)", r"\1", value)
        if "*" in key:
            base, _, section = key.partition("*")
            encoded = section.endswith("*") or section == ""
            number = section.rstrip("*")
            index = int(number) if number.isdigit() and len(number) < 4 else 0
            extended.setdefault(base, []).append((index, encoded, value))
        elif key not in params:
            params[key] = value
    for base, sections in extended.items():
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
        params[base] = decode_bytes(b"".join(chunks), charset or None, problems)
    for key, value in params.items():
        if "=?" in value:
            params[key] = decode_encoded_words(value, problems)
    return main, params


_PERCENT_RE = re.compile(r"%([0-9A-Fa-f]{2})")


def _percent_decode(value: str) -> bytes:
    data = value.encode("utf-8", "surrogateescape")
    if b"%" not in data:
        return data
    return re.sub(rb"%([0-9A-Fa-f]{2})", lambda m: bytes([int(m.group(1), 16)]), data)
