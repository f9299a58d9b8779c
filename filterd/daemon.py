"""`filterd serve`: both front ends, the control socket and signal handling in one process.

Trusts: root only to create the state directory and switch to daemon.user.
Reads: daemon.*, milter.*, smtp.*, lmtp.listen, policy.smtp_extra_listen, control.socket.

The event loop runs in the main thread (so SIGTERM/SIGHUP reach Python); libmilter runs in a
thread of its own and hands each message to the loop. SIGHUP and `filterd reload` validate the
rule set on disk first and swap it only when it loads; messages in flight finish on the set they
started with.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pwd
import signal
import time
from typing import Any

from filterd import __version__
from filterd.ruleset import RulesetError
from filterd.service import PERIODIC_TASKS, Scanner
from filterd.statefs import hand_over

log = logging.getLogger("filterd.daemon")


def prepare_state_dir(settings: Any) -> None:
    """Create the state directory (0750) and hand it to daemon.user when we are root."""
    state = settings.state_dir
    state.mkdir(mode=0o750, parents=True, exist_ok=True)
    settings.quarantine_dir.mkdir(mode=0o750, parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return
    if not settings.daemon.user:
        log.warning("running as root: use the systemd unit (User=filterd) or set daemon.user "
                    "in production")
        return
    try:
        user = pwd.getpwnam(settings.daemon.user)
    except KeyError:
        log.warning("user %r does not exist; running as root (create it: "
                    "useradd --system --home %s filterd)", settings.daemon.user, state)
        return
    # by descriptor: the daemon's account may have planted links in its state (filterd.statefs)
    for path in (state, settings.quarantine_dir):
        if path == state or state not in path.parents:
            hand_over(path, user.pw_uid, user.pw_gid)
    os.setgroups([])
    os.setgid(user.pw_gid)
    os.setuid(user.pw_uid)
    log.info("running as user %s", settings.daemon.user)


class Daemon:
    def __init__(self, settings: Any):
        self.settings = settings
        self.scanner: Scanner | None = None
        self.stopping: asyncio.Event | None = None
        self.smtp_server: asyncio.AbstractServer | None = None
        self.milter_thread: Any = None
        self.reloads = 0
        self.last_reload_error: str | None = None

    async def control(self, request: dict[str, Any]) -> dict[str, Any]:
        command = request.get("command")
        scanner = self.scanner
        assert scanner is not None
        if command == "status":
            return {"ok": True, "version": __version__, "pid": os.getpid(),
                    "uptime": round(time.time() - scanner.started, 1),
                    "milter": self.settings.milter.listen if self.settings.milter.enabled else None,
                    "smtp": self.settings.smtp.listen if self.settings.smtp.enabled else None,
                    "rules_files": len(scanner.ruleset.files),
                    "checks": len(scanner.ruleset.bindings),
                    "reloads": self.reloads, "last_reload_error": self.last_reload_error,
                    "messages": dict(scanner.counters)}
        if command == "reload":
            return self.reload()
        return {"ok": False, "error": f"unknown command {command!r}"}

    def reload(self) -> dict[str, Any]:
        assert self.scanner is not None
        try:
            ruleset = self.scanner.reload()
        except RulesetError as exc:
            self.last_reload_error = str(exc)
            log.error("reload refused, keeping the running rule set: %s", exc)
            return {"ok": False, "error": str(exc)}
        self.reloads += 1
        self.last_reload_error = None
        return {"ok": True, "files": len(ruleset.files), "checks": len(ruleset.bindings),
                "rules": len(ruleset.rules)}

    async def _every(self, interval: float, task: Any) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(interval)
            try:
                await loop.run_in_executor(None, task, self.settings)
            except Exception:
                log.exception("periodic task %r failed", task)

    async def run(self) -> int:
        settings = self.settings
        loop = asyncio.get_running_loop()
        self.stopping = asyncio.Event()
        self.scanner = Scanner(settings)
        self.scanner.start_services()
        # forked before the milter thread and the executors exist (a fork copies one thread)
        self.scanner.start_content_workers()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        control = await __import__("filterd.control", fromlist=["serve"]).serve(
            settings.control_socket, self.control)
        extra_servers: list[asyncio.AbstractServer] = []
        if settings.smtp.enabled:
            from filterd.frontends import smtp
            self.smtp_server = await smtp.start_server(self.scanner)
            for listen in settings.policy.smtp_extra_listen:  # e.g. submission's filter port
                extra_servers.append(await smtp.start_server(self.scanner, listen))
        if settings.lmtp.listen:
            from filterd.frontends import smtp
            extra_servers.append(await smtp.start_server(self.scanner, settings.lmtp.listen,
                                                         lmtp=True))
        if settings.milter.enabled:
            from filterd.frontends import milter
            self.milter_thread = milter.run(self.scanner, loop)
        from filterd import metrics as metrics_mod
        metrics = metrics_mod.start(settings)  # None when metrics.listen = ''
        periodic = [asyncio.create_task(self._every(interval, task))
                    for interval, task in PERIODIC_TASKS]
        log.info("filterd %s ready (state %s)", __version__, settings.state_dir)
        await self.stopping.wait()
        for task in periodic:
            task.cancel()
        log.info("stopping")
        metrics_mod.stop(metrics)
        control.close()
        if self.smtp_server is not None:
            self.smtp_server.close()
        for server in extra_servers:
            server.close()
        if self.milter_thread is not None:
            from filterd.frontends import milter
            milter.stop()
        # Let messages being scanned finish and get their answer; an MTA whose scan we cut
        # off tempfails it (milter_default_action / a deferred after-queue delivery).
        deadline = loop.time() + min(settings.scan.deadline, STOP_GRACE)
        while self.scanner.in_flight and loop.time() < deadline:
            await asyncio.sleep(0.05)
        self.scanner.stop_content_workers()
        settings.control_socket.unlink(missing_ok=True)
        return 0


STOP_GRACE = 30.0  # seconds a stop waits for messages in flight


def serve(settings: Any) -> int:
    prepare_state_dir(settings)
    rc = asyncio.run(Daemon(settings).run())
    # libmilter's listener thread notices smfi_stop() only after its 5 s select timeout;
    # every message has been answered by now, so do not wait for it.
    logging.shutdown()
    os._exit(rc)
