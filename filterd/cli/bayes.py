"""`filterd bayes stats|dump|expire|backup|restore`: look after the Bayes database.

  stats            messages and tokens learned, whether the counters agree with the learned
                   digests (they always should: both change in one transaction), SQLite's own
                   integrity check, size and token ages; --json for machines
  dump             every token with its spam and ham counts and the day it was last learned,
                   tab-separated (--sort spammy|hammy|count|token, --limit N)
  expire           remove tokens not learned for bayes.token_max_age_days, then the least
                   recently learned down to bayes.max_db_tokens (--max-age-days, --max-tokens)
  backup FILE      a portable copy (gzip JSON lines; '-' for stdout), written to a temporary
                   file, fsynced and renamed into place; works across backends
  restore FILE     replace the database with a backup, in one transaction
Exit status: 0 success, 1 failure (the message says what failed), 2 usage errors.
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

from filterd.textsafe import visible

BACKUP_FORMAT = "filterd-bayes-backup"
BACKUP_VERSION = 1


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bayes", help="Bayes database: stats, dump, expire, backup, restore",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    verbs = p.add_subparsers(dest="verb", metavar="VERB", required=True)
    s = verbs.add_parser("stats", help="counts, consistency and size")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_stats)
    d = verbs.add_parser("dump", help="tokens with their counts, tab-separated")
    d.add_argument("--sort", choices=("token", "count", "spammy", "hammy"), default="token")
    d.add_argument("--limit", type=int, default=0, metavar="N", help="at most N tokens")
    d.set_defaults(func=cmd_dump)
    e = verbs.add_parser("expire", help="remove old tokens so the database stays bounded")
    e.add_argument("--max-age-days", type=int, metavar="DAYS",
                   help="default: bayes.token_max_age_days")
    e.add_argument("--max-tokens", type=int, metavar="N", help="default: bayes.max_db_tokens")
    e.set_defaults(func=cmd_expire)
    b = verbs.add_parser("backup", help="write a portable copy of the database")
    b.add_argument("file", metavar="FILE", help="backup file ('-' for stdout)")
    b.set_defaults(func=cmd_backup)
    r = verbs.add_parser("restore", help="replace the database with a backup")
    r.add_argument("file", metavar="FILE", help="backup file ('-' for stdin)")
    r.set_defaults(func=cmd_restore)


def _open(args: argparse.Namespace, *, create: bool = True) -> Any:
    from filterd.cli.main import load_settings
    from filterd.stores import StoreError, open_token_store
    settings = load_settings(args)
    try:
        return settings, open_token_store(settings, create=create)
    except StoreError as exc:
        print(f"filterd bayes: {exc}", file=sys.stderr)
        raise SystemExit(1) from None


def _day(day: int | None) -> str:
    return datetime.date.fromordinal(datetime.date(1970, 1, 1).toordinal() + day).isoformat() \
        if day is not None else "-"


def cmd_stats(args: argparse.Namespace) -> int:
    from filterd.stores import StoreError
    settings, store = _open(args, create=False)
    try:
        st = store.stats()
        problems = store.integrity_problems() if hasattr(store, "integrity_problems") else []
    except StoreError as exc:
        print(f"filterd bayes stats: {exc}", file=sys.stderr)
        return 1
    finally:
        store.close()
    b = settings.bayes
    record = {"backend": st.backend, "location": st.location, "spam": st.nspam, "ham": st.nham,
              "tokens": st.ntokens, "learned_digests_spam": st.learned_spam,
              "learned_digests_ham": st.learned_ham, "consistent": st.consistent,
              "integrity": problems or "ok", "size_bytes": st.size_bytes,
              "oldest_token": _day(st.oldest_day), "newest_token": _day(st.newest_day),
              "votes": st.nspam >= b.min_spam and st.nham >= b.min_ham}
    if args.json:
        print(json.dumps(record))
    else:
        print(f"store:       {st.backend} {st.location}")
        print(f"learned:     {st.nspam} spam, {st.nham} ham "
              f"({'votes' if record['votes'] else f'untrained: needs {b.min_spam} spam and {b.min_ham} ham'})")
        print(f"tokens:      {st.ntokens} (last learned {record['oldest_token']} .. "
              f"{record['newest_token']})")
        print(f"consistent:  {'yes' if st.consistent else 'NO'} (digests: {st.learned_spam} spam, "
              f"{st.learned_ham} ham)")
        print(f"integrity:   {'ok' if not problems else '; '.join(problems)}")
        if st.size_bytes is not None:
            print(f"size:        {st.size_bytes / 1e6:.1f} MB")
    return 0 if st.consistent and not problems else 1


def cmd_dump(args: argparse.Namespace) -> int:
    _, store = _open(args, create=False)
    try:
        rows = list(store.iter_tokens())
    finally:
        store.close()
    if args.sort == "count":
        rows.sort(key=lambda r: (-(r[1] + r[2]), r[0]))
    elif args.sort == "spammy":
        rows.sort(key=lambda r: (-(r[1] + 1) / (r[2] + 1), r[0]))
    elif args.sort == "hammy":
        rows.sort(key=lambda r: (-(r[2] + 1) / (r[1] + 1), r[0]))
    if args.limit > 0:
        rows = rows[:args.limit]
    out = sys.stdout
    out.write("token\tspam\tham\tlast_learned\n")
    for tok, spam, ham, day in rows:
        out.write(f"{_escape(tok)}\t{spam}\t{ham}\t{_day(day)}\n")
    return 0


def _escape(token: str) -> str:
    # tokens are message text: a doubled backslash keeps the column unambiguous, textsafe
    # shows TAB, LF, ESC and the other controls (\x09, \x0a, \x1b)
    return visible(token.replace("\\", "\\\\"))


def cmd_expire(args: argparse.Namespace) -> int:
    from filterd.bayes import today
    from filterd.stores import StoreError
    settings, store = _open(args, create=False)
    b = settings.bayes
    age = args.max_age_days if args.max_age_days is not None else b.token_max_age_days
    limit = args.max_tokens if args.max_tokens is not None else b.max_db_tokens
    try:
        result = store.expire(older_than_day=today() - age, max_tokens=limit)
    except StoreError as exc:
        print(f"filterd bayes expire: {exc}", file=sys.stderr)
        return 1
    finally:
        store.close()
    print(f"removed {result.removed} tokens (not learned for {age} days, or beyond {limit}); "
          f"{result.remaining} remain")
    return 0


def _backup_lines(store: Any) -> Iterator[str]:
    nspam, nham = store.message_counts()
    yield json.dumps({"format": BACKUP_FORMAT, "version": BACKUP_VERSION, "spam": nspam,
                      "ham": nham, "backend": store.backend})
    for tok, spam, ham, day in store.iter_tokens():
        yield json.dumps({"t": [tok, spam, ham, day]}, ensure_ascii=False)
    for digest, label in store.iter_learned():
        yield json.dumps({"d": [digest, label]})


def cmd_backup(args: argparse.Namespace) -> int:
    from filterd.stores import StoreError
    _, store = _open(args, create=False)
    try:
        if args.file == "-":
            with gzip.open(sys.stdout.buffer, "wt", encoding="utf-8") as out:
                for line in _backup_lines(store):
                    out.write(line + "\n")
            return 0
        target = Path(args.file)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=str(target.parent or "."))
        try:
            with os.fdopen(fd, "wb") as raw, gzip.open(raw, "wt", encoding="utf-8") as out:
                n = 0
                for line in _backup_lines(store):
                    out.write(line + "\n")
                    n += 1
                out.flush()
                raw.flush()
                os.fsync(raw.fileno())
            os.replace(tmp, target)
        except BaseException:
            os.unlink(tmp)
            raise
    except (OSError, StoreError) as exc:
        from filterd import statefs
        hint = ""
        if isinstance(exc, PermissionError) and statefs.switched_to:
            hint = (f" (run as root, this command works as {statefs.switched_to}, the owner of "
                    f"the state directory: write where {statefs.switched_to} may, or give '-' "
                    "and redirect)")
        print(f"filterd bayes backup: {exc}{hint}", file=sys.stderr)
        return 1
    finally:
        store.close()
    print(f"backup written to {target} ({n - 1} records)")
    return 0


def read_backup(stream: Any) -> tuple[int, int, list[tuple[str, int, int, int]], list[tuple[str, str]]]:
    """Parse a backup; raises ValueError naming the line that is wrong."""
    tokens: list[tuple[str, int, int, int]] = []
    learned: list[tuple[str, str]] = []
    header = None
    for n, line in enumerate(stream, 1):
        try:
            rec = json.loads(line)
            if header is None:
                if rec.get("format") != BACKUP_FORMAT or rec.get("version") != BACKUP_VERSION:
                    raise ValueError("not a filterd Bayes backup (version 1)")
                header = rec
            elif "t" in rec:
                tok, spam, ham, day = rec["t"]
                tokens.append((str(tok), int(spam), int(ham), int(day)))
            elif "d" in rec:
                digest, label = rec["d"]
                if label not in ("spam", "ham"):
                    raise ValueError(f"bad class {label!r}")
                learned.append((str(digest), label))
            else:
                raise ValueError("unknown record")
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise ValueError(f"line {n}: {exc}") from None
    if header is None:
        raise ValueError("empty backup")
    return int(header["spam"]), int(header["ham"]), tokens, learned


def cmd_restore(args: argparse.Namespace) -> int:
    from filterd.stores import StoreError
    try:
        src = sys.stdin.buffer if args.file == "-" else open(args.file, "rb")
        with gzip.open(src, "rt", encoding="utf-8") as stream:
            nspam, nham, tokens, learned = read_backup(stream)
    except (OSError, EOFError, ValueError, UnicodeDecodeError) as exc:
        print(f"filterd bayes restore: {args.file}: {exc}; the database is unchanged",
              file=sys.stderr)
        return 1
    _, store = _open(args)
    try:
        store.replace_all(nspam, nham, tokens, learned)
    except StoreError as exc:
        print(f"filterd bayes restore: {exc}; the database is unchanged", file=sys.stderr)
        return 1
    finally:
        store.close()
    print(f"restored {nspam} spam, {nham} ham, {len(tokens)} tokens, {len(learned)} digests")
    return 0
