"""Logging to stderr (journald under systemd) or syslog, at log.level."""

from __future__ import annotations

import logging
import logging.handlers
import sys
from typing import Any


def setup(settings: Any | None = None, *, level: str | None = None) -> None:
    lvl = (level or (settings.log.level if settings else "info")).upper()
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    target = settings.log.target if settings else "stderr"
    if target == "syslog":
        handler: logging.Handler = logging.handlers.SysLogHandler(address="/dev/log")
        handler.setFormatter(logging.Formatter("filterd[%(process)d]: %(name)s: %(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(lvl)
    logging.getLogger("mail.log").setLevel(logging.WARNING)
