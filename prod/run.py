"""``python -m prod.run``: validate the settings once, then supervise ``WORKERS`` worker processes.

Exit codes: 0 after a requested stop (SIGTERM / SIGINT), 3 when a worker failed to boot
repeatedly (see ``prod.supervisor``), 78 (EX_CONFIG) on invalid configuration, after one JSON log
line naming the variable, 70 (EX_SOFTWARE) if the supervisor itself crashed. A console address
that cannot be bound (``WEB_PORT`` in use) is one ERROR line; the daemon runs without the console.

The worker target is ``prod.mail_worker:create_unit``; ``--worker-target module:callable`` or the
environment variable ``EMAILOPS_WORKER_TARGET`` replace it (the tests supervise their own units).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from typing import Any

from prod.console.server import listen
from prod.error_tracking import flush_error_tracking, init_error_tracking
from prod.logging_setup import configure_logging, get_logger
from prod.metrics_endpoint import MetricsEndpoint
from prod.runtime_settings import ConfigError, RuntimeSettings
from prod.supervisor import Supervisor
from prod.worker import DEFAULT_WORKER_TARGET

EXIT_SOFTWARE = 70
EXIT_CONFIG = 78
WORKER_TARGET_ENV = "EMAILOPS_WORKER_TARGET"


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m prod.run", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--worker-target",
        default=os.environ.get(WORKER_TARGET_ENV) or DEFAULT_WORKER_TARGET,
        help=f"module:callable building a worker's unit (default: ${WORKER_TARGET_ENV} or %(default)s)",
    )
    return parser.parse_args(argv)


def _config_error(message: str) -> int:
    pipeline = configure_logging(None, process_role="supervisor")
    get_logger("supervisor").error(message, error_type="ConfigError", exit_code=EXIT_CONFIG)
    pipeline.close()
    return EXIT_CONFIG


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    try:
        settings = RuntimeSettings.from_env()
        if not settings.has_default_account:
            _check_index_accounts(settings)
    except ConfigError as exc:
        return _config_error(str(exc))
    problem = settings.llm_rules_problem()
    if problem:
        return _config_error(problem)
    try:
        pipeline = configure_logging(settings, process_role="supervisor")
    except OSError as exc:
        return _config_error(f"invalid configuration: LOG_FILE_PATH: cannot be opened ({exc.strerror})")
    try:
        settings.state_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        pipeline.close()
        return _config_error(f"invalid configuration: STATE_DIR: cannot be created ({exc.strerror})")

    metrics: MetricsEndpoint | None = None
    if settings.metrics_port is not None:
        try:
            metrics = MetricsEndpoint.start(
                settings, log_lines=pipeline.collector.line_counts if pipeline.collector else dict
            )
        except OSError as exc:
            pipeline.close()
            return _config_error(
                f"invalid configuration: METRICS_PORT: cannot listen on "
                f"{settings.metrics_addr}:{settings.metrics_port} ({exc.strerror or exc})"
            )

    log = get_logger("supervisor")
    console_socket = _console_socket(settings, log)
    init_error_tracking(settings, worker=None)
    try:
        supervisor = Supervisor(
            settings,
            target=args.worker_target,
            log_collector=pipeline.collector,
            metrics=metrics,
            console_socket=console_socket,
        )
        supervisor.install_signal_handlers()
        if metrics is not None:
            log.info(
                "metrics endpoint listening",
                address=f"http://{settings.metrics_addr}:{settings.metrics_port}/metrics",
            )
        return supervisor.run()
    except Exception:
        log.exception("supervisor crashed")
        return EXIT_SOFTWARE
    finally:
        if console_socket is not None:
            console_socket.close()
        if metrics is not None:
            metrics.close()
        flush_error_tracking()
        pipeline.close()


def _check_index_accounts(settings: RuntimeSettings) -> None:
    """Without EMAIL_*, the daemon serves the index's accounts: at least one must be enabled (and
    readable, with SECRETS_KEY). The index is migrated first, as a worker does."""
    from sqlalchemy.exc import SQLAlchemyError

    from emailops.store.database import create_index_engine
    from emailops.store.migrations import migrate
    from prod.mail_worker import no_account_error, served_accounts

    engine = create_index_engine(settings.index_db_url)
    try:
        migrate(engine)
        accounts = served_accounts(settings, engine)
    except SQLAlchemyError as exc:
        raise ConfigError(f"invalid configuration: INDEX_DB_URL: cannot read its accounts ({exc})") from None
    finally:
        engine.dispose()
    if not accounts:
        raise no_account_error()


def _console_socket(settings: RuntimeSettings, log: Any) -> socket.socket | None:
    """The console's socket (WEB_PORT), or None: unset, or the address cannot be bound. The mail
    work never depends on the console, so that is an error line, not a stop."""
    if settings.web_port is None:
        return None
    try:
        return listen(settings)
    except OSError as exc:
        log.error(
            f"operator console disabled: cannot listen on {settings.web_addr}:{settings.web_port} "
            f"({exc.strerror or exc}); free the port or change WEB_PORT",
            setting="WEB_PORT",
            port=settings.web_port,
            address=settings.web_addr,
        )
        return None


if __name__ == "__main__":
    sys.exit(main())
