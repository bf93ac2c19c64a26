"""Secrets never reach a log line, an error or a run card: a URL's credentials (`http://user:secret@host/v1`) and
secret-looking query parameters (`?api_key=...`, `&token=...`) are replaced by `***` in every text we show
(`redact`), and in what the HTTP libraries log themselves (`redact_library_logs`: httpx logs every request's URL at
INFO). Setting names with a secret word (`api_key`, `token`, `password`) are the run card's to hide."""
from __future__ import annotations

import logging
import re

SECRET_WORDS = {"key", "apikey", "token", "secret", "password"}  # whole name parts: max_new_tokens is no secret
_USERINFO = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^/\s@?#]+@")
_SECRET_QUERY = re.compile(r"([?&;][^=&;\s#]*?(?:key|token|secret|password|passwd|pwd|sig|signature|auth|credential)"
                           r"[^=&;\s#]*=)[^&;\s#'\"]+", re.IGNORECASE)
LIBRARY_LOGGERS = ("httpx", "openai", "openai._base_client")


def redact(text: str) -> str:
    """`text` with every URL's user and password, and secret-looking query values, replaced by `***`."""
    return _SECRET_QUERY.sub(r"\1***", _USERINFO.sub(r"\1***@", text))


class Redact(logging.Filter):
    """Redacts a log record's message (the library's arguments merged in first)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


def redact_library_logs() -> None:
    """Redact what the HTTP libraries log (a filter on each of their loggers; added once)."""
    for name in LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, Redact) for f in logger.filters):
            logger.addFilter(Redact())
