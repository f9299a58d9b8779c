"""`filterd learn --spam|--ham [--forget] PATH...`: teach the Bayes learner from saved mail.

PATH is a message file, a directory (recursive), an mbox file or a Maildir. Each message is
remembered by its digest: learning it again as the same class does nothing, learning it as
the other class moves it (the old counts are undone), --forget unlearns it. Messages are
applied `bayes.batch_size` at a time, each batch in one transaction, so an interrupted run
leaves every finished batch learned and nothing half-written.

Files that cannot be read, are not mail (no header block), or whose MIME structure is broken
beyond parsing are reported one per line on stderr and skipped; the run goes on. Messages
with minor MIME defects are learned (spam is often malformed) and counted as such.
A progress bar is drawn on stderr when it is a terminal (--progress/--no-progress force it).
Exit status: 0 when every message was handled, 1 when some were skipped, 2 on usage errors.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from filterd.cli.progress import ProgressBar, count_files
from filterd.textsafe import visible

# Header names at least one of which a mail message has near its top.
_MAIL_HEADERS = {"from", "to", "subject", "date", "received", "message-id", "return-path",
                 "delivered-to", "mime-version", "content-type", "sender", "reply-to", "cc"}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("learn", help="learn messages as spam or ham (Bayes)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cls = p.add_mutually_exclusive_group(required=True)
    cls.add_argument("--spam", dest="label", action="store_const", const="spam",
                     help="the messages are spam")
    cls.add_argument("--ham", dest="label", action="store_const", const="ham",
                     help="the messages are ham (wanted mail)")
    cls.add_argument("--forget", dest="label", action="store_const", const="forget",
                     help="unlearn the messages, whatever they were learned as")
    p.add_argument("paths", nargs="+", metavar="PATH",
                   help="message file, directory, mbox file or Maildir")
    p.add_argument("--progress", dest="progress", action="store_true", default=None,
                   help="draw a progress bar even when stderr is not a terminal")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("-q", "--quiet", action="store_true", help="print only problems")
    p.set_defaults(func=run)


def check_message(raw: bytes) -> tuple[str | None, Any]:
    """(why `raw` cannot be learned or None, its parsed view or None)."""
    if not raw.strip():
        return "empty file", None
    from filterd.message import parse
    view = parse(raw)
    if view.parse_error:
        return f"broken message ({view.parse_error})", None
    names = {name.lower() for name, _ in view.raw_headers[:60]}
    if not names & _MAIL_HEADERS:
        return "not a mail message (no mail headers)", None
    return None, view


class Progress:
    """learn's counts on the shared progress bar."""

    def __init__(self, enabled: bool, total: int | None):
        self.bar = ProgressBar(total, enabled=enabled, per_second=5.0)
        self.enabled = enabled

    def update(self, done: int, counts: dict[str, int], *, force: bool = False) -> None:
        self.bar.update(done, f"learned {counts['learned']}  moved {counts['moved']}  "
                              f"already {counts['noop']}  skipped {counts['skipped']}",
                        force=force)

    def finish(self) -> None:
        self.bar.close()


def run(args: argparse.Namespace) -> int:
    from filterd.bayes import Bayes, Learner
    from filterd.cli.main import load_settings
    from filterd.message.sources import iter_messages
    from filterd.stores import LearnResult, StoreError, open_token_store

    from filterd.statefs import unreadable_inputs

    settings = load_settings(args)
    label = None if args.label == "forget" else args.label
    unreadable = unreadable_inputs(args.paths)
    for problem in unreadable.values():
        print(f"filterd learn: {problem}", file=sys.stderr)
    paths = [p for p in args.paths if p not in unreadable]
    try:
        store = open_token_store(settings)
    except StoreError as exc:
        print(f"filterd learn: cannot open the Bayes store: {exc}", file=sys.stderr)
        return 1
    counts = {"learned": 0, "moved": 0, "forgotten": 0, "noop": 0, "skipped": 0, "defects": 0}

    def on_result(name: str, result: LearnResult) -> None:
        counts[result.value] += 1

    learner = Learner(Bayes.from_settings(settings, store), batch_size=settings.bayes.batch_size,
                      on_result=on_result)
    show = args.progress if args.progress is not None else sys.stderr.isatty()
    progress = Progress(bool(show) and not args.quiet, count_files(paths) if show else None)
    started = time.monotonic()
    done = 0
    try:
        for item in iter_messages(paths):
            done += 1
            if item.data is None:
                _problem(progress, f"{item.name}: unreadable: {item.error}")
                counts["skipped"] += 1
                continue
            problem, view = check_message(item.data)
            if problem:
                _problem(progress, f"{item.name}: {problem}")
                counts["skipped"] += 1
                continue
            if view.defects:
                counts["defects"] += 1
            learner.add(item.name, item.data, label, view)
            progress.update(done, counts)
        learner.flush()
    except StoreError as exc:
        progress.finish()
        print(f"filterd learn: store error, stopped after {done} messages "
              f"(finished batches are kept): {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        progress.finish()
        print(f"filterd learn: interrupted after {done} messages; finished batches are kept",
              file=sys.stderr)
        return 130
    finally:
        store_stats = None
        try:
            store_stats = store.stats()
        except StoreError:
            pass
        store.close()
    progress.update(done, counts, force=True)
    progress.finish()
    elapsed = time.monotonic() - started
    if not args.quiet:
        rate = done / max(elapsed, 1e-6)
        if label:
            other = "ham" if label == "spam" else "spam"
            summary = (f"learned {counts['learned']} as {label}, moved {counts['moved']} "
                       f"(were {other}), already learned {counts['noop']}")
        else:
            summary = f"forgotten {counts['forgotten']}, not learned before {counts['noop']}"
        print(f"{done} messages in {elapsed:.1f}s ({rate:,.0f}/s): {summary}, "
              f"skipped {counts['skipped']}, with MIME defects {counts['defects']}")
        if store_stats is not None:
            print(f"database: {store_stats.nspam} spam, {store_stats.nham} ham, "
                  f"{store_stats.ntokens} tokens ({store_stats.location})")
    return 1 if counts["skipped"] or unreadable else 0


def _problem(progress: Progress, text: str) -> None:
    if progress.enabled:
        sys.stderr.write("\r\x1b[K")
    print(f"filterd learn: {visible(text)}", file=sys.stderr)  # file names and parse errors

