"""Text in a declared charset: charset labels, bytes to text, and RFC 2047 encoded words.

Used for header values, parameters and bodies alike. Decoding never fails: an unknown, refused or
wrong charset falls back (UTF-8, then Latin-1) and is recorded in ``problems``. No regular expression
here can backtrack more than once over its input.
"""

from __future__ import annotations

import binascii
import codecs
import encodings
import pkgutil
import re
from encodings.aliases import aliases as _CODEC_MODULE_BY_ALIAS
from functools import lru_cache

# Codecs that are slow by design on crafted input (quadratic IDNA / punycode decoding) or that are
# not charsets at all: treated as unknown.
_REFUSED_CODECS = frozenset({"idna", "punycode", "unicode_escape", "raw_unicode_escape", "unicode_internal"})
# Labels that real mail uses for a superset, as browsers do (WHATWG encoding standard).
_CHARSET_ALIASES = {
    "gb2312": "gb18030",
    "gbk": "gb18030",
    "x-gbk": "gb18030",
    "ks_c_5601-1987": "cp949",
    "euc-kr": "cp949",
    "iso-8859-8-i": "iso-8859-8",
    "windows-874": "cp874",
    "x-sjis": "cp932",
    "shift_jis": "cp932",
    "x-mac-roman": "mac_roman",
    "ascii": "utf-8",
    "us-ascii": "utf-8",
    "ansi_x3.4-1968": "utf-8",
    "unicode-1-1-utf-7": "utf-7",
    "utf8": "utf-8",
}

_CHARSET_LABEL_RE = re.compile(r"[^a-z0-9._:+-]")

# The codec modules of the standard library. The codec registry keeps every name it is asked for,
# found or not, for the life of the process (``encodings._cache``, the interpreter's search
# cache): asked for each label as written, a worker kept about 140 bytes for every distinct unknown
# label mail ever declared. So it is asked only for these names, at most one entry per codec.
_CODEC_MODULES = frozenset(module.name for module in pkgutil.iter_modules(encodings.__path__))


def _codec_module(name: str) -> str | None:
    """The codec module the registry would load for ``name`` (as ``encodings.search_function``
    resolves it), or ``None`` if there is none."""
    normalized = encodings.normalize_encoding(name)
    aliased = _CODEC_MODULE_BY_ALIAS.get(normalized) or _CODEC_MODULE_BY_ALIAS.get(
        normalized.replace(".", "_")
    )
    return next((module for module in (aliased, normalized) if module in _CODEC_MODULES), None)


def problem_label(text: str, limit: int = 40) -> str:
    """A short, machine-friendly label for a value that goes into a problem string."""
    return _CHARSET_LABEL_RE.sub("_", text.strip().lower())[:limit] or "empty"


@lru_cache(maxsize=256)
def lookup_charset(label: str) -> str | None:
    """The Python codec name for a MIME charset label, or ``None`` if unknown or refused."""
    name = label.strip().strip("\"'").lower()
    if "*" in name:  # RFC 2231 language suffix: utf-8*en
        name = name.split("*", 1)[0]
    name = _CHARSET_ALIASES.get(name, name)
    module = _codec_module(name) if name and len(name) <= 64 else None
    if module is None:
        return None
    try:
        info = codecs.lookup(module)
    except (LookupError, ValueError):  # a module of another platform's codec (mbcs)
        return None
    if info.name in _REFUSED_CODECS or not getattr(info, "_is_text_encoding", True):
        return None
    return info.name


# UTF-16 and UTF-32 read the byte order from a byte-order mark. Their incremental decoders refuse
# text without one (``UnicodeError``, not ``UnicodeDecodeError``); ``bytes.decode`` takes it in the
# machine's byte order, which is what such mail (little-endian, from Windows) needs. These are the
# functions ``bytes.decode`` calls: (data, errors, byte order 0 = by BOM or native, final).
_BYTE_ORDER_SNIFFING = {"utf-16": codecs.utf_16_ex_decode, "utf-32": codecs.utf_32_ex_decode}


def decode_bytes(data: bytes, charset: str | None, problems: list[str], *, final: bool = True) -> str:
    """Decode bytes declared in ``charset``; unknown or wrong charsets fall back and are recorded.

    Fallback order: UTF-8 (strict), then Latin-1 (which maps every byte). With ``final=False`` the data
    is a prefix, so an incomplete multi-byte sequence at its end is dropped instead of being an error.
    """
    codec = None
    if charset:
        codec = lookup_charset(charset)
        if codec is None:
            problems.append("charset-unknown:" + problem_label(charset))
    if codec is None:
        codec = "utf-8"
    if codec == "utf-8" and data.isascii():
        return data.decode("ascii")
    try:
        if codec in _BYTE_ORDER_SNIFFING:
            return _BYTE_ORDER_SNIFFING[codec](data, "strict", 0, final)[0]
        return codecs.getincrementaldecoder(codec)("strict").decode(data, final)
    except UnicodeDecodeError:
        pass
    except Exception:  # a third-party or exotic codec failing in its own way
        problems.append("charset-broken:" + problem_label(codec))
    if codec != "utf-8":
        try:
            text = codecs.getincrementaldecoder("utf-8")("strict").decode(data, final)
        except UnicodeDecodeError:
            pass
        else:
            if charset:
                problems.append("charset-mismatch:" + problem_label(charset))
            return text
    if charset:
        problems.append("charset-mismatch:" + problem_label(charset))
    return data.decode("latin-1")


# --- RFC 2047 encoded words -------------------------------------------------------------------------

# Lenient: the encoded text may hold spaces (broken mailers), the charset may carry an RFC 2231
# language. Each alternative consumes up to a '?' that cannot be part of it, so matching is linear.
ENCODED_WORD_RE = re.compile(r"=\?([^?\s]{1,64})\?([bBqQ])\?([^?]*)\?=")
_BETWEEN_WORDS_RE = re.compile(r"[ \t\r\n]*")


def _decode_word_payload(encoding: str, payload: str, problems: list[str]) -> bytes:
    data = payload.encode("ascii", "ignore")
    if encoding in "bB":
        data = data.translate(None, b" \t\r\n")
        try:
            return binascii.a2b_base64(data + b"=" * (-len(data) % 4))
        except binascii.Error:
            problems.append("encoded-word-broken")
            usable = len(data) - len(data) % 4
            try:
                return binascii.a2b_base64(data[:usable].rstrip(b"="))
            except binascii.Error:
                return b""
    return binascii.a2b_qp(data, header=True)


def decode_encoded_words(text: str, problems: list[str]) -> str:
    """Decode RFC 2047 encoded words, also where real mail breaks the rules.

    Adjacent encoded words separated by whitespace only are joined without it, and their bytes are
    concatenated before decoding when they share a charset (a multi-byte character split across two
    words decodes correctly). Words glued to text or inside quotes are decoded as well.
    """
    if "=?" not in text:
        return text
    pieces: list[str] = []
    pending_charset: str | None = None
    pending: list[bytes] = []
    position = 0

    def flush() -> None:
        nonlocal pending_charset
        if pending:
            pieces.append(decode_bytes(b"".join(pending), pending_charset, problems))
            pending.clear()
        pending_charset = None

    for match in ENCODED_WORD_RE.finditer(text):
        between = text[position : match.start()]
        if between and (not pending or _BETWEEN_WORDS_RE.fullmatch(between) is None):
            flush()
            pieces.append(between)
        charset = match.group(1).lower()
        if pending and charset != pending_charset:
            flush()
        pending_charset = charset
        pending.append(_decode_word_payload(match.group(2), match.group(3), problems))
        position = match.end()
    flush()
    pieces.append(text[position:])
    return "".join(pieces)
