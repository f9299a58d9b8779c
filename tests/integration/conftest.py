"""Fixtures that start real services on loopback (tests/harness). Every test in this
directory is marked `integration` automatically (deselect with -m "not integration").

Services, started once per session, healed/cleaned around each test:
  clamd          harness.Clamd: private clamd with the generated test DB (restarted after a
                 test that stopped it)
  dns_server     harness.DNSServer: authoritative zone; emptied (records, faults, recorded
                 queries) after each test
  redis_server   harness.RedisServer: FLUSHALL before each test
Mail paths, one per test module (filterd + Postfix, wired to clamd and dns_server):
  mta_milter       harness.MailRig in milter mode
  mta_after_queue  harness.MailRig in after-queue mode
  mta_both         harness.MailRig with both (milter on smtpd, content_filter after queue)
  Before each test: parts that a test stopped are restarted, queue and mailboxes emptied.
  Change filterd's settings for a whole module by overriding `filterd_overrides`:
      @pytest.fixture(scope="module")
      def filterd_overrides(): return {"scan.deadline": 5.0}
Per test, torn down at its end:
  filterd_daemon   harness.FilterdDaemon alone (wired to clamd and dns_server)
  filterd_factory  filterd_factory(overrides=None, **FilterdDaemon kwargs) -> started daemon
  rig_factory      rig_factory(mode, filterd_overrides=None, **MailRig kwargs) -> started rig

A service this machine cannot run (not root, package missing, `filterd serve` missing)
skips the tests that need it, with the reason. SIGTERM (e.g. from `timeout`) becomes an
interrupt so teardown still runs; services started by a session that was SIGKILLed die with
it, and their directories are swept by the next session.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from harness import (Clamd, DNSServer, FilterdDaemon, MailRig, RedisServer, Unavailable,
                     filterd_available)
from harness.common import sweep_stale_dirs
from harness.filterd import service_overrides

HERE = Path(__file__).resolve().parent


def _sigterm_as_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_configure(config: pytest.Config) -> None:
    # `timeout 600 pytest ...` ends pytest with SIGTERM: turn it into an interrupt so the
    # fixtures' teardown stops the services and removes their directories.
    if threading.current_thread() is threading.main_thread() and \
            signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    # what sessions killed harder than that left behind
    sweep_stale_dirs()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.integration)


def _start(service: Any) -> Any:
    try:
        return service.start()
    except Unavailable as exc:
        service.close()
        pytest.skip(str(exc))


_FILTERD: dict[str, tuple[bool, str]] = {}


def require_filterd() -> None:
    if "serve" not in _FILTERD:
        _FILTERD["serve"] = filterd_available()
    ok, why = _FILTERD["serve"]
    if not ok:
        pytest.skip(why)


# --- services -------------------------------------------------------------------------
@pytest.fixture(scope="session")
def clamd_service() -> Iterator[Clamd]:
    c = Clamd()
    try:
        yield _start(c)
    finally:
        c.close()


@pytest.fixture
def clamd(clamd_service: Clamd) -> Iterator[Clamd]:
    yield clamd_service
    if not clamd_service.running:
        clamd_service.start()


@pytest.fixture(scope="session")
def dns_service() -> Iterator[DNSServer]:
    d = DNSServer()
    try:
        yield _start(d)
    finally:
        d.close()


@pytest.fixture
def dns_server(dns_service: DNSServer) -> Iterator[DNSServer]:
    yield dns_service
    dns_service.clear()
    if not dns_service.running:
        dns_service.start()


@pytest.fixture(scope="session")
def redis_service() -> Iterator[RedisServer]:
    r = RedisServer()
    try:
        yield _start(r)
    finally:
        r.close()


@pytest.fixture
def redis_server(redis_service: RedisServer) -> RedisServer:
    if not redis_service.running:
        redis_service.start()
    redis_service.flushall()
    return redis_service


# --- filterd and the mail paths ---------------------------------------------------------
@pytest.fixture(scope="module")
def filterd_overrides() -> dict[str, Any]:
    """filterd settings for this module's rigs and daemons; override in a test module."""
    return {}


@pytest.fixture(scope="module")
def wired_overrides(clamd_service: Clamd, dns_service: DNSServer,
                    filterd_overrides: dict[str, Any]) -> dict[str, Any]:
    """Settings pointing filterd at the session's clamd and DNS, then the module's own."""
    return {**service_overrides(clamd=clamd_service, dns=dns_service), **filterd_overrides}


def _rig(mode: str, overrides: dict[str, Any]) -> Iterator[MailRig]:
    require_filterd()
    rig = MailRig(mode, filterd_overrides=overrides)
    try:
        yield _start(rig)
    finally:
        rig.close()


@pytest.fixture(scope="module")
def mta_milter_rig(wired_overrides: dict[str, Any]) -> Iterator[MailRig]:
    yield from _rig("milter", wired_overrides)


@pytest.fixture(scope="module")
def mta_after_queue_rig(wired_overrides: dict[str, Any]) -> Iterator[MailRig]:
    yield from _rig("after-queue", wired_overrides)


@pytest.fixture(scope="module")
def mta_both_rig(wired_overrides: dict[str, Any]) -> Iterator[MailRig]:
    yield from _rig("both", wired_overrides)


@pytest.fixture
def mta_milter(mta_milter_rig: MailRig, clamd: Clamd, dns_server: DNSServer) -> MailRig:
    mta_milter_rig.reset()
    return mta_milter_rig


@pytest.fixture
def mta_after_queue(mta_after_queue_rig: MailRig, clamd: Clamd,
                    dns_server: DNSServer) -> MailRig:
    mta_after_queue_rig.reset()
    return mta_after_queue_rig


@pytest.fixture
def mta_both(mta_both_rig: MailRig, clamd: Clamd, dns_server: DNSServer) -> MailRig:
    mta_both_rig.reset()
    return mta_both_rig


@pytest.fixture
def filterd_factory(wired_overrides: dict[str, Any]) -> Iterator[Callable[..., FilterdDaemon]]:
    started: list[FilterdDaemon] = []

    def make(overrides: dict[str, Any] | None = None, **kw: Any) -> FilterdDaemon:
        require_filterd()
        f = FilterdDaemon({**wired_overrides, **(overrides or {})}, **kw)
        started.append(f)
        return _start(f)

    try:
        yield make
    finally:
        for f in started:
            f.close()


@pytest.fixture
def filterd_daemon(filterd_factory: Callable[..., FilterdDaemon], clamd: Clamd,
                   dns_server: DNSServer) -> FilterdDaemon:
    return filterd_factory()


@pytest.fixture
def rig_factory(wired_overrides: dict[str, Any]) -> Iterator[Callable[..., MailRig]]:
    started: list[MailRig] = []

    def make(mode: str = "milter", filterd_overrides: dict[str, Any] | None = None,
             **kw: Any) -> MailRig:
        require_filterd()
        rig = MailRig(mode, filterd_overrides={**wired_overrides, **(filterd_overrides or {})},
                      **kw)
        started.append(rig)
        return _start(rig)

    try:
        yield make
    finally:
        for rig in started:
            rig.close()
