"""Request ids and structured logs: every log line is one JSON object, and carries the id of
the request it serves. The gateway takes the id from ``X-Request-Id`` (or makes one) and
passes it to every stage as gRPC metadata; a batch item's id is its batch and custom_id."""

from __future__ import annotations

import contextvars
import json
import logging
import re
import time
import uuid

HEADER = "x-request-id"  # also the gRPC metadata key
_VALID = re.compile(r"^[A-Za-z0-9._:/@+=-]{1,128}$")
current: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)


def accept(given: str | None) -> str:
    """The client's id when it is a plain token of at most 128 characters, else a new one."""
    return given if given and _VALID.match(given) else uuid.uuid4().hex


def metadata() -> tuple[tuple[str, str], ...]:
    rid = current.get()
    return ((HEADER, rid),) if rid else ()


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "service": self.service,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": current.get(),
        }
        line.update(getattr(record, "fields", {}))
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def configure_logging(service: str, level: int = logging.INFO) -> None:
    """One JSON line per record on stderr, for this process and the libraries it runs
    (uvicorn, Celery, gRPC) alike."""
    from transformers.utils import logging as transformers_logging

    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.captureWarnings(True)  # a library's warning is a JSON line too, not raw lines on stderr
    # transformers prints through a handler of its own, and draws progress bars.
    transformers_logging.disable_default_handler()
    transformers_logging.enable_propagation()
    transformers_logging.disable_progress_bar()
