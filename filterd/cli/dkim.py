"""`filterd dkim genkey DOMAIN SELECTOR [--type rsa|ed25519]`: make a signing key, print its DNS record.

Writes <dkim.keys_dir>/<DOMAIN>/<SELECTOR>.key (mode 0600; run as root, as the owner of the
state directory, see docs/quarantine.md; tmp file, fsync, rename, never through a link) and <SELECTOR>.txt holding the DNS TXT record, then prints the
record in zone-file form, split into 255-byte strings as DNS requires. An existing key is never
overwritten without --force.

RSA keys (2048 bits by default) are made with openssl (PKCS#1, the form dkimpy reads); Ed25519
keys (RFC 8463) with PyNaCl, which dkimpy also needs to sign with them.
Settings read: dkim.keys_dir, daemon.state_dir.
"""

from __future__ import annotations

import argparse
import base64
import re
import subprocess
import sys
from pathlib import Path

from filterd.statefs import Dir

_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("dkim", help="DKIM signing keys",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    dsub = p.add_subparsers(dest="dkim_command", metavar="COMMAND")
    g = dsub.add_parser("genkey", help="make a signing key and print its DNS TXT record")
    g.add_argument("domain", metavar="DOMAIN", help="signing domain (d=), e.g. example.com")
    g.add_argument("selector", metavar="SELECTOR", help="selector (s=), e.g. 2026a")
    g.add_argument("--type", choices=("rsa", "ed25519"), default="rsa", help="key type (rsa)")
    g.add_argument("--bits", type=int, default=2048, help="RSA key size (2048)")
    g.add_argument("--keys-dir", metavar="DIR", help="override dkim.keys_dir")
    g.add_argument("--force", action="store_true", help="replace an existing key")
    g.set_defaults(func=genkey)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def valid_domain(name: str) -> bool:
    labels = name.strip(".").split(".")
    return len(labels) >= 2 and all(_LABEL.match(x) for x in labels)


def make_rsa(bits: int) -> tuple[bytes, str]:
    """(PKCS#1 PEM private key, base64 SubjectPublicKeyInfo for p=)."""
    key = subprocess.run(["openssl", "genrsa", "-traditional", str(bits)], check=True,
                         capture_output=True).stdout
    der = subprocess.run(["openssl", "rsa", "-pubout", "-outform", "DER"], input=key,
                         check=True, capture_output=True).stdout
    return key, base64.b64encode(der).decode("ascii")


def make_ed25519() -> tuple[bytes, str]:
    """(base64 32-byte seed, base64 public key for p=)."""
    import nacl.signing
    seed = nacl.signing.SigningKey.generate()
    return (base64.b64encode(bytes(seed)) + b"\n",
            base64.b64encode(bytes(seed.verify_key)).decode("ascii"))


def txt_record(domain: str, selector: str, key_type: str, public: str) -> str:
    value = f"v=DKIM1; k={key_type}; p={public}"
    chunks = [value[i:i + 255] for i in range(0, len(value), 255)]
    quoted = " ".join(f'"{c}"' for c in chunks)
    return f"{selector}._domainkey.{domain}. 3600 IN TXT ( {quoted} )"


def genkey(args: argparse.Namespace) -> int:
    from filterd.actions.dkim_sign import keys_dir
    from filterd.cli.main import load_settings
    settings = load_settings(args)
    domain, selector = args.domain.lower().strip("."), args.selector
    if not valid_domain(domain):
        print(f"filterd dkim: {args.domain!r} is not a domain name", file=sys.stderr)
        return 2
    if not _LABEL.match(selector):
        print(f"filterd dkim: {selector!r} is not a valid selector (one DNS label)", file=sys.stderr)
        return 2
    if args.type == "rsa" and not 1024 <= args.bits <= 8192:
        print("filterd dkim: --bits must be between 1024 and 8192 (2048 recommended)",
              file=sys.stderr)
        return 2
    base = Path(args.keys_dir) if args.keys_dir else keys_dir(settings)
    directory = base / domain
    key_path = directory / f"{selector}.key"
    try:
        # run as root the CLI already works as the state directory's owner (cli.main); the
        # keys directory is the daemon's, so nothing in it is followed (filterd.statefs)
        with Dir.open(base, create=True) as keys, keys.sub(domain, create=True) as dom:
            if dom.exists(f"{selector}.key") and not args.force:
                print(f"filterd dkim: {key_path} exists; use --force to replace it (and update "
                      f"DNS)", file=sys.stderr)
                return 1
            try:
                private, public = make_rsa(args.bits) if args.type == "rsa" else make_ed25519()
            except (OSError, subprocess.CalledProcessError, ImportError) as exc:
                print(f"filterd dkim: cannot make the key: {exc}", file=sys.stderr)
                return 1
            record = txt_record(domain, selector, args.type, public)
            dom.write_durably(f"{selector}.key", private, 0o600)
            dom.write_durably(f"{selector}.txt", (record + "\n").encode(), 0o644)
            dom.fsync()
    except OSError as exc:
        print(f"filterd dkim: cannot write {key_path}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    print(f"; key written to {key_path}")
    print(f"; publish this record, then add dkim.selectors = [\"{domain}={selector}\"] if the "
          f"domain has several keys")
    print(record)
    return 0
