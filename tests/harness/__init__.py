"""Real mail components on loopback for the integration tests: Postfix, clamd, a DNS
server, Redis and the real `filterd serve`, each started privately by the test session.

Every service gets its own ports (`ports.free_port()`: random, reserved against concurrent
sessions) and its own directory (`private_dir()`: under /tmp, mode 0755 so the postfix and
nobody users can traverse it; pytest's tmp dirs are 0700). Nothing is shared with another
session and nothing listens beyond 127.0.0.1. Each service class has start()/stop() and is a
context manager; its constructor starts nothing, and a failed start() cleans up after itself.

    from harness import PostfixInstance, Clamd, DNSServer, RedisServer, FilterdDaemon, MailRig

The Postfix snippets come from packaging/postfix/ (applied exactly, placeholders filled in),
the clamd config and signature database from packaging/clamav/.

Services that need root (Postfix) or a missing binary raise `Unavailable`; the pytest
fixtures turn that into a skip with the message (tests/integration/conftest.py).
"""

from __future__ import annotations

from harness.common import (KEEP_ENV, PACKAGING, REPO, ServiceError, Unavailable,  # noqa: F401
                            private_dir, read_tail, remove_dir, render, require_binary,
                            require_root, stop_process, wait_for)
from harness.ports import free_port, wait_port
from harness.postfix import PostfixInstance, Reply
from harness.clamd import Clamd
from harness.dns import DNSServer
from harness.redis import RedisServer
from harness.filterd import FilterdDaemon, filterd_available
from harness.rig import MailRig

__all__ = [
    "REPO", "PACKAGING", "Unavailable", "ServiceError", "require_root", "require_binary",
    "private_dir", "remove_dir", "render", "stop_process", "wait_for", "read_tail",
    "free_port", "wait_port", "PostfixInstance", "Reply", "Clamd", "DNSServer",
    "RedisServer", "FilterdDaemon", "filterd_available", "MailRig",
]
