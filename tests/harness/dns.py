"""An authoritative DNS server on 127.0.0.1 (UDP and TCP, one port) with a zone the test
programs at runtime: DNSBL/URIBL entries, SPF/DKIM/DMARC TXT records, MX, A, AAAA.

    d = DNSServer().start()
    d.add("2.0.0.127.zen.test", "A", "127.0.0.2")
    d.add("sel._domainkey.test.example", "TXT", "v=DKIM1; k=rsa; p=" + key)  # >255: split
    d.add("test.example", "MX", (10, "mx.test.example"))
    d.listed("zen.test", "192.0.2.1")          # 1.2.0.192.zen.test A 127.0.0.2
    with d.slow(5):  ...                       # answers delayed 5 s (timeout tests)
    with d.dead():   ...                       # no answers at all
    with d.fail("SERVFAIL", "zen.test"): ...   # that rcode for names under zen.test
    d.queries                                  # [("2.0.0.127.zen.test", "A"), ...]
    d.resolver()                               # dnspython Resolver pointed here only
    d.close()

Semantics: a name with records of another type -> NOERROR without answers (NODATA); an
empty non-terminal (a name only below which records exist) -> NODATA; any other name ->
NXDOMAIN. Nothing is ever forwarded, so no query leaves this host. UDP replies larger than
the client's EDNS0 size (512 without EDNS0) come back truncated (TC), as a real server does,
and the client retries over TCP. Runs in threads of the test process (dnslib).
"""

from __future__ import annotations

import contextlib
import socket
import socketserver
import struct
import threading
import time
from typing import Iterator, Sequence

from dnslib import (AAAA, CNAME, MX, NS, PTR, QTYPE, RCODE, RR, SOA, TXT, A, DNSError,
                    DNSRecord)

from harness.common import track
from harness.ports import free_port

_TYPES = {"A": (QTYPE.A, A), "AAAA": (QTYPE.AAAA, AAAA), "TXT": (QTYPE.TXT, TXT),
          "MX": (QTYPE.MX, MX), "CNAME": (QTYPE.CNAME, CNAME), "PTR": (QTYPE.PTR, PTR),
          "NS": (QTYPE.NS, NS), "SOA": (QTYPE.SOA, SOA)}


def _norm(name: str) -> str:
    return name.rstrip(".").lower()


def _under(name: str, suffixes: Sequence[str] | None) -> bool:
    if suffixes is None:
        return True
    return any(name == s or name.endswith("." + s) for s in suffixes)


def _txt_strings(value: str | bytes | Sequence[str | bytes]) -> list[bytes]:
    """One TXT record's character-strings; a single long value is split every 255 bytes."""
    if isinstance(value, (str, bytes)):
        raw = value.encode() if isinstance(value, str) else value
        return [raw[i:i + 255] for i in range(0, len(raw), 255)] or [b""]
    out = []
    for part in value:
        raw = part.encode() if isinstance(part, str) else part
        if len(raw) > 255:
            raise ValueError("a TXT character-string holds at most 255 bytes")
        out.append(raw)
    return out


def _rdata(rtype: str, value: object):
    if rtype == "TXT":
        return TXT(_txt_strings(value))  # type: ignore[arg-type]
    if rtype == "MX":
        pref, host = value if isinstance(value, (tuple, list)) else (10, value)
        return MX(str(host), int(pref))
    if rtype == "SOA":
        mname, rname, times = value  # type: ignore[misc]
        return SOA(mname, rname, times)
    return _TYPES[rtype][1](str(value))


class _Switch:
    """A fault applied to names under some suffixes (None = every name)."""

    def __init__(self, suffixes: Sequence[str] | None, **kw: object):
        self.suffixes = None if suffixes is None else [_norm(s) for s in suffixes]
        self.__dict__.update(kw)


class _Handler(socketserver.BaseRequestHandler):
    server: "_UDP | _TCP"

    def handle(self) -> None:
        owner: DNSServer = self.server.owner
        tcp = self.server.socket_type == socket.SOCK_STREAM
        if tcp:
            data = self._read_tcp()
            if data is None:
                return
        else:
            data = self.request[0]
        try:
            request = DNSRecord.parse(data)
        except DNSError:
            return
        reply = owner._answer(request)
        if reply is None:                                   # dead: drop it
            return
        wire = reply.pack()
        if tcp:
            self.request.sendall(struct.pack("!H", len(wire)) + wire)
            return
        limit = 512
        for ar in request.ar:
            if ar.rtype == QTYPE.OPT:
                limit = max(512, min(int(ar.rclass), 4096))
        if len(wire) > limit:
            wire = reply.truncate().pack()
        self.request[1].sendto(wire, self.client_address)

    def _read_tcp(self) -> bytes | None:
        buf = b""
        while len(buf) < 2:
            chunk = self.request.recv(2 - len(buf))
            if not chunk:
                return None
            buf += chunk
        length = struct.unpack("!H", buf)[0]
        data = b""
        while len(data) < length:
            chunk = self.request.recv(length - len(data))
            if not chunk:
                return None
            data += chunk
        return data


class _UDP(socketserver.ThreadingMixIn, socketserver.UDPServer):
    daemon_threads = True
    allow_reuse_address = False          # on UDP it would let two servers share the port
    owner: "DNSServer"


class _TCP(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True
    allow_reuse_address = True
    owner: "DNSServer"


class DNSServer:
    def __init__(self, port: int | None = None, *, ttl: int = 300):
        self.port = port or free_port(udp=True)
        self.host = "127.0.0.1"
        self.ttl = ttl
        self.queries: list[tuple[str, str]] = []
        self._zone: dict[str, dict[str, list[RR]]] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._slow: list[_Switch] = []
        self._dead: list[_Switch] = []
        self._fail: list[_Switch] = []
        self._servers: list[socketserver.BaseServer] = []
        self._threads: list[threading.Thread] = []

    @property
    def address(self) -> str:
        """"127.0.0.1:PORT"."""
        return f"{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return bool(self._servers)

    # --- lifecycle -------------------------------------------------------------------
    def start(self) -> "DNSServer":
        if self._servers:
            return self
        self._stopping.clear()
        try:
            for cls in (_UDP, _TCP):
                srv = cls((self.host, self.port), _Handler)
                srv.owner = self
                self._servers.append(srv)
                t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.1},
                                     name=f"dns-{cls.__name__}-{self.port}", daemon=True)
                t.start()
                self._threads.append(t)
        except BaseException:
            self.stop()
            raise
        track(self)
        return self

    def stop(self) -> None:
        self._stopping.set()                                 # wakes slow answers
        for srv in self._servers:
            srv.shutdown()
            srv.server_close()
        for t in self._threads:
            t.join(5)
        self._servers.clear()
        self._threads.clear()

    close = stop

    def __enter__(self) -> "DNSServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- zone ------------------------------------------------------------------------
    def add(self, name: str, rtype: str, value: object, ttl: int | None = None) -> None:
        """Add one record. TXT: str (split at 255 bytes) or a list of strings; MX: (pref,
        host) or host; SOA: (mname, rname, (serial, refresh, retry, expire, minimum))."""
        rtype = rtype.upper()
        if rtype not in _TYPES:
            raise ValueError(f"unsupported record type {rtype!r} (have {', '.join(_TYPES)})")
        rr = RR(_norm(name) + ".", _TYPES[rtype][0], rdata=_rdata(rtype, value),
                ttl=self.ttl if ttl is None else ttl)
        with self._lock:
            self._zone.setdefault(_norm(name), {}).setdefault(rtype, []).append(rr)

    def set(self, name: str, rtype: str, values: Sequence[object], ttl: int | None = None) -> None:
        """Replace all records of one name and type."""
        self.remove(name, rtype)
        for v in values:
            self.add(name, rtype, v, ttl)

    def remove(self, name: str, rtype: str | None = None) -> None:
        """Remove the records of one type, or the whole name (then it is NXDOMAIN)."""
        with self._lock:
            n = _norm(name)
            if rtype is None:
                self._zone.pop(n, None)
            elif n in self._zone:
                self._zone[n].pop(rtype.upper(), None)
                if not self._zone[n]:
                    del self._zone[n]

    def clear(self) -> None:
        """Empty zone, no faults, no recorded queries."""
        with self._lock:
            self._zone.clear()
            self._slow.clear()
            self._dead.clear()
            self._fail.clear()
        self.queries.clear()

    def listed(self, zone: str, ip: str, code: str = "127.0.0.2", txt: str | None = None) -> str:
        """List an IPv4 address on a DNSBL zone; returns the name queried for it."""
        name = ".".join(reversed(ip.split("."))) + "." + _norm(zone)
        self.add(name, "A", code)
        if txt is not None:
            self.add(name, "TXT", txt)
        return name

    def clear_queries(self) -> None:
        self.queries.clear()

    def queried(self, name: str, rtype: str | None = None) -> bool:
        n = _norm(name)
        return any(q == n and (rtype is None or t == rtype.upper()) for q, t in self.queries)

    # --- faults ----------------------------------------------------------------------
    @contextlib.contextmanager
    def _switch(self, bucket: list[_Switch], sw: _Switch) -> Iterator[None]:
        with self._lock:
            bucket.append(sw)
        try:
            yield
        finally:
            with self._lock:
                if sw in bucket:
                    bucket.remove(sw)

    def slow(self, delay: float, *suffixes: str):
        """Context manager: answers for names under `suffixes` (all if none) wait `delay` s."""
        return self._switch(self._slow, _Switch(suffixes or None, delay=delay))

    def dead(self, *suffixes: str):
        """Context manager: queries for names under `suffixes` (all if none) get no answer."""
        return self._switch(self._dead, _Switch(suffixes or None))

    def fail(self, rcode: str = "SERVFAIL", *suffixes: str):
        """Context manager: answer with `rcode` (SERVFAIL, REFUSED...) under `suffixes`."""
        return self._switch(self._fail, _Switch(suffixes or None,
                                                rcode=getattr(RCODE, rcode.upper())))

    # --- answering -------------------------------------------------------------------
    def _answer(self, request: DNSRecord) -> DNSRecord | None:
        q = request.q
        name = _norm(str(q.qname))
        qtype = QTYPE.get(q.qtype)
        self.queries.append((name, str(qtype)))
        with self._lock:
            dead = any(_under(name, s.suffixes) for s in self._dead)
            delay = max((s.delay for s in self._slow if _under(name, s.suffixes)), default=0)
            fail = next((s.rcode for s in self._fail if _under(name, s.suffixes)), None)
            rrs = self._lookup(name, str(qtype))
        if dead:
            return None
        if delay:
            if self._stopping.wait(delay):
                return None
        reply = request.reply()                             # QR, AA, RD copied, RA set
        reply.header.ra = 0
        if fail is not None:
            reply.header.rcode = fail
        elif rrs is None:
            reply.header.rcode = RCODE.NXDOMAIN
        else:
            for rr in rrs:
                reply.add_answer(rr)
        return reply

    def _lookup(self, name: str, qtype: str) -> list[RR] | None:
        """Answers for name/type; [] for NODATA; None for NXDOMAIN. Caller holds the lock."""
        records = self._zone.get(name)
        if records is None:
            if any(n.endswith("." + name) for n in self._zone):
                return []                                   # empty non-terminal
            return None
        if qtype == "ANY":
            return [rr for rrs in records.values() for rr in rrs]
        if qtype in records:
            return list(records[qtype])
        if "CNAME" in records:                              # one level, inside this zone
            out = list(records["CNAME"])
            target = _norm(str(records["CNAME"][0].rdata.label))
            out += self._zone.get(target, {}).get(qtype, [])
            return out
        return []

    # --- clients ---------------------------------------------------------------------
    def resolver(self, lifetime: float = 2.0):
        """A dnspython Resolver that asks this server only (never /etc/resolv.conf)."""
        import dns.resolver
        r = dns.resolver.Resolver(configure=False)
        r.nameservers = [self.host]
        r.port = self.port
        r.lifetime = lifetime
        r.timeout = lifetime
        r.cache = None
        return r

    def wait_query(self, name: str, rtype: str | None = None, timeout: float = 10.0) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.queried(name, rtype):
                return True
            time.sleep(0.05)
        return False
