"""Logging for the agent: stderr lines carrying their journald priority as a `<N>` prefix.

Under systemd, stderr goes to the journal, which reads a leading `<N>` as the syslog priority
of the line (sd-daemon(3), SyslogLevelPrefix=) and adds the timestamp, host and unit itself;
so a line here is only the priority and the message. Outside systemd the prefixes are still
readable, and `journalctl -p warning` works on whatever the unit logged.
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

LOGGER_NAME = "tdx_preflight"

# syslog priorities (sd-daemon.h SD_CRIT ... SD_DEBUG) for the logging levels.
_PRIORITIES = (
    (logging.CRITICAL, 2),
    (logging.ERROR, 3),
    (logging.WARNING, 4),
    (logging.INFO, 6),
)
_DEBUG_PRIORITY = 7

_LEVELS = {
    "critical": logging.CRITICAL,
    "error": logging.ERROR,
    "warning": logging.WARNING,
    "warn": logging.WARNING,
    "info": logging.INFO,
    "debug": logging.DEBUG,
}


def priority(levelno: int) -> int:
    """The syslog priority for a logging level; custom levels take the next one down."""
    for threshold, prio in _PRIORITIES:
        if levelno >= threshold:
            return prio
    return _DEBUG_PRIORITY


class JournalFormatter(logging.Formatter):
    """`<N>message`, with the prefix repeated on every line of a multi-line record."""

    def __init__(self) -> None:
        super().__init__("%(message)s")

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{priority(record.levelno)}>"
        # journald splits the stream at newlines: an unprefixed traceback line would be
        # stored at the default priority (info) and escape `journalctl -p err`.
        return "\n".join(prefix + line for line in super().format(record).splitlines() or [""])


class _JournalHandler(logging.StreamHandler):
    """Marks the handler setup_logging installed, so a second call reuses it."""


def setup_logging(level: str = "info", stream: TextIO | None = None) -> logging.Logger:
    """The "tdx_preflight" logger writing `<N>message` lines to stream (stderr by default).

    Idempotent: a second call changes the level and stream of the same handler instead of
    adding another. The logger stops propagating to the root logger so that a root handler
    somebody else installed cannot print each line a second time, without its prefix.
    """
    try:
        levelno = _LEVELS[level.strip().lower()]
    except KeyError:
        raise ValueError(
            f"unknown log level {level!r}; use one of {', '.join(sorted(_LEVELS))}"
        ) from None
    target = sys.stderr if stream is None else stream
    logger = logging.getLogger(LOGGER_NAME)
    handler = next((h for h in logger.handlers if isinstance(h, _JournalHandler)), None)
    if handler is None:
        handler = _JournalHandler(target)
        handler.setFormatter(JournalFormatter())
        logger.addHandler(handler)
    elif handler.stream is not target:
        handler.setStream(target)
    logger.setLevel(levelno)
    logger.propagate = False
    return logger
