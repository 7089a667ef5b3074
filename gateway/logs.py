"""Structured logs: one JSON object per line, with the `extra` fields of each call as keys."""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from typing import Any

from aiohttp.http_exceptions import HttpProcessingError

_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
}


# Last line of defence for "the token never appears in a log line": a bearer credential or anything shaped like a
# JWT is blanked in every line written, whoever logged it (the patterns stay inside JSON strings: no quotes).
_SECRETS = re.compile(
    r"(?i:bearer)\s+[A-Za-z0-9\-._~+/]+=*"  # an Authorization value
    r"|eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*"  # a JWS in compact form (its header is JSON: "eyJ")
)


class MalformedRequests(logging.Filter):
    """aiohttp logs every malformed request at ERROR, with a traceback whose message quotes the offending bytes: a
    header line with its bearer token, a request line with its query string. Keep the fact (at INFO: the internet
    sends these all day), drop the bytes."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, HttpProcessingError):
            return True
        args = record.args if isinstance(record.args, tuple) else ()
        record.msg, record.args = "malformed request refused", ()
        record.exc_info, record.exc_text = None, None
        record.levelno, record.levelname = logging.INFO, "INFO"
        record.error, record.status = type(exc).__name__, exc.code
        record.client = args[0] if args else None
        return logging.getLogger().isEnabledFor(logging.INFO)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return _SECRETS.sub("[redacted]", json.dumps(entry, default=str, separators=(",", ":")))


def setup(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(MalformedRequests())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("aiohttp.access").disabled = True  # we write our own access line
