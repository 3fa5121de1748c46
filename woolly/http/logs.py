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


class Throttle(logging.Filter):
    """The same warning or error (logger and message template) at most `limit` times a minute.

    What is held back is counted; the next one let through says how many were. Under a flood
    (descriptors exhausted, a connection storm) the log grows by a bounded amount, not per event.
    """

    WINDOW = 60.0
    MAX_KEYS = 1024

    def __init__(self, limit: int):
        super().__init__()
        self.limit = limit
        self.seen: dict[tuple[str, str], list] = {}   # key -> [window start, count, held back]

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        now = time.monotonic()
        key = (record.name, str(record.msg))
        if key not in self.seen and len(self.seen) >= self.MAX_KEYS:
            self.seen.clear()
        entry = self.seen.setdefault(key, [now, 0, 0])
        if now - entry[0] >= self.WINDOW:
            entry[0], entry[1] = now, 0
        entry[1] += 1
        if entry[1] > self.limit:
            entry[2] += 1
            return False
        if entry[2]:
            record.msg = f"{record.msg} ({entry[2]} more like this held back)"
            entry[2] = 0
        return True


# uvicorn's and asyncio's own messages go to the same place, throttled the same way
ROUTED = ("woolly", "uvicorn", "asyncio")


def setup_logging(section) -> None:
    if section.output in ("stdout", "stderr"):
        handler: logging.Handler = logging.StreamHandler(sys.stdout if section.output == "stdout" else sys.stderr)
    else:
        handler = logging.FileHandler(section.output)
    handler.setFormatter(JsonFormatter() if section.format == "json"
                         else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(Throttle(section.repeat_limit))
    for name in ROUTED:
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.propagate = False
    logging.getLogger("woolly").setLevel(section.level.upper())
    logging.getLogger("uvicorn").setLevel(section.level.upper())
