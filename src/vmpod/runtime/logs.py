"""Runtime logging in runc's formats (logrus text or JSON lines), to --log or stderr."""

from __future__ import annotations

import json
import logging
import sys
import time


class _LogFormatter(logging.Formatter):
    def __init__(self, fmt: str) -> None:
        super().__init__()
        self.fmt = fmt

    def format(self, record: logging.LogRecord) -> str:
        level = {"WARNING": "warning", "CRITICAL": "fatal"}.get(record.levelname, record.levelname.lower())
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(record.created))
        msg = record.getMessage()
        if self.fmt == "json":
            return json.dumps({"level": level, "msg": msg, "time": stamp})
        return f'time="{stamp}" level={level} msg={json.dumps(msg)}'


def setup_logging(path: str, fmt: str, debug: bool) -> None:
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler: logging.Handler = logging.FileHandler(path) if path else logging.StreamHandler(sys.stderr)
    handler.setFormatter(_LogFormatter(fmt))
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if debug else logging.WARNING)
    logging.getLogger("vmpod").setLevel(logging.DEBUG if debug else logging.INFO)
    logging.getLogger("qemu").setLevel(logging.DEBUG if debug else logging.CRITICAL)
