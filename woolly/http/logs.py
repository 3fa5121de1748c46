"""Logging set-up from the config's logging section: level, json or text, stdout/stderr/file."""
from __future__ import annotations

import json
import logging
import sys
import time


class JsonFormatter(logging.Formatter):
    FIELDS = ("method", "path", "status", "latency_ms", "tokens")

    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)), "level": record.levelname.lower(),
               "logger": record.name, "message": record.getMessage()}
        for f in self.FIELDS:
            if hasattr(record, f):
                out[f] = getattr(record, f)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out)


def setup_logging(section) -> None:
    if section.output in ("stdout", "stderr"):
        handler: logging.Handler = logging.StreamHandler(sys.stdout if section.output == "stdout" else sys.stderr)
    else:
        handler = logging.FileHandler(section.output)
    handler.setFormatter(JsonFormatter() if section.format == "json"
                         else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    # uvicorn's own lines (startup, errors) go through the same handler, so `format: json` covers them too
    for name in ("woolly", "uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler] if name in ("woolly", "uvicorn") else []
        logger.setLevel(section.level.upper())
        logger.propagate = name not in ("woolly", "uvicorn")
