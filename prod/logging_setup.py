"""One logging pipeline for structlog and stdlib records: compact JSON lines, secrets masked.

Every line is one JSON object with the keys ``ts`` (ISO 8601 UTC), ``level`` (upper case),
``logger``, ``message``, ``pid``, ``thread``, then context (``component``, ``worker``, ``folder``,
``uid``, ``request_id``, ...), rendered without spaces so that ``grep '"level":"ERROR"'`` works.

Where lines go depends on the process role:
- ``supervisor``: a ``LogCollector`` owns stdout and, with ``LOG_FILE_ENABLED``, the daily rotated
  ``LOG_FILE_PATH``. It is the only writer of both: workers render their lines and ship them over a
  pipe to it, so no two processes rotate the same file and long lines never interleave on stdout.
  Each worker has its own pipe, so a worker killed mid-write corrupts nothing but its own channel.
- ``worker``: lines go to the channel given as ``queue`` (stdout if none, e.g. run by hand).
- ``cli``: lines go to stderr only; stdout belongs to the command's output.
"""

from __future__ import annotations

import contextlib
import logging
import logging.handlers
import multiprocessing
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import structlog
from structlog.typing import EventDict

from prod.redaction import REDACTOR
from prod.smtplib_debug import route_smtplib_debug_to_logging

if TYPE_CHECKING:
    from prod.runtime_settings import RuntimeSettings

PROCESS_ROLES = ("supervisor", "worker", "console", "cli")
KEY_ORDER = ("ts", "level", "logger", "message", "pid", "thread", "component", "worker")
LOG_FILE_BACKUPS = 7

# Loggers that are chatty at INFO (SQLAlchemy logs every statement once INFO is enabled for it):
# below DEBUG they are held at WARNING; at LOG_LEVEL=DEBUG everything is let through.
_CHATTY_LIBRARY_LOGGERS = ("sqlalchemy", "urllib3", "imapclient", "asyncio")

_COMPONENT_BY_LOGGER_PREFIX = (
    ("imapclient", "imap"),
    ("imaplib", "imap"),
    ("smtplib", "smtp"),
    ("aiosmtpd", "smtp"),
    ("sqlalchemy", "index"),
    ("alembic", "index"),
    ("sentry_sdk", "sentry"),
    ("urllib3", "http"),
    ("py.warnings", "python"),
)

# Context of this process (worker id, default component), added to every record.
_process_context: dict[str, Any] = {}


class _Event(dict[str, Any]):
    """structlog's event dict as a stdlib record's ``msg``.

    Handlers outside the pipeline (Sentry's logging integration) see ``str(record.msg)``: the
    message, not the repr of the whole dict.
    """

    def __str__(self) -> str:
        return str(self.get("event", ""))


def _resolve_exc_info(value: Any) -> Any:
    if value is True:
        info = sys.exc_info()
        return info if info[0] is not None else None
    if isinstance(value, BaseException):
        return (type(value), value, value.__traceback__)
    if isinstance(value, tuple):
        return value
    return None


def _wrap_for_formatter(logger: Any, name: str, event_dict: EventDict) -> Any:
    # The exception goes on the stdlib record too, where Sentry's logging integration finds it.
    kwargs: dict[str, Any] = {"extra": {"_logger": logger, "_name": name}}
    exc_info = _resolve_exc_info(event_dict.pop("exc_info", None))
    if exc_info:
        kwargs["exc_info"] = exc_info
        # Resolved now: rendering may happen after the ``except`` block has been left.
        event_dict["exc_info"] = exc_info
    return (_Event(event_dict),), kwargs


def _component_for(logger_name: str) -> str | None:
    for prefix, component in _COMPONENT_BY_LOGGER_PREFIX:
        if logger_name == prefix or logger_name.startswith(prefix + "."):
            return component
    parts = logger_name.split(".")
    if parts[0] in ("emailops", "prod") and len(parts) > 1:
        return parts[1]
    return None


def _add_record_fields(_: Any, __: str, event_dict: EventDict) -> EventDict:
    record: logging.LogRecord = event_dict["_record"]
    event_dict["ts"] = (
        datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    )
    event_dict["level"] = record.levelname.upper()
    event_dict["logger"] = record.name
    event_dict["pid"] = record.process
    event_dict["thread"] = record.threadName
    component = _component_for(record.name) or _process_context.get("component")
    if component:
        event_dict.setdefault("component", component)
    if _process_context.get("worker") is not None:
        event_dict.setdefault("worker", _process_context["worker"])
    return event_dict


def _event_to_message(_: Any, __: str, event_dict: EventDict) -> EventDict:
    event_dict["message"] = str(event_dict.pop("event", ""))
    return event_dict


def _redact(_: Any, __: str, event_dict: EventDict) -> EventDict:
    return REDACTOR.redact_dict(event_dict)


def _order_keys(_: Any, __: str, event_dict: EventDict) -> EventDict:
    ordered = {key: event_dict.pop(key) for key in KEY_ORDER if key in event_dict}
    ordered.update(event_dict)
    return ordered


class JsonLineFormatter(structlog.stdlib.ProcessorFormatter):
    """Renders any record (structlog or stdlib) as one redacted compact JSON line."""

    def __init__(self) -> None:
        super().__init__(
            foreign_pre_chain=[structlog.contextvars.merge_contextvars],
            processors=[
                _add_record_fields,
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                _event_to_message,
                _redact,
                _order_keys,
                structlog.processors.JSONRenderer(separators=(",", ":")),
            ],
        )

    def format(self, record: logging.LogRecord) -> str:
        # Last line of defence: registered secret values, in whatever escaping the renderer used.
        return REDACTOR.redact_known_values(super().format(record))


class _StreamSink:
    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, line: str) -> None:
        with contextlib.suppress(ValueError, OSError):
            self._stream.write(line + "\n")
            self._stream.flush()

    def close(self) -> None:
        with contextlib.suppress(ValueError, OSError):
            self._stream.flush()


class _RotatingFileSink:
    """``LOG_FILE_PATH`` rotated at UTC midnight, ``LOG_FILE_BACKUPS`` days kept."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.handler = logging.handlers.TimedRotatingFileHandler(
            path, when="midnight", backupCount=LOG_FILE_BACKUPS, utc=True, encoding="utf-8"
        )
        self.handler.setFormatter(logging.Formatter("%(message)s"))

    def write(self, line: str) -> None:
        self.handler.handle(logging.makeLogRecord({"msg": line, "levelno": logging.INFO}))

    def close(self) -> None:
        self.handler.close()


_LEVEL_KEY = '"level":"'
_LEVELS = frozenset(("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"))


def _level_of(line: str) -> str | None:
    """The level of a rendered line (its second key, so the search stops early)."""
    start = line.find(_LEVEL_KEY)
    if start < 0:
        return None
    start += len(_LEVEL_KEY)
    level = line[start : line.find('"', start)]
    return level if level in _LEVELS else None


class LogCollector:
    """The one writer of stdout and the log file, fed by this process and by worker channels.

    It counts the lines it writes by level (``line_counts``): the metrics' error rate."""

    _POLL_SECONDS = 0.2

    def __init__(self, sinks: list[_StreamSink | _RotatingFileSink]) -> None:
        self._sinks = sinks
        self._write_lock = threading.Lock()
        self._lines_by_level: dict[str, int] = {}
        self._readers_lock = threading.Lock()
        self._readers: list[Connection] = []
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="log-collector", daemon=True)
        self._thread.start()

    def write(self, line: str) -> None:
        level = _level_of(line)
        with self._write_lock:
            for sink in self._sinks:
                sink.write(line)
            if level is not None:
                self._lines_by_level[level] = self._lines_by_level.get(level, 0) + 1

    def line_counts(self) -> dict[str, int]:
        """Lines written since the start, by level."""
        with self._write_lock:
            return dict(self._lines_by_level)

    def open_channel(self) -> Connection:
        """A write end for one worker process. Pass it to the process, then close it here."""
        reader, writer = multiprocessing.get_context("spawn").Pipe(duplex=False)
        with self._readers_lock:
            self._readers.append(reader)
        return writer

    def _drain_ready(self, timeout: float) -> int:
        with self._readers_lock:
            readers = list(self._readers)
        if not readers:
            if timeout:
                self._stopping.wait(timeout)
            return 0
        received = 0
        for reader in wait(readers, timeout):
            assert isinstance(reader, Connection)
            try:
                data = reader.recv_bytes()
            except (EOFError, OSError):
                # The worker is gone (a half-written message from a killed worker ends here too).
                with self._readers_lock:
                    self._readers.remove(reader)
                reader.close()
                continue
            self.write(data.decode("utf-8", "replace"))
            received += 1
        return received

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._drain_ready(self._POLL_SECONDS)

    def close(self) -> None:
        """Write what the channels still hold, then close the sinks."""
        self._stopping.set()
        self._thread.join(timeout=2)
        while self._drain_ready(0):
            pass
        with self._readers_lock:
            for reader in self._readers:
                reader.close()
            self._readers.clear()
        for sink in self._sinks:
            sink.close()


class _LineHandler(logging.Handler):
    """Formats records and hands the lines to a writer (collector, stream or channel)."""

    def __init__(self, write: Callable[[str], None]) -> None:
        super().__init__()
        self._write = write
        self.setFormatter(JsonLineFormatter())

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        self._write(line)


class _ChannelWriter:
    """Sends lines to the supervisor; falls back to stdout if the supervisor is gone."""

    def __init__(self, connection: Connection) -> None:
        self._connection: Connection | None = connection
        self._fallback = _StreamSink(sys.stdout)

    def __call__(self, line: str) -> None:
        if self._connection is not None:
            try:
                self._connection.send_bytes(line.encode("utf-8"))
                return
            except (OSError, ValueError):
                self._connection = None
        self._fallback.write(line)


@dataclass
class LogPipeline:
    """What ``configure_logging`` set up; ``close()`` flushes and releases it."""

    process_role: str
    collector: LogCollector | None = None
    handlers: list[logging.Handler] = field(default_factory=list)

    def close(self) -> None:
        root = logging.getLogger()
        for handler in self.handlers:
            root.removeHandler(handler)
            handler.close()
        if self.collector is not None:
            self.collector.close()


def _register_secrets(settings: RuntimeSettings) -> None:
    REDACTOR.register(settings.email_password.get_secret_value(), username=settings.email_username)
    for secret in settings.oauth2_secrets():
        REDACTOR.register(secret)
    REDACTOR.register_url_password(settings.index_db_url)
    if settings.llm_api_key.get_secret_value():
        REDACTOR.register(settings.llm_api_key.get_secret_value())
    REDACTOR.register_url_password(settings.llm_base_url)


def _log_unhandled(exc_type: type[BaseException], exc: BaseException, tb: Any) -> None:
    logging.getLogger("emailops.unhandled").critical("unhandled exception", exc_info=(exc_type, exc, tb))


def _log_unhandled_in_thread(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit or args.exc_value is None:
        return
    logging.getLogger("emailops.unhandled").critical(
        "unhandled exception in thread %s",
        args.thread.name if args.thread else "?",
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback),
    )


def configure_logging(
    settings: RuntimeSettings | None,
    *,
    process_role: str,
    worker: int | None = None,
    queue: Connection | None = None,
) -> LogPipeline:
    """Install the JSON pipeline for this process (idempotent: replaces a previous one).

    ``settings=None`` means the settings are invalid: stdout only, at INFO, to report that.
    ``queue`` is the worker's channel from ``LogCollector.open_channel()``.
    """
    if process_role not in PROCESS_ROLES:
        raise ValueError(f"process_role must be one of {PROCESS_ROLES}, not {process_role!r}")
    level = settings.log_level_number if settings is not None else logging.INFO
    if settings is not None:
        _register_secrets(settings)

    _process_context.clear()
    _process_context["component"] = process_role
    if worker is not None:
        _process_context["worker"] = worker

    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    root.setLevel(level)
    for name in _CHATTY_LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(
            logging.NOTSET if level <= logging.DEBUG else max(level, logging.WARNING)
        )

    pipeline = LogPipeline(process_role=process_role)
    if process_role == "supervisor":
        sinks: list[_StreamSink | _RotatingFileSink] = [_StreamSink(sys.stdout)]
        if settings is not None and settings.log_file_enabled:
            sinks.append(_RotatingFileSink(settings.log_file_path))
        pipeline.collector = LogCollector(sinks)
        handler = _LineHandler(pipeline.collector.write)
    elif process_role in ("worker", "console") and queue is not None:
        handler = _LineHandler(_ChannelWriter(queue))
    else:
        handler = _LineHandler(_StreamSink(sys.stderr if process_role == "cli" else sys.stdout).write)
    root.addHandler(handler)
    pipeline.handlers.append(handler)

    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            structlog.contextvars.merge_contextvars,
            structlog.stdlib.PositionalArgumentsFormatter(),
            _wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    logging.captureWarnings(True)
    # smtplib prints its debug output (AUTH lines included) to stderr; route it through the pipeline.
    route_smtplib_debug_to_logging()
    sys.excepthook = _log_unhandled
    threading.excepthook = _log_unhandled_in_thread
    return pipeline


def get_logger(component: str, **context: Any) -> structlog.stdlib.BoundLogger:
    """A logger bound to ``component`` (``supervisor``, ``imap``, ``index``, ...) and ``context``."""
    logger: structlog.stdlib.BoundLogger = structlog.get_logger(f"emailops.{component}")
    return logger.bind(component=component, **context)
