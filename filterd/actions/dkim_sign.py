"""DKIM signing of outbound mail, as the very last step before delivery.

What it does: for originating mail (scan.mynetworks or SMTP AUTH: Outcome.originating) it signs
the message exactly as it will leave (after every header edit: the hook is registered in
filterd.service.FINAL_HEADER_HOOKS, which the Scanner calls on the edited bytes) with the key of
the From domain, or of the nearest parent domain that has one (still DMARC-aligned). RSA keys
(PKCS#1 PEM, 2048 bits from `filterd dkim genkey`) sign rsa-sha256, Ed25519 keys (base64 seed)
sign ed25519-sha256 (RFC 8463); a domain with several selectors listed is signed once per
selector (e.g. Ed25519 and RSA side by side). Canonicalisation relaxed/relaxed, so the milter
path's header folding cannot break it.

Keys: <dkim.keys_dir>/<domain>/<selector>.key, readable by the daemon user only.
Trusts: the key files; the From header of mail our own users send.
Settings read: dkim.sign, dkim.keys_dir (default <state_dir>/dkim), dkim.selectors,
dkim.sign_headers, dkim.oversign_headers.
Symbols: none. A missing or broken key never blocks mail: the message leaves unsigned and the
problem is logged (once per key file and error).
"""

from __future__ import annotations

import base64
import logging
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dkim

from filterd.message import decode_header_value, parse_address

log = logging.getLogger("filterd.dkim")


@dataclass(frozen=True, slots=True)
class SigningKey:
    domain: str
    selector: str
    algorithm: bytes      # b"rsa-sha256" or b"ed25519-sha256"
    private: bytes        # as dkimpy takes it
    path: str


def key_algorithm(data: bytes) -> bytes | None:
    """rsa-sha256 for a PKCS#1 PEM key, ed25519-sha256 for a base64 32-byte seed, else None."""
    if b"-----BEGIN RSA PRIVATE KEY-----" in data:
        return b"rsa-sha256"
    try:
        if len(base64.b64decode(data.strip(), validate=True)) == 32:
            return b"ed25519-sha256"
    except ValueError:
        pass
    return None


def keys_dir(settings: Any) -> Path:
    return Path(settings.dkim.keys_dir) if settings.dkim.keys_dir else settings.state_dir / "dkim"


class Signer:
    """Finds the keys for a domain and signs. Keys are read once and cached by file mtime."""

    def __init__(self, settings: Any):
        self.settings = settings
        self.dir = keys_dir(settings)
        self.selectors: dict[str, list[str]] = {}
        for item in settings.dkim.selectors:
            domain, sep, sels = item.partition("=")
            if sep:
                self.selectors[domain.strip().lower().strip(".")] = [
                    s.strip() for s in sels.split(",") if s.strip()]
        self._cache: dict[Path, tuple[float, SigningKey | None]] = {}
        self._warned: set[tuple[str, str]] = set()
        self._lock = threading.Lock()

    def _warn_once(self, path: str, problem: str) -> None:
        if (path, problem) not in self._warned:
            self._warned.add((path, problem))
            log.error("DKIM key %s: %s; mail of that domain leaves unsigned", path, problem)

    def _load(self, domain: str, selector: str) -> SigningKey | None:
        path = self.dir / domain / f"{selector}.key"
        try:
            mtime = path.stat().st_mtime
        except OSError:
            return None
        with self._lock:
            cached = self._cache.get(path)
            if cached is not None and cached[0] == mtime:
                return cached[1]
        try:
            data = path.read_bytes()
        except OSError as exc:
            self._warn_once(str(path), exc.strerror or str(exc))
            key = None
        else:
            algorithm = key_algorithm(data)
            if algorithm is None:
                self._warn_once(str(path), "not a PKCS#1 RSA PEM key nor an Ed25519 seed")
                key = None
            else:
                key = SigningKey(domain, selector, algorithm, data.strip(), str(path))
        with self._lock:
            self._cache[path] = (mtime, key)
        return key

    def keys_for(self, domain: str) -> list[SigningKey]:
        """The keys of the domain or its nearest parent that has any (relaxed alignment)."""
        labels = domain.lower().strip(".").split(".")
        for i in range(len(labels) - 1):
            candidate = ".".join(labels[i:])
            selectors = self.selectors.get(candidate)
            if selectors is None:
                directory = self.dir / candidate
                found = sorted(p.stem for p in directory.glob("*.key")) if directory.is_dir() else []
                if len(found) > 1:
                    self._warn_once(str(directory), "several keys and no dkim.selectors entry")
                    continue
                selectors = found
            keys = [k for k in (self._load(candidate, s) for s in selectors) if k is not None]
            if keys:
                return keys
        return []

    def sign(self, message: bytes, domain: str) -> list[tuple[str, str]]:
        keys = self.keys_for(domain)
        if not keys:
            return []
        present = {m.group(1).lower() for m in _HEADER_NAME.finditer(_head(message))}
        wanted = [h for h in self.settings.dkim.sign_headers if h.lower() in present]
        if "from" not in {h.lower() for h in wanted}:
            wanted.insert(0, "From")
        include = wanted + list(self.settings.dkim.oversign_headers)
        include_b = [h.encode("ascii") for h in include]
        out = []
        for key in keys:
            try:
                header = dkim.sign(message, key.selector.encode(), key.domain.encode(),
                                   key.private, canonicalize=(b"relaxed", b"relaxed"),
                                   signature_algorithm=key.algorithm, include_headers=include_b)
            except Exception as exc:  # a broken key must not stop the mail
                self._warn_once(key.path, f"signing failed: {type(exc).__name__}: {exc}")
                continue
            name, _, value = header.decode("ascii").partition(":")
            # unfold: our header writer folds again; relaxed canonicalisation ignores the change
            out.append((name.strip(), re.sub(r"\s+", " ", value).strip()))
        return out


_HEADER_NAME = re.compile(rb"^([!-9;-~]+)[ \t]*:", re.M)


def _head(message: bytes) -> bytes:
    for sep in (b"\r\n\r\n", b"\n\n"):
        end = message.find(sep)
        if end != -1:
            return message[:end]
    return message


def from_domain(message: bytes) -> str:
    m = re.search(rb"^From[ \t]*:(.*(?:\r?\n[ \t].*)*)", _head(message), re.M | re.I)
    if not m:
        return ""
    value = decode_header_value(m.group(1).decode("ascii", "surrogateescape"))
    addr = parse_address(value)[1]
    return addr.rpartition("@")[2].lower() if "@" in addr else ""


def _factory(settings: Any) -> Signer:
    return Signer(settings)


def wants_signature(outcome: Any, services: dict[str, Any]) -> bool:
    """Whether sign_outgoing may sign this message: originating mail whose policy (dkim.sign,
    or the policy bank's dkim_sign) asks for it, with a signer running. Cheap: the Scanner
    asks it before building the edited bytes the signature needs."""
    signer = services.get("dkim_signer")
    return (signer is not None and bool(outcome.originating) and signer.settings.dkim.sign
            and bool(getattr(outcome, "dkim_sign", True)))


def sign_outgoing(edited: bytes, outcome: Any, services: dict[str, Any]) -> list[tuple[str, str]]:
    """FINAL_HEADER_HOOKS entry: DKIM-Signature headers for originating mail whose policy
    (dkim.sign, or the policy bank's dkim_sign) asks for signing, else nothing."""
    if not wants_signature(outcome, services):
        return []
    signer = services["dkim_signer"]
    domain = from_domain(edited)
    if not domain:
        return []
    try:
        return signer.sign(edited, domain)
    except Exception:
        log.exception("DKIM signing failed; the message leaves unsigned")
        return []


sign_outgoing.applies = wants_signature  # type: ignore[attr-defined]


def _register() -> None:
    from filterd.service import FINAL_HEADER_HOOKS, SERVICE_FACTORIES
    SERVICE_FACTORIES.setdefault("dkim_signer", _factory)
    if sign_outgoing not in FINAL_HEADER_HOOKS:
        FINAL_HEADER_HOOKS.append(sign_outgoing)


_register()
