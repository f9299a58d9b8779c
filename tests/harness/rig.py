"""Postfix + the real filterd, wired to each other on free ports: the whole mail path.

    with MailRig("milter", filterd_overrides={"scan.deadline": 5.0}) as rig:
        code, text = rig.send(msg)                 # to Postfix's public smtpd
        rig.wait_delivered("user", 1)
        rig.filterd.kill(); ...; rig.heal()        # put a broken rig back together

mode: "milter" (smtpd_milters -> filterd), "after-queue" (content_filter -> filterd ->
reinjection listener), or "both". Both parts share one set of ports: Postfix's milter and
content_filter point at filterd's listeners, filterd's smtp.reinject and
quarantine.release_via point at Postfix's reinjection and release listeners.
filterd starts first, then Postfix (Postfix would tempfail or defer without it anyway).
"""

from __future__ import annotations

import email.message
import time
from typing import Any, Mapping, Sequence

from harness.filterd import FilterdDaemon
from harness.ports import free_port
from harness.postfix import DEFAULT_USERS, PostfixInstance, Reply


class MailRig:
    def __init__(self, mode: str = "milter", *,
                 filterd_overrides: Mapping[str, Any] | None = None,
                 postfix_placeholders: Mapping[str, object] | None = None,
                 postfix_main_cf: Mapping[str, object] | None = None,
                 users: Sequence[str] = DEFAULT_USERS):
        self.mode = mode
        ports = {k: free_port() for k in ("milter", "filter", "reinject", "release")}
        self.filterd = FilterdDaemon(filterd_overrides, milter_port=ports["milter"],
                                     smtp_port=ports["filter"],
                                     reinject_port=ports["reinject"],
                                     release_port=ports["release"])
        self.postfix = PostfixInstance(mode, milter_port=ports["milter"],
                                       filter_port=ports["filter"],
                                       reinject_port=ports["reinject"],
                                       release_port=ports["release"], users=users,
                                       placeholders=postfix_placeholders,
                                       main_cf=postfix_main_cf)

    def start(self) -> "MailRig":
        try:
            self.filterd.start()
            self.postfix.start()
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        try:
            self.postfix.close()
        finally:
            self.filterd.close()

    def __enter__(self) -> "MailRig":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def heal(self) -> None:
        """After a test that stopped or killed a part: start what is not running."""
        if not self.filterd.running:
            self.filterd.start()
        if not self.postfix.running:
            self.postfix.start()

    def reset(self) -> None:
        """Between tests: heal, empty the queue and the mailboxes."""
        self.heal()
        self.postfix.reset()

    # --- the Postfix side, for brevity ---------------------------------------------------
    def send(self, msg: bytes | str | email.message.Message,
             mail_from: str = "sender@client.test",
             rcpts: str | Sequence[str] = ("user@test.example",), **kw: Any) -> Reply:
        return self.postfix.send(msg, mail_from, rcpts, **kw)

    def mailbox(self, user: str) -> list[bytes]:
        return self.postfix.mailbox(user)

    def wait_delivered(self, user: str, n: int = 1, timeout: float = 30.0, *,
                       exact: bool = True) -> list[bytes]:
        try:
            return self.postfix.wait_delivered(user, n, timeout, exact=exact)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.filterd.log_tail()}") from None

    def queue_ids(self) -> list[str]:
        return self.postfix.queue_ids()

    def settled_queue_ids(self, tries: int = 20) -> set[str]:
        """Every queue ID Postfix holds, while its queue manager may still be moving files.

        One `postqueue` listing can miss a message that qmgr moves from active/ to deferred/
        during the directory scan (seen: the file was in deferred/, the next listing had it),
        so take the union of listings until two in a row agree.
        """
        seen: set[str] = set()
        last: set[str] | None = None
        for _ in range(tries):
            now = set(self.queue_ids())
            seen |= now
            if now == last:
                break
            last = now
            time.sleep(0.3)
        return seen

    def flush(self) -> None:
        self.postfix.flush()

    def wait_queue_empty(self, timeout: float = 30.0) -> None:
        try:
            self.postfix.wait_queue_empty(timeout)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.filterd.log_tail()}") from None

    def maillog(self) -> str:
        return self.postfix.maillog()

    def logs(self) -> str:
        """Tails of the maillog and filterd's log, for assertion messages."""
        return f"{self.postfix.maillog_tail()}\n{self.filterd.log_tail()}"
