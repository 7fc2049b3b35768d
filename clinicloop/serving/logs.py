"""The server's logging: uvicorn's lines and ours, but never text a request could have put there.

An exception's text and traceback can quote a request (upstream output, pydantic's
`input_value`), so records print an exception as its class names only; access lines print the
path without its query string. What Python would print itself (an exception ending a thread, or
raised where nothing can catch it) is logged the same way. `configure()` sets this up for
`clinicloop serve` and returns the config it hands to uvicorn.
"""

from __future__ import annotations

import logging
import logging.config
import sys
import threading
from copy import copy
from types import TracebackType
from typing import Any

from uvicorn.logging import AccessFormatter

ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None] | tuple[None, None, None]

log = logging.getLogger(__name__)


def exception_names(exc: BaseException) -> str:
    """`exc`'s class and those of the exceptions it was raised from or during, outermost first."""
    names: list[str] = []
    seen: BaseException | None = exc
    while seen is not None and len(names) < 8:
        names.append(type(seen).__name__)
        seen = seen.__cause__ or seen.__context__
    return " <- ".join(names)


class ClassNamesOnly(logging.Formatter):
    """A formatter that prints a record's exception as class names, and no stack."""

    def format(self, record: logging.LogRecord) -> str:
        record = copy(record)
        record.exc_text = None  # another formatter's traceback, cached on the shared record
        record.stack_info = None
        return super().format(record)

    def formatException(self, ei: ExcInfo) -> str:  # noqa: N802 - logging's name
        exc = ei[1]
        names = "unknown exception" if exc is None else exception_names(exc)
        return f"  raised {names} (details withheld: they may quote a request)"


class QuerylessAccess(ClassNamesOnly, AccessFormatter):
    """uvicorn's access line, its path cut at the query string."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        client, method, path, version, status = record.args  # type: ignore[misc]
        record = copy(record)
        record.args = (client, method, str(path).partition("?")[0], version, status)
        return super().formatMessage(record)


def log_config(level: str = "INFO") -> dict[str, Any]:
    """A `logging.config.dictConfig` for the server process: every logger, uvicorn's included,
    goes through the formatters above (stderr; access lines to stdout, as uvicorn does)."""
    line = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {
            "default": {"()": f"{__name__}.ClassNamesOnly", "fmt": line},
            "access": {"()": f"{__name__}.QuerylessAccess", "use_colors": False,
                       "fmt": '%(asctime)s %(levelname)s %(name)s: %(client_addr)s - '
                              '"%(request_line)s" %(status_code)s'},
        },
        "handlers": {
            "default": {"class": "logging.StreamHandler", "formatter": "default",
                        "stream": "ext://sys.stderr"},
            "access": {"class": "logging.StreamHandler", "formatter": "access",
                       "stream": "ext://sys.stdout"},
        },
        "root": {"handlers": ["default"], "level": level},
        "loggers": {
            "uvicorn": {"level": level},
            "uvicorn.access": {"handlers": ["access"], "level": level, "propagate": False},
            "alembic": {"level": "WARNING"},  # migrations log each plugin at INFO
        },
    }


def configure(level: str = "INFO") -> dict[str, Any]:
    """Apply `log_config(level)` to this process and send what Python prints by itself through
    the log, by class name; returns the config (uvicorn applies it again, to its own loggers)."""
    config = log_config(level)
    logging.config.dictConfig(config)
    threading.excepthook = _thread_died
    sys.unraisablehook = _unraisable
    return config


def _thread_died(args: threading.ExceptHookArgs) -> None:
    what = args.exc_type.__name__ if args.exc_value is None else exception_names(args.exc_value)
    log.error("thread %s ended by %s", "?" if args.thread is None else args.thread.name, what)


def _unraisable(args: Any) -> None:  # sys.UnraisableHookArgs
    what = args.exc_type.__name__ if args.exc_value is None else exception_names(args.exc_value)
    log.error("%s ignored: raised where it could not be handled", what)
