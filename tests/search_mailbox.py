"""A generated mailbox for the search tests, stored through the real indexing path, and a
brute-force filter over its parsed messages written from the README's matching rules, without the
search's own term machinery (no terms, no pairs, no SQL)."""

from __future__ import annotations

import random
import re
import unicodedata
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from email.utils import format_datetime
from zoneinfo import ZoneInfo

from dateutil.relativedelta import relativedelta
from sqlalchemy import Engine, update

from emailops.mime.model import Address, ParsedMessage
from emailops.mime.parse import parse_message
from emailops.search import query as q
from emailops.store import folders as folder_store
from emailops.store import messages as message_store
from emailops.store.content import message_content
from emailops.store.schema import messages, outbox

ACCOUNT = "alice@example.test@imap.example.test"
USERNAME = "alice@example.test"
NOW = datetime(2026, 12, 7, 9, 0, tzinfo=UTC)
TIMEZONE = ZoneInfo("Europe/Berlin")

WORDS = [
    "invoice",
    "Invoice",
    "INVOICES",
    "report",
    "quarterly",
    "meeting",
    "crème",
    "Creme",
    "brûlée",
    "naïve",
    "zürich",
    "Zurich",
    "straße",
    "strasse",
    "plan",
    "planning",
    "planet",
    "déjà",
    "vu",
    "résumé",
    "resume",
    "ΑΘΗΝΑ",
    "αθηνα",
    "привет",
    "Привет",
    "x1",
    "42",
    "2026",
    "q",
    "quiz",
    "WhatsApp",
    "外贸客户开发",
    "势在必行",
    "日本語",
    "テスト",
    "한국어",
    "外贸",
    "café",
    "cafe",
]
PEOPLE = [
    Address("Alice Liddell", "alice@example.test"),
    Address("Bob Builder", "bob@builders.example.org"),
    Address("Crème Brûlée", "creme@pâtisserie.example"),
    Address("", "noreply@news.example.com"),
    Address("王 小明", "wang@example.cn"),
    Address("Dave O'Brien", "dave.obrien@mail.example.org"),
    Address("Eve", "eve@example.test"),
]
FILES = [
    ("invoice-2026.pdf", "application/pdf"),
    ("Report Q3.xlsx", "application/vnd.ms-excel"),
    ("photo.JPG", "image/jpeg"),
    ("外贸清单.txt", "text/plain"),
    ("résumé.docx", "application/msword"),
]
FLAGS = ["\\Seen", "\\Flagged", "\\Answered", "\\Draft", "\\Deleted"]
FOLDERS = ["INBOX", "Archive"]


@dataclass(frozen=True)
class Stored:
    folder: str
    uidvalidity: int
    uid: int
    parsed: ParsedMessage
    flags: tuple[str, ...]
    internal_date: datetime
    quarantined: bool
    replied: bool

    @property
    def key(self) -> tuple[str, int, int]:
        return (self.folder, self.uidvalidity, self.uid)


def _text(rng: random.Random, count: int) -> str:
    chosen = [rng.choice(WORDS) for _ in range(count)]
    glue = [rng.choice([" ", " ", " ", ", ", "-", "", "\n", ". "]) for _ in chosen]
    return "".join(w + g for w, g in zip(chosen, glue, strict=True)).strip()


def _address(a: Address) -> str:
    return f'"{a.name}" <{a.email}>' if a.name else a.email


def _raw(rng: random.Random, n: int, parent: str | None) -> bytes:
    sender = rng.choice(PEOPLE)
    to = rng.sample(PEOPLE, rng.randint(1, 2))
    cc = rng.sample(PEOPLE, rng.randint(0, 2))
    moment = datetime(2026, 1, 1, tzinfo=UTC) + timedelta(minutes=rng.randrange(0, 340 * 24 * 60))
    offset = ZoneInfo(rng.choice(["UTC", "Europe/Berlin", "America/New_York", "Asia/Tokyo"]))
    headers = [
        f"From: {_address(sender)}",
        "To: " + ", ".join(_address(a) for a in to),
        *(["Cc: " + ", ".join(_address(a) for a in cc)] if cc else []),
        # A newline in the subject breaks the header block of a few messages: they then have no
        # Message-ID and no Date (NULL in the index), which the queries must handle too.
        f"Subject: {_text(rng, rng.randint(1, 4))}",
        f"Message-ID: <m{n}@gen.example>",
        f"Date: {format_datetime(moment.astimezone(offset))}",
        *([f"In-Reply-To: {parent}", f"References: {parent}"] if parent else []),
        "MIME-Version: 1.0",
    ]
    body = _text(rng, rng.randint(0, 40)) + "\n" + "padding " * rng.choice([0, 0, 50, 3000])
    files = rng.sample(FILES, rng.choice([0, 0, 0, 1, 2]))
    if not files:
        lines = [
            *headers,
            "Content-Type: text/plain; charset=utf-8",
            "Content-Transfer-Encoding: 8bit",
            "",
            body,
        ]
        return "\r\n".join(lines).encode()
    parts = ["Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n" + body]
    for name, content_type in files:
        parts.append(
            f"Content-Type: {content_type}\r\nContent-Disposition: attachment; filename*=utf-8''"
            + "".join(
                c if c.isascii() and c.isalnum() else "%" + "%".join(f"{b:02X}" for b in c.encode())
                for c in name
            )
            + "\r\nContent-Transfer-Encoding: base64\r\n\r\naGVsbG8=\r\n"
        )
    multipart = "".join(f"--b\r\n{p}\r\n" for p in parts) + "--b--\r\n"
    return ("\r\n".join([*headers, 'Content-Type: multipart/mixed; boundary="b"', "", multipart])).encode()


def build_mailbox(seed: int, size: int = 60) -> list[Stored]:
    rng = random.Random(seed)
    mailbox: list[Stored] = []
    for n in range(1, size + 1):
        parent = f"<m{rng.randint(1, n - 1)}@gen.example>" if n > 1 and rng.random() < 0.4 else None
        parsed = parse_message(_raw(rng, n, parent))
        mailbox.append(
            Stored(
                folder=rng.choice(FOLDERS),
                uidvalidity=7,
                uid=n,
                parsed=parsed,
                flags=tuple(f for f in FLAGS if rng.random() < 0.3),
                internal_date=datetime(2026, 1, 1, tzinfo=UTC) + timedelta(hours=n),
                quarantined=rng.random() < 0.1,
                replied=rng.random() < 0.15,
            )
        )
    return mailbox


def store(engine: Engine, mailbox: list[Stored]) -> None:
    with engine.begin() as conn:
        for name in FOLDERS:
            folder = folder_store.ensure_folder(conn, ACCOUNT, name)
            batch = [
                message_store.FetchedMessage(s.uid, s.flags, s.internal_date, None, message_content(s.parsed))
                for s in mailbox
                if s.folder == name
            ]
            pks = message_store.insert_messages(conn, folder.id, 7, batch, baseline_uidnext=None, now=NOW)
            for s in mailbox:
                if s.folder != name:
                    continue
                if s.quarantined:
                    conn.execute(
                        update(messages).where(messages.c.id == pks[s.uid]).values(rules_state="quarantined")
                    )
                conn.execute(
                    outbox.insert().values(
                        account=ACCOUNT,
                        inbound_key=f"{name}/{s.uid}",
                        message_pk=pks[s.uid],
                        rule_name="r",
                        state="sent" if s.replied else "failed",
                        recipient="x@example.org",
                        reply_message_id=f"<r{s.uid}@x>",
                        raw=b"",
                        created_at=NOW,
                        updated_at=NOW,
                    )
                )
        # Another account's message never shows, nor an expunged one (copies of the first two).
        other = folder_store.ensure_folder(conn, "someone@else", "INBOX")
        message_store.insert_messages(
            conn,
            other.id,
            7,
            [message_store.FetchedMessage(1, (), NOW, None, message_content(mailbox[0].parsed))],
            baseline_uidnext=None,
            now=NOW,
        )
        inbox = folder_store.ensure_folder(conn, ACCOUNT, FOLDERS[0])
        gone = max(s.uid for s in mailbox) + 1
        message_store.insert_messages(
            conn,
            inbox.id,
            7,
            [message_store.FetchedMessage(gone, (), NOW, None, message_content(mailbox[1].parsed))],
            baseline_uidnext=None,
            now=NOW,
        )
        message_store.mark_expunged(conn, inbox.id, 7, [gone], NOW)


# -- the brute-force filter ------------------------------------------------------------------

_CJK = (
    "\u3040-\u30ff\u31f0-\u31ff"  # kana
    "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f"  # Han
    "\u1100-\u11ff\u3130-\u318f\uac00-\ud7af"  # Hangul
)
_PIECE = re.compile(f"([{_CJK}]+)|([^\\W_{_CJK}]+)")


def _fold(text: str) -> str:
    out = unicodedata.normalize("NFKD", text.casefold())
    return unicodedata.normalize("NFC", "".join(c for c in out if unicodedata.category(c) != "Mn"))


def _pieces(text: str) -> list[tuple[str, bool]]:
    return [(cjk or word[:64], bool(cjk)) for cjk, word in _PIECE.findall(_fold(text))]


def _phrase_in(wanted: list[tuple[str, bool]], prefix: bool, text: str) -> bool:
    """The query's words at consecutive places of ``text``: a CJK run of the query may end
    inside the text's run where it is first, start inside it where it is last, and lie anywhere
    inside it where it is alone."""
    have = _pieces(text)
    n = len(wanted)
    for i in range(len(have) - n + 1):
        ok = True
        for j, (word, cjk) in enumerate(wanted):
            got, got_cjk = have[i + j]
            first, last = j == 0, j == n - 1
            if cjk != got_cjk:
                ok = False
            elif cjk:
                if n == 1:
                    ok = word in got
                elif first:
                    ok = got.endswith(word)
                elif last:
                    ok = got.startswith(word)
                else:
                    ok = got == word
            else:
                ok = got.startswith(word) if (last and prefix) else got == word
            if not ok:
                break
        if ok:
            return True
    return False


def _addresses(s: Stored, field: q.TextField) -> tuple[Address, ...]:
    p = s.parsed
    return {
        q.TextField.FROM: p.from_,
        q.TextField.TO: p.to,
        q.TextField.CC: p.cc,
        q.TextField.RECIPIENT: (*p.to, *p.cc),
    }[field]


def _text_matches(leaf: q.Text, s: Stored) -> bool:
    wanted = _pieces(leaf.value)
    p = s.parsed

    def phrase(text: str) -> bool:
        return bool(wanted) and _phrase_in(wanted, leaf.prefix, text)

    if leaf.field is q.TextField.ANY:
        every = (*p.from_, *p.to, *p.cc, *p.reply_to)
        return phrase(p.subject) or phrase(p.body_text) or any(phrase(f"{a.name} {a.email}") for a in every)
    if leaf.field is q.TextField.SUBJECT:
        return phrase(p.subject)
    if leaf.field is q.TextField.BODY:
        return phrase(p.body_text)
    if leaf.field is q.TextField.ATTACHMENT:
        return any(phrase(a.filename or "") for a in p.attachments)
    whole = _fold(leaf.value.strip())
    for a in _addresses(s, leaf.field):
        local, _, domain = a.email.rpartition("@")
        parts = [_fold(x) for x in (a.email, local, domain) if x]
        if any(x.startswith(whole) if leaf.prefix else x == whole for x in parts) or phrase(a.name):
            return True
    return False


def _moment(point: q.DatePoint) -> datetime:
    if isinstance(point, date):
        return datetime(point.year, point.month, point.day, tzinfo=TIMEZONE)
    local = NOW.astimezone(TIMEZONE)
    step = {
        q.AgeUnit.HOURS: relativedelta(hours=point.amount),
        q.AgeUnit.DAYS: relativedelta(days=point.amount),
        q.AgeUnit.WEEKS: relativedelta(weeks=point.amount),
        q.AgeUnit.MONTHS: relativedelta(months=point.amount),
        q.AgeUnit.YEARS: relativedelta(years=point.amount),
    }[point.unit]
    return local - step


_FLAG_NAMES = {
    q.Flag.READ: "\\seen",
    q.Flag.FLAGGED: "\\flagged",
    q.Flag.ANSWERED: "\\answered",
    q.Flag.DRAFT: "\\draft",
    q.Flag.DELETED: "\\deleted",
}


def matches(node: q.Node, s: Stored, mailbox: list[Stored]) -> bool:
    p = s.parsed
    if isinstance(node, q.And):
        return all(matches(c, s, mailbox) for c in node.children)
    if isinstance(node, q.Or):
        return any(matches(c, s, mailbox) for c in node.children)
    if isinstance(node, q.Not):
        return not matches(node.child, s, mailbox)
    if isinstance(node, q.Text):
        return _text_matches(node, s)
    if isinstance(node, q.MessageId):
        return p.message_id == node.value
    if isinstance(node, q.Thread):
        if node.query is None:
            return p.thread_key == node.key
        inner = node.query
        return any(o.parsed.thread_key == p.thread_key and matches(inner, o, mailbox) for o in mailbox)
    if isinstance(node, q.Folder):
        return s.folder == node.name
    if isinstance(node, q.Account):
        return node.name.lower() in (USERNAME, ACCOUNT)
    if isinstance(node, q.MimeType):
        return any(
            a.content_type.lower() == node.value or a.content_type.lower().startswith(node.value + "/")
            for a in p.attachments
        )
    if isinstance(node, q.HasAttachment):
        return bool(p.attachments)
    if isinstance(node, q.Is):
        flags = {f.lower() for f in s.flags}
        if node.flag is q.Flag.UNREAD:
            return "\\seen" not in flags
        if node.flag is q.Flag.REPLIED:
            return s.replied
        if node.flag is q.Flag.QUARANTINED:
            return s.quarantined
        return _FLAG_NAMES[node.flag] in flags
    if isinstance(node, q.DateRange):
        when = p.date or s.internal_date
        return (node.start is None or when >= _moment(node.start)) and (
            node.end is None or when < _moment(node.end)
        )
    if isinstance(node, q.Size):
        if node.larger_than is not None:
            return p.size > node.larger_than
        return p.size < (node.smaller_than or 0)
    raise AssertionError(node)


def expected(node: q.Node, mailbox: list[Stored]) -> set[tuple[str, int, int]]:
    return {s.key for s in mailbox if matches(node, s, mailbox)}
