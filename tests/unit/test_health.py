"""`filterd health` and the probes: each against a real server on loopback (a tiny SMTP
listener, a dnslib DNS server, the daemon's own control socket) or a real directory."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from pathlib import Path

import pytest

from filterd import config, health
from filterd.cli.main import main

DATA = Path(__file__).resolve().parents[1] / "data" / "replay"


class TinySmtp:
    """Answers one greeting and EHLO per connection, as a Postfix reinjection smtpd would."""

    def __init__(self, greeting: bytes = b"220 reinject.test ESMTP\r\n"):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.port = self.sock.getsockname()[1]
        self.greeting = greeting
        self.ehlos: list[bytes] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.sendall(self.greeting)
                data = conn.recv(1024)
                self.ehlos.append(data)
                conn.sendall(b"250-reinject.test\r\n250 PIPELINING\r\n")
                conn.recv(1024)

    def close(self) -> None:
        self.sock.close()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def settings_for(tmp_path: Path, **extra):
    state = tmp_path / "state"
    state.mkdir(exist_ok=True)
    values = {"rules.dir": str(DATA / "rules"), "rules.site_dir": str(tmp_path / "site"),
              "daemon.state_dir": str(state), "metrics.health_timeout": 3.0, **extra}
    return config.defaults().with_overrides(values)


def test_reinject_probe_speaks_smtp(tmp_path):
    server = TinySmtp()
    try:
        ok, detail = health.probe_reinject(settings_for(tmp_path,
                                           **{"smtp.reinject": f"127.0.0.1:{server.port}"}))
    finally:
        server.close()
    assert ok is True and "220" not in detail and "reinject.test ESMTP" in detail
    assert server.ehlos and server.ehlos[0].startswith(b"EHLO ")
    ok, detail = health.probe_reinject(settings_for(tmp_path,
                                       **{"smtp.reinject": f"127.0.0.1:{closed_port()}"}))
    assert ok is False and "not reachable" in detail
    assert health.probe_reinject(settings_for(tmp_path, **{"smtp.enabled": False}))[0] is None


def test_reinject_probe_refuses_a_bad_greeting(tmp_path):
    server = TinySmtp(b"554 go away\r\n")
    try:
        ok, detail = health.probe_reinject(settings_for(tmp_path,
                                           **{"smtp.reinject": f"127.0.0.1:{server.port}"}))
    finally:
        server.close()
    assert ok is False and "greeted 554" in detail


def test_state_dir_and_rules_probes(tmp_path):
    settings = settings_for(tmp_path)
    assert health.probe_state_dir(settings)[0] is True
    missing = settings.with_overrides({"daemon.state_dir": str(tmp_path / "nope")})
    ok, detail = health.probe_state_dir(missing)
    assert ok is False and "does not exist" in detail
    ok, detail = health.probe_rules(settings)
    assert ok is True and "checks" in detail
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "bad.toml").write_text("[nonsense]\nx = 1\n")
    ok, detail = health.probe_rules(settings.with_overrides({"rules.dir": str(broken)}))
    assert ok is False and "bad.toml" in detail


def test_daemon_probe_uses_the_control_socket(tmp_path):
    from filterd import control
    settings = settings_for(tmp_path)
    assert health.probe_daemon(settings)[0] is False  # nothing listening
    ready = threading.Event()
    stop: list = []

    async def handler(request):
        return {"ok": True, "pid": 4242, "uptime": 12.5, "messages": {"accept": 3, "reject": 1},
                "reloads": 0, "last_reload_error": None}

    def serve() -> None:
        async def run() -> None:
            server = await control.serve(settings.control_socket, handler)
            stop.append((asyncio.get_running_loop(), server))
            ready.set()
            await server.serve_forever()
        try:
            asyncio.run(run())
        except asyncio.CancelledError:
            pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert ready.wait(10)
    try:
        ok, detail = health.probe_daemon(settings)
    finally:
        loop, server = stop[0]
        loop.call_soon_threadsafe(server.close)
    assert ok is True and "pid 4242" in detail and "4 messages" in detail


def test_registered_probes_errors_and_timeouts(tmp_path):
    settings = settings_for(tmp_path, **{"metrics.health_timeout": 0.5})

    def broken(_settings):
        raise RuntimeError("boom")

    def slow(_settings):
        time.sleep(5)
        return True, "late"

    health.register("test_broken", broken)
    health.register("test_slow", slow)
    try:
        results = {r.name: r for r in health.run_checks(settings,
                                                        only={"test_broken", "test_slow"})}
    finally:
        del health.HEALTH_CHECKS["test_broken"], health.HEALTH_CHECKS["test_slow"]
    assert results["test_broken"].ok is False and "RuntimeError: boom" in results["test_broken"].detail
    assert results["test_slow"].ok is False and "no answer within 0.5 s" in results["test_slow"].detail


def test_cli_exit_codes_and_json(tmp_path, capsys):
    cfg = tmp_path / "filterd.toml"
    (tmp_path / "state").mkdir()
    cfg.write_text(f'[daemon]\nstate_dir = "{tmp_path / "state"}"\n'
                   f'[rules]\ndir = "{DATA / "rules"}"\nsite_dir = "{tmp_path}"\n'
                   f'[smtp]\nreinject = "127.0.0.1:{closed_port()}"\n')
    assert main(["--config", str(cfg), "health", "--only", "state_dir,rules"]) == 0
    out = capsys.readouterr().out
    assert sorted(line.split()[:2] for line in out.splitlines()) == [["rules", "ok"],
                                                                      ["state_dir", "ok"]]
    assert main(["--config", str(cfg), "health", "--only", "state_dir,reinject", "--json"]) == 1
    rows = {r["component"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["state_dir"]["ok"] is True and rows["reinject"]["status"] == "FAIL"
    assert main(["--config", str(cfg), "health", "--only", "nosuch"]) == 2
    assert "unknown component" in capsys.readouterr().err


@pytest.mark.skipif("dns.nameservers" not in config.BY_KEY, reason="no filterd.dns settings")
def test_resolver_probe_flags_a_blocked_resolver(tmp_path):
    dnslib = pytest.importorskip("dnslib")
    from dnslib.server import BaseResolver, DNSServer

    answers = {"2.0.0.127.bl.test.": "127.0.0.2"}

    class Zone(BaseResolver):
        def resolve(self, request, handler):
            reply = request.reply()
            name = str(request.q.qname)
            if name in answers:
                reply.add_answer(dnslib.RR(name, dnslib.QTYPE.A, rdata=dnslib.A(answers[name]),
                                           ttl=60))
            else:
                reply.header.rcode = dnslib.RCODE.NXDOMAIN
            return reply

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = DNSServer(Zone(), address="127.0.0.1", port=port)
    server.start_thread()
    site = tmp_path / "site" / "local.d"
    site.mkdir(parents=True)
    (site / "bl.toml").write_text(
        '[check.test_bl]\nfunction = "dnsbl.ip"\n[check.test_bl.args]\nzone = "bl.test"\n'
        'blocked_codes = ["127.255.255.254"]\n[check.test_bl.args.codes]\n'
        '"127.0.0.2" = "RCVD_IN_TEST"\n')
    settings = settings_for(tmp_path, **{"dns.nameservers": ["127.0.0.1"], "dns.port": port,
                                         "dns.timeout": 1.0})
    try:
        ok, detail = health.probe_resolver(settings)
        assert ok is True and "bl.test" in detail, detail
        answers["2.0.0.127.bl.test."] = "127.255.255.254"
        ok, detail = health.probe_resolver(settings)
        assert ok is False and "blocked" in detail, detail
    finally:
        server.stop()
