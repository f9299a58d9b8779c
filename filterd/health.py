"""Component health: one probe per component, for `filterd health` and the metrics gauges.

HEALTH_CHECKS maps a component name to a HealthCheck: `fn(settings) -> (ok, detail)`, where ok
is True (healthy), False (failing), WARN (works, but the admin should act: shown as WARN, not a
failure) or None (not configured / not part of this installation: shown, never a failure).
Families register their own probes with `register()` when their module is imported
(filterd.pipeline.CHECK_MODULES are imported before probing), replacing the generic ones below
of the same name. A probe that raises counts as failing with the error as
detail; each probe runs under metrics.health_timeout.

Built-in probes:
  rules       the rule set on disk loads and validates (what `filterd reload` would accept)
  state_dir   daemon.state_dir exists and a file can be written, fsynced and removed there
  quarantine  the quarantine spool directory is writable
  reinject    the Postfix reinjection listener (smtp.reinject) answers 220 and EHLO 250
  daemon      the running daemon answers `status` on its control socket
  clamd       PING/PONG through filterd.checks.antivirus (clamav.socket / clamav.tcp)
  resolver    the configured resolver answers; each DNS list's RFC 5782 test point
              (127.0.0.2) must come back listed and not with a "blocked resolver" code
  stores      the Bayes token store opens and reports its statistics (filterd.stores)
  file_modes  the state (state dir, spool, Bayes database and its -wal/-shm, rules cache,
              control socket) and a unix milter socket keep the file-mode policy
              (filterd.modes): world-writable fails, world-readable warns

Trusts: nothing it talks to; every probe has a timeout and failures are reported, not raised.
Reads: metrics.health_timeout, smtp.enabled, smtp.reinject, daemon.state_dir, control.socket,
quarantine.dir, clamav.*, dns.*, bayes.*, rules.*, milter.listen, milter.socket_group.
Emits: no symbols.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ipaddress
import os
import socket
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

Probe = Callable[[Any], "tuple[bool | None | object, str]"]
WARN = object()   # a probe's ok when the component works but breaks a rule the admin should fix


@dataclass(frozen=True, slots=True)
class HealthCheck:
    name: str
    fn: Probe
    in_metrics: bool   # also probed for filterd_component_up (cheap, no side effects)


@dataclass(frozen=True, slots=True)
class HealthResult:
    name: str
    ok: bool | None     # None: not configured / not available
    detail: str
    warn: bool = False  # ok, with something to fix (the probe returned WARN)

    @property
    def status(self) -> str:
        if self.ok and self.warn:
            return "WARN"
        return "ok" if self.ok else ("skip" if self.ok is None else "FAIL")


HEALTH_CHECKS: dict[str, HealthCheck] = {}


def register(name: str, fn: Probe, *, in_metrics: bool = True) -> Probe:
    """Add or replace the probe for a component (a family's own probe replaces the generic)."""
    HEALTH_CHECKS[name] = HealthCheck(name, fn, in_metrics)
    return fn


# --- built-in probes ----------------------------------------------------------------------

def probe_rules(settings: Any) -> tuple[bool, str]:
    from filterd.ruleset import RulesetError, load
    try:
        ruleset = load(settings.rules_dir, settings.site_rules_dir)
    except RulesetError as exc:
        return False, str(exc)
    return True, (f"{len(ruleset.files)} files, {len(ruleset.bindings)} checks, "
                  f"{len(ruleset.rules)} pattern rules, {len(ruleset.scores)} scores")


def _writable(directory: Any, what: str) -> tuple[bool, str]:
    if not directory.is_dir():
        return False, f"{directory} does not exist ({what})"
    try:
        fd, name = tempfile.mkstemp(prefix=".health-", dir=directory)
        try:
            os.write(fd, b"ok\n")
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(name)
    except OSError as exc:
        return False, f"{directory} is not writable: {exc.strerror or exc}"
    usage = os.statvfs(directory)
    free_mb = usage.f_bavail * usage.f_frsize // (1024 * 1024)
    return True, f"{directory} writable, {free_mb} MB free"


def probe_state_dir(settings: Any) -> tuple[bool, str]:
    return _writable(settings.state_dir, "`filterd serve` creates it")


def probe_quarantine(settings: Any) -> tuple[bool, str]:
    directory = settings.quarantine_dir
    if not directory.exists():
        return True, f"{directory} not created yet (created on first use)"
    return _writable(directory, "quarantine spool")


def smtp_ehlo(hostport: str, timeout: float, helo: str = "localhost") -> tuple[bool, str]:
    """Connect, read the greeting, EHLO, QUIT; (ok, what the server said)."""
    host, _, port = hostport.rpartition(":")
    host = host.strip("[]")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout) as sock:
            reader = sock.makefile("rb")

            def reply() -> tuple[int, str]:
                lines = []
                while True:
                    line = reader.readline(1024)
                    if not line:
                        raise ConnectionError("connection closed")
                    lines.append(line.decode("ascii", "replace").rstrip("\r\n"))
                    if len(line) < 4 or line[3:4] != b"-":
                        break
                code = int(lines[-1][:3]) if lines[-1][:3].isdigit() else 0
                return code, lines[0][4:]

            code, greeting = reply()
            if code != 220:
                return False, f"{hostport} greeted {code} {greeting}"
            sock.sendall(f"EHLO {helo}\r\n".encode())
            code, text = reply()
            sock.sendall(b"QUIT\r\n")
            if code != 250:
                return False, f"{hostport} answered EHLO with {code} {text}"
            return True, f"{hostport}: {greeting}"
    except (OSError, ValueError) as exc:
        return False, f"{hostport} not reachable: {getattr(exc, 'strerror', None) or exc}"


def probe_reinject(settings: Any) -> tuple[bool | None, str]:
    if not settings.smtp.enabled:
        return None, "after-queue filter disabled (smtp.enabled = false)"
    return smtp_ehlo(settings.smtp.reinject, settings.metrics.health_timeout)


def probe_daemon(settings: Any) -> tuple[bool, str]:
    from filterd.control import request
    path = settings.control_socket
    try:
        reply = request(path, "status", timeout=settings.metrics.health_timeout)
    except (OSError, ValueError) as exc:
        return False, f"not running or not reachable at {path}: {getattr(exc, 'strerror', None) or exc}"
    if not reply.get("ok"):
        return False, f"status failed: {reply.get('error')}"
    messages = sum(int(v) for v in (reply.get("messages") or {}).values())
    detail = (f"pid {reply.get('pid')}, up {reply.get('uptime')} s, {messages} messages, "
              f"{reply.get('reloads', 0)} reloads")
    if reply.get("last_reload_error"):
        return False, detail + f"; last reload refused: {reply['last_reload_error']}"
    return True, detail


def _module(name: str) -> Any:
    import importlib
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name and name.startswith(exc.name):
            return None
        raise


def probe_clamd(settings: Any) -> tuple[bool | None, str]:
    antivirus = _module("filterd.checks.antivirus")
    if antivirus is None or not hasattr(settings, "clamav"):
        return None, "not available (filterd.checks.antivirus is not installed)"
    clamav = settings.clamav
    where = clamav.tcp or clamav.socket
    if not where:
        return None, "not configured (clamav.socket and clamav.tcp are empty)"
    client = antivirus.ClamdClient.from_settings(settings)
    try:
        if client.ping_blocking():
            return True, f"{where}: PONG"
        return False, f"{where}: no PONG (clamd down or socket unreachable)"
    finally:
        client.close()


def _dnsbl_zones(settings: Any) -> list[tuple[str, tuple[str, ...]]]:
    """(zone, blocked codes) of every enabled IP DNS list in the rule set."""
    from filterd.ruleset import RulesetError, load_raw
    try:
        # the raw tables are enough here: compiling every pattern rule would cost seconds
        merged = load_raw(settings.rules_dir, settings.site_rules_dir)[0]
    except RulesetError:
        return []
    zones = []
    for name, entry in merged.get("check", {}).items():
        args = entry.get("args", {}) if isinstance(entry, dict) else {}
        function = str(entry.get("function", name)) if isinstance(entry, dict) else ""
        if (entry.get("enabled", True) and isinstance(args, dict) and "zone" in args
                and "dnsbl" in function and "ip" in function):
            zones.append((str(args["zone"]), tuple(str(c) for c in args.get("blocked_codes", ()))))
    return zones


def probe_resolver(settings: Any) -> tuple[bool | None, str]:
    dnsmod = _module("filterd.dns")
    if dnsmod is None or not hasattr(settings, "dns"):
        return None, "not available (filterd.dns is not installed)"
    problems: list[str] = []
    # what the daemon's resolver has seen, when we run inside it
    seen = dnsmod.health()
    problems.extend(seen.get("warnings", []))
    zones = _dnsbl_zones(settings)
    resolver = dnsmod.Resolver.from_settings(settings)
    where = ", ".join(f"{ns}:{settings.dns.port}" for ns in settings.dns.nameservers)

    async def ask() -> list[str]:
        notes = []
        if not zones:
            answer = await resolver.query(".", "NS")
            if answer.status not in (dnsmod.OK, dnsmod.NODATA):
                problems.append(f"root NS query: {answer.status}")
            else:
                notes.append("answers")
            return notes
        for zone, blocked in zones:
            answer = await resolver.query(f"2.0.0.127.{zone}", "A")
            if answer.status != dnsmod.OK:
                problems.append(f"{zone} test point 127.0.0.2: {answer.status}")
                continue
            bad = [a for a in answer.records
                   if a in blocked or ipaddress.ip_address(a) not in ipaddress.ip_network(
                       "127.0.0.0/8")]
            if bad:
                problems.append(f"{zone} answered {', '.join(bad)} for its test point: the "
                                "resolver is blocked or over quota there (use a local "
                                "recursive resolver, not a public or forwarding one)")
            else:
                notes.append(zone)
        return notes

    ok_zones = asyncio.run(ask())
    if problems:
        return False, f"{where}: " + "; ".join(problems)
    if zones:
        return True, f"{where}: test points listed on {', '.join(ok_zones)}"
    return True, f"{where}: answers (no DNS lists bound)"


def probe_stores(settings: Any) -> tuple[bool | None, str]:
    stores = _module("filterd.stores")
    if stores is None or not hasattr(stores, "open_token_store") or not hasattr(settings, "bayes"):
        return None, "not available (filterd.stores is not installed)"
    if settings.bayes.backend == "sqlite" and hasattr(stores, "sqlite_path"):
        path = stores.sqlite_path(settings)
        if not path.exists():
            return None, f"no Bayes database at {path} yet (nothing learned)"
    try:
        store = stores.open_token_store(settings, create=False)
    except Exception as exc:  # StoreError, a missing file, a dead Redis
        return False, f"Bayes store ({settings.bayes.backend}) cannot be opened: {exc}"
    try:
        st = store.stats()
    except Exception as exc:
        return False, f"Bayes store ({settings.bayes.backend}) unreadable: {exc}"
    finally:
        store.close()
    return True, (f"{st.backend} {st.location}: {st.nspam} spam, {st.nham} ham learned, "
                  f"{st.ntokens} tokens")


def probe_file_modes(settings: Any) -> tuple[bool | object, str]:
    from filterd.modes import MTA_SOCKET_MODE, world_access
    roots = [settings.state_dir, settings.quarantine_dir, settings.control_socket]
    if settings.compile_cache_dir is not None:
        roots.append(settings.compile_cache_dir)
    stores = _module("filterd.stores")
    if stores is not None and hasattr(stores, "sqlite_path") and hasattr(settings, "bayes"):
        db = stores.sqlite_path(settings)
        roots += [db] + [db.with_name(db.name + end) for end in ("-wal", "-shm", "-journal")]
    problems = world_access(roots)
    notes = []
    milter_socket = None
    if settings.milter.enabled:
        from filterd.frontends.milter import unix_socket_path
        milter_socket = unix_socket_path(settings.milter.listen)
    if milter_socket and os.path.exists(milter_socket):
        problems += world_access([Path(milter_socket)])
        st = os.lstat(milter_socket)
        if stat.S_IMODE(st.st_mode) & MTA_SOCKET_MODE != MTA_SOCKET_MODE:
            notes.append(f"{milter_socket} is {stat.S_IMODE(st.st_mode):04o}, not "
                         f"{MTA_SOCKET_MODE:04o} (its group cannot connect)")
        if settings.milter.socket_group:
            from filterd.modes import group_id
            try:
                want = group_id(settings.milter.socket_group)
            except OSError as exc:
                return False, f"milter.socket_group: {exc}"
            if st.st_gid != want:
                notes.append(f"{milter_socket} has group {st.st_gid}, not milter.socket_group "
                             f"{settings.milter.socket_group} (Postfix cannot connect)")
    writable = [f for f in problems if f.world_writable]
    fix = _chmod_hint(problems, roots)
    shown = lambda fs: ", ".join(f"{f.path} ({f.mode:04o})" for f in fs[:5]) + (  # noqa: E731
        f" and {len(fs) - 5} more" if len(fs) > 5 else "")
    if writable:
        return False, f"{len(writable)} world-writable: {shown(writable)}{fix}"
    if problems or notes:
        parts = [f"{len(problems)} readable by other users: {shown(problems)}"] if problems else []
        return WARN, "; ".join(parts + notes) + (fix if problems else "")
    return True, f"{settings.state_dir}: nothing readable or writable by other users"


def _chmod_hint(problems: list[Any], roots: list[Path]) -> str:
    """'; fix: chmod -R o-rwx ROOT...' for the outermost roots that hold a finding."""
    tops = [r for r in roots if not any(other in r.parents for other in roots)]
    where = [t for t in dict.fromkeys(tops)
             if any(f.path == t or t in f.path.parents for f in problems)]
    return "; fix: chmod -R o-rwx " + " ".join(map(str, where)) if where else ""


register("rules", probe_rules, in_metrics=False)  # loading rules at every scrape is wasteful
register("state_dir", probe_state_dir)
register("quarantine", probe_quarantine)
register("reinject", probe_reinject)
register("daemon", probe_daemon, in_metrics=False)  # the daemon is what serves the metrics
register("clamd", probe_clamd)
register("resolver", probe_resolver)
register("stores", probe_stores)
register("file_modes", probe_file_modes, in_metrics=False)  # walks the spool: not per scrape


def _load_family_probes() -> str | None:
    """Import the check modules, so families that register their own probes have done so.

    Returns the import error, if any: a broken module is reported, the other probes still run.
    """
    from filterd import pipeline
    try:
        pipeline.load_checks()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def run_one(check: HealthCheck, settings: Any, timeout: float) -> HealthResult:
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="health")
    try:
        future = pool.submit(check.fn, settings)
        ok, detail = future.result(timeout=timeout)
        if ok is WARN:
            return HealthResult(check.name, True, str(detail), warn=True)
    except concurrent.futures.TimeoutError:
        return HealthResult(check.name, False, f"no answer within {timeout:g} s")
    except Exception as exc:
        return HealthResult(check.name, False, f"{type(exc).__name__}: {exc}")
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    return HealthResult(check.name, ok, str(detail))


def run_checks(settings: Any, *, only: set[str] | None = None, skip: set[str] | None = None,
               only_metrics: bool = False) -> list[HealthResult]:
    """Run the probes (in registry order) and return one result per component."""
    import_error = _load_family_probes()
    timeout = settings.metrics.health_timeout
    results = []
    if import_error and not only_metrics and not only:
        results.append(HealthResult("check_modules", False,
                                    f"a check module does not import: {import_error}"))
    for name, check in list(HEALTH_CHECKS.items()):
        if only and name not in only or skip and name in skip:
            continue
        if only_metrics and not check.in_metrics:
            continue
        results.append(run_one(check, settings, timeout))
    return results
