"""The daemon's own settings: every key typed, defaulted and documented here, in one place.

Trusts: the TOML file named by --config (default /etc/filterd/filterd.toml); a missing default
file means "built-in defaults", a missing file named explicitly is an error.
Reads: FILTERD_CONFIG, FILTERD_STATE_DIR from the environment (the CLI passes them in).

Policy (scores, levels, forced actions) is not here: it is data in rules/ (filterd.ruleset).
Unknown keys are errors, never silently ignored: a typo must not leave a site on a default.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

DEFAULT_CONFIG = Path("/etc/filterd/filterd.toml")
DEFAULT_STATE_DIR = Path("/var/lib/filterd")
PROJECT_RULES = Path(__file__).resolve().parents[2] / "rules"


class ConfigError(Exception):
    """A problem in one configuration file, naming the file, the key and the problem."""

    def __init__(self, source: str, key: str, problem: str):
        self.source, self.key, self.problem = source, key, problem
        super().__init__(f"{source}: {key}: {problem}")


@dataclass(frozen=True, slots=True)
class Setting:
    key: str                     # "section.name"
    kind: str                    # bool, int, float, str, list, choice, networks, hostport
    default: Any
    doc: str
    choices: tuple[str, ...] = ()
    minimum: float | None = None

    @property
    def section(self) -> str:
        return self.key.partition(".")[0]

    @property
    def name(self) -> str:
        return self.key.partition(".")[2]


_PRIVATE_NETS = ["127.0.0.0/8", "::1/128", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16",
                 "fc00::/7", "fe80::/10"]

SETTINGS: tuple[Setting, ...] = (
    # --- daemon ------------------------------------------------------------------------
    Setting("daemon.state_dir", "str", str(DEFAULT_STATE_DIR),
            "Where all embedded state lives (quarantine, Bayes, caches, control socket). "
            "--state-dir and FILTERD_STATE_DIR override it."),
    Setting("daemon.user", "str", "",
            "User that `filterd serve` switches to when started as root (it must be able to read "
            "the Python installation); '' keeps the starting user. The systemd unit runs filterd "
            "as the unprivileged user filterd from the start, which is the recommended way."),
    Setting("daemon.hostname", "str", "",
            "This host's name in X-Virus-Scanned and logs; '' means the machine's FQDN."),
    Setting("daemon.max_concurrent_scans", "int", 32,
            "Messages scanned at once across both front ends; more wait (the MTA's timeouts "
            "apply).", minimum=1),
    Setting("daemon.pending_data_limit", "int", 256 * 1024 * 1024,
            "Bytes of message data the SMTP, LMTP and milter front ends hold at once, from the "
            "first byte to the reply (memory or spool file); past it new data is tempfailed "
            "(452 4.3.1), a message alone always fits up to its front end's size limit.",
            minimum=1024 * 1024),
    Setting("log.format", "choice", "kv", "One line per message as key=value or JSON.",
            choices=("kv", "json")),
    Setting("log.level", "choice", "info", "Least severe level logged (debug shows every check).",
            choices=("debug", "info", "warning", "error")),
    Setting("log.target", "choice", "stderr",
            "Where logs go: stderr (journald picks it up under systemd), syslog, or journald "
            "(native protocol: each per-message key also becomes a FILTERD_* journal field).",
            choices=("stderr", "syslog", "journald")),
    Setting("log.syslog_address", "str", "/dev/log",
            "Syslog socket path, or HOST:PORT for UDP syslog (log.target = syslog)."),
    Setting("log.syslog_facility", "choice", "mail", "Syslog facility (log.target = syslog).",
            choices=("mail", "daemon", "user", "local0", "local1", "local2", "local3", "local4",
                     "local5", "local6", "local7")),
    # --- rules / policy data -----------------------------------------------------------
    Setting("rules.dir", "str", "",
            "Shipped rule set (never edited); '' means the one installed with filterd."),
    Setting("rules.site_dir", "str", "",
            "Site layer with local.d/ (merged) and override.d/ (replacing) rule files; '' means "
            "the directory of the config file."),
    Setting("rules.engine", "choice", "auto",
            "Pattern matching: auto (Hyperscan multi-pattern pass when installed, exact where "
            "the pattern allows, else one regex per rule), prefilter (every Hyperscan candidate "
            "confirmed by regex) or re (always one regex per rule).",
            choices=("auto", "prefilter", "re")),
    Setting("rules.rule_timeout", "float", 0.25,
            "Seconds one pattern rule may spend on one text before it yields RULE_ERROR; a rule "
            "may set its own `timeout`.", minimum=0.001),
    Setting("rules.compile_cache", "str", "",
            "Directory that keeps the compiled Hyperscan databases of the rule set, so that a "
            "restart, reload or `filterd scan` with unchanged rules compiles nothing (compiling "
            "takes seconds, a minute for imported SpamAssassin rules); '' means "
            "<state_dir>/rules-cache, 'off' keeps them in memory only."),
    # --- scanning ------------------------------------------------------------------------
    Setting("scan.deadline", "float", 60.0,
            "Seconds one message may take in total; past it the message is tempfailed.",
            minimum=0.1),
    Setting("scan.check_timeout", "float", 20.0,
            "Default seconds for one check inside the deadline; a check that overruns adds "
            "CHECK_TIMEOUT (score 0) and the scan goes on.", minimum=0.01),
    Setting("scan.content_size_limit", "int", 1024 * 1024,
            "Bytes of a message the content checks (rules, Bayes, sanity) read; antivirus and "
            "quarantine always get the whole message (amavis: sa_mail_body_size_limit).",
            minimum=1024),
    Setting("scan.max_mime_depth", "int", 20,
            "MIME entities nested deeper than this give MIME_NESTING_TOO_DEEP and are not "
            "searched for alternative readings (amavis: $MAXLEVELS).", minimum=1),
    Setting("scan.content_cpu_budget", "float", 1.0,
            "CPU seconds the content checks (MIME decoding, rules, evals, Bayes tokens, URI "
            "domains) may spend on one message; past it the rest are skipped and "
            "CONTENT_BUDGET is added (a verdict, never a tempfail). 0 means no budget.",
            minimum=0.0),
    Setting("scan.content_workers", "int", 2,
            "Processes that run the content checks, so that a message costly to analyse never "
            "holds the others (each runs one message at a time; more messages wait for one). "
            "0 runs them on the event loop: no isolation, for tools and debugging.",
            minimum=0),
    Setting("scan.trusted_networks", "networks", ["127.0.0.0/8", "::1/128"],
            "Relays whose Received headers are trusted when finding the last external relay."),
    Setting("scan.mynetworks", "networks", _PRIVATE_NETS,
            "Clients whose mail is 'originating' (outbound): scanned for viruses, never "
            "spam-tagged (amavis: @mynetworks)."),
    # --- milter front end ----------------------------------------------------------------
    Setting("milter.enabled", "bool", True, "Serve the milter protocol (Postfix smtpd_milters)."),
    Setting("milter.listen", "str", "inet:8890@127.0.0.1",
            "libmilter socket spec: inet:PORT@HOST, inet6:PORT@HOST or unix:/path."),
    Setting("milter.socket_group", "str", "",
            "Group of a unix milter socket (created 0660) so Postfix can connect, e.g. "
            "'postfix' (filterd's user must be a member); '' keeps filterd's own group."),
    Setting("milter.timeout", "int", 600,
            "Seconds libmilter waits on an idle MTA connection.", minimum=1),
    Setting("milter.max_message_size", "int", 64 * 1024 * 1024,
            "Largest message (header lines and body as the MTA sends them) the milter buffers; "
            "larger ones are refused with 552 5.3.4 (keep >= Postfix message_size_limit).",
            minimum=1024),
    Setting("milter.max_headers", "int", 10000,
            "Most header fields one message may have in milter mode; more are refused with "
            "552 5.6.0 (Postfix bounds each field to header_size_limit).", minimum=100),
    Setting("milter.quarantine_reply", "choice", "discard",
            "After quarantining in milter mode: 'discard' (client gets 250) or 'reject' (550).",
            choices=("discard", "reject")),
    # --- after-queue SMTP front end ------------------------------------------------------
    Setting("smtp.enabled", "bool", True,
            "Serve the after-queue content filter (Postfix content_filter) over SMTP."),
    Setting("smtp.listen", "hostport", "127.0.0.1:10024", "Address the SMTP filter listens on."),
    Setting("smtp.xforward_peers", "networks", ["127.0.0.0/8", "::1/128"],
            "Clients allowed to send XFORWARD (the real client IP/HELO); others are refused."),
    Setting("smtp.reinject", "hostport", "127.0.0.1:10025",
            "Postfix listener without content_filter or milters that takes filtered mail back."),
    Setting("smtp.reinject_timeout", "float", 120.0, "Seconds for one reinjection.", minimum=1),
    Setting("smtp.max_message_size", "int", 64 * 1024 * 1024,
            "Largest message the SMTP filter accepts, advertised as ESMTP SIZE; larger ones get "
            "552 5.3.4 (keep >= Postfix message_size_limit).", minimum=1024),
    Setting("smtp.max_line_length", "int", 256 * 1024,
            "Bytes the SMTP filter buffers looking for one line's end: a longer command line gets "
            "500, a longer DATA line is taken in pieces (Postfix folds at "
            "smtp_line_length_limit, 998).", minimum=1024),
    Setting("smtp.max_connections", "int", 100,
            "Connections the SMTP and LMTP listeners serve at once; more get 421 4.3.2 and "
            "Postfix retries (keep >= the filter transport's maxproc).", minimum=1),
    Setting("smtp.reject_action", "choice", "quarantine",
            "What a 'reject' verdict does after queue: 'quarantine' (no bounce to a likely "
            "forged sender), 'discard' or 'reject' (550: Postfix bounces).",
            choices=("quarantine", "discard", "reject")),
    # --- headers -------------------------------------------------------------------------
    Setting("headers.virus_scanned", "str", "filterd at {hostname}",
            "X-Virus-Scanned value on scanned mail ({hostname} is daemon.hostname)."),
    Setting("headers.remove_incoming", "list",
            ["X-Spam-Flag", "X-Spam-Score", "X-Spam-Level", "X-Spam-Status", "X-Spam-Report",
             "X-Virus-Scanned", "X-Virus-Status", "X-Filterd-*"],
            "Incoming headers removed before ours are added, so a sender cannot forge a "
            "verdict; a trailing * matches a prefix. No other header is touched."),
    Setting("headers.always_add_spam_headers", "bool", False,
            "Add X-Spam-* below tag_level too (amavis: tag_level = -999)."),
    # --- quarantine ----------------------------------------------------------------------
    Setting("quarantine.dir", "str", "",
            "Quarantine spool; '' means <state_dir>/quarantine."),
    Setting("quarantine.retention_days", "int", 30,
            "Days a quarantined message is kept before expiry.", minimum=1),
    Setting("quarantine.release_via", "hostport", "127.0.0.1:10026",
            "Postfix listener with no filters that takes released messages."),
    Setting("quarantine.release_timeout", "float", 60.0,
            "Seconds one release (or notification) may take talking to release_via.", minimum=1),
    Setting("quarantine.release_header", "str", "X-Filterd-Released",
            "Header added to a released message (ID, who, when); '' adds none. Nothing else "
            "of the stored message changes."),
    Setting("quarantine.quarantine_on_reject", "list", ["virus", "banned"],
            "Categories (spam, virus, banned, bad-header, policy) of which a rejected message "
            "also keeps a quarantined copy."),
    Setting("quarantine.notify_admin", "str", "",
            "Address that gets a notice for each item of notify_categories; '' sends none."),
    Setting("quarantine.notify_categories", "list", ["virus", "banned"],
            "Categories that trigger an admin notice."),
    Setting("quarantine.notify_from", "str", "",
            "From: of notices and digests; '' means postmaster@<daemon.hostname>."),
    Setting("quarantine.notify_via", "str", "",
            "Listener (HOST:PORT) for notices and digests; '' means release_via."),
    Setting("quarantine.digest_hours", "int", 0,
            "Hours between digests to each recipient listing their held items; 0 sends none.",
            minimum=0),
    Setting("quarantine.templates", "str", "",
            "TOML file overriding the built-in notice/digest templates key by key; '' keeps "
            "them."),
    # --- control socket ------------------------------------------------------------------
    Setting("control.socket", "str", "",
            "Unix socket (0600) for `filterd reload|status`; '' means <state_dir>/control.sock."),
    # --- metrics, health and replay (filterd.metrics, filterd.health, filterd.replay) -----
    Setting("metrics.listen", "str", "127.0.0.1:9750",
            "HOST:PORT of the Prometheus endpoint (/metrics) `filterd serve` opens; '' disables "
            "it. Keep it on loopback or behind a firewall: it names symbols and actions."),
    Setting("metrics.health_interval", "float", 30.0,
            "Seconds a component health result (clamd, DNS, stores, reinjection) is reused "
            "between scrapes, so scraping never hammers the services.", minimum=1.0),
    Setting("metrics.health_timeout", "float", 3.0,
            "Seconds one health probe (`filterd health` and the metrics gauges) may take.",
            minimum=0.1),
    Setting("replay.fp_target", "float", 0.001,
            "Share of ham allowed as false positives when `filterd replay` reports the FN rate "
            "at equal FP (0.001 = 0.1 %).", minimum=0.0),
    Setting("replay.slowest", "int", 10, "How many of the slowest messages replay lists.",
            minimum=0),
    # --- ClamAV (filterd.checks.antivirus) --------------------------------------------------
    Setting("clamav.socket", "str", "/run/clamav/clamd.ctl",
            "clamd's unix socket (clamd.conf LocalSocket; Debian: /run/clamav/clamd.ctl); used "
            "when clamav.tcp is empty."),
    Setting("clamav.tcp", "str", "",
            "clamd's TCP address HOST:PORT (clamd.conf TCPAddr/TCPSocket); '' uses clamav.socket."),
    Setting("clamav.connect_timeout", "float", 5.0,
            "Seconds to connect to clamd; failing adds CLAM_UNAVAILABLE.", minimum=0.05),
    Setting("clamav.timeout", "float", 15.0,
            "Seconds one scan may take in all (waiting for a connection slot included); past "
            "it CLAM_UNAVAILABLE. Keep it below the clamav check's timeout.", minimum=0.1),
    Setting("clamav.stream_max_length", "int", 25 * 1024 * 1024,
            "Keep equal to clamd.conf StreamMaxLength (clamd's default 25M): a larger message is "
            "not sent and gets CLAM_OVERSIZE (what that does is in rules/antivirus.toml).",
            minimum=1024),
    Setting("clamav.max_connections", "int", 4,
            "Scans sent to clamd at once; more messages wait inside their deadline (keep at or "
            "below clamd.conf MaxThreads).", minimum=1),
    # --- DNS resolver (filterd.dns) ------------------------------------------------------
    Setting("dns.nameservers", "list", ["127.0.0.1"],
            "IP addresses of the recursive resolver(s) all DNS checks ask (/etc/resolv.conf is "
            "never read); use a local unbound, not a public resolver: DNS lists block those."),
    Setting("dns.port", "int", 53, "UDP/TCP port of dns.nameservers.", minimum=1),
    Setting("dns.timeout", "float", 2.0,
            "Seconds one query may take (also bounded by what is left of scan.deadline); a "
            "timeout adds DNS_TIMEOUT (score 0), never a spam score.", minimum=0.05),
    Setting("dns.cache_size", "int", 20000,
            "Answers kept in the in-process TTL cache (LRU); 0 disables it.", minimum=0),
    Setting("dns.min_ttl", "int", 0, "Shortest time a positive answer is cached, in seconds.",
            minimum=0),
    Setting("dns.max_ttl", "int", 86400, "Longest time any answer is cached, in seconds.",
            minimum=0),
    Setting("dns.negative_ttl", "int", 300,
            "Longest time an NXDOMAIN/empty answer is cached (RFC 2308 SOA minimum, capped).",
            minimum=0),
    Setting("dns.max_lookups_per_message", "int", 100,
            "Network queries one message may cause across all DNS checks; past it queries are "
            "skipped and DNS_LOOKUP_LIMIT (score 0) is added.", minimum=1),
    # --- sender authentication and DKIM signing (filterd.checks.auth, actions.dkim_sign) --
    Setting("dkim.authserv_id", "str", "",
            "authserv-id of our Authentication-Results header (RFC 8601); '' means "
            "daemon.hostname. Incoming Authentication-Results with this id are removed."),
    Setting("dkim.verify_min_key_bits", "int", 1024,
            "RSA keys shorter than this make a DKIM signature fail verification.", minimum=512),
    Setting("dkim.sign", "bool", True,
            "DKIM-sign originating mail (scan.mynetworks or SMTP AUTH) whose From domain has a "
            "key in dkim.keys_dir."),
    Setting("dkim.keys_dir", "str", "",
            "Signing keys as <dir>/<domain>/<selector>.key (written by `filterd dkim genkey`); "
            "'' means <state_dir>/dkim."),
    Setting("dkim.selectors", "list", [],
            "domain=selector pairs choosing the key per signing domain; a domain not listed "
            "uses its only key file (several without an entry: not signed, logged)."),
    Setting("dkim.sign_headers", "list",
            ["From", "Sender", "Reply-To", "Subject", "Date", "Message-ID", "To", "Cc",
             "MIME-Version", "Content-Type", "Content-Transfer-Encoding", "In-Reply-To",
             "References", "List-Id", "List-Unsubscribe"],
            "Headers signed when present; From is always signed."),
    Setting("dkim.oversign_headers", "list", ["From", "Subject", "Date", "To", "Cc"],
            "Headers also signed once more than present, so none can be added after signing."),
    # --- Bayes learner (filterd.bayes, filterd.stores, filterd.checks.bayes) ---------------
    Setting("bayes.enabled", "bool", True,
            "Classify with the Bayes learner (BAYES_* symbols) and autolearn."),
    Setting("bayes.backend", "choice", "sqlite",
            "Token store: 'sqlite' (one file, embedded) or 'redis' (shared by several nodes).",
            choices=("sqlite", "redis")),
    Setting("bayes.path", "str", "",
            "SQLite database file; '' means <state_dir>/bayes.sqlite."),
    Setting("bayes.redis_url", "str", "redis://127.0.0.1:6379/0",
            "Redis server of the shared store (bayes.backend = redis)."),
    Setting("bayes.redis_prefix", "str", "filterd:bayes:",
            "Key prefix in Redis, so several databases can share one server."),
    Setting("bayes.min_spam", "int", 200,
            "Spam messages that must be learned before Bayes votes (BAYES_UNTRAINED before).",
            minimum=1),
    Setting("bayes.min_ham", "int", 200,
            "Ham messages that must be learned before Bayes votes (BAYES_UNTRAINED before).",
            minimum=1),
    Setting("bayes.max_tokens", "int", 3000,
            "Most tokens taken from one message (headers first, then body words).", minimum=10),
    Setting("bayes.bigrams", "bool", False,
            "Also learn sparse word pairs (OSB): 8x the tokens, no better on our corpora "
            "(docs/bayes.md)."),
    Setting("bayes.robinson_s", "float", 0.2,
            "Strength of the prior for rarely seen tokens (Robinson's s).", minimum=0.001),
    Setting("bayes.robinson_x", "float", 0.5,
            "Spam probability assumed for a token never seen (Robinson's x)."),
    Setting("bayes.min_dev", "float", 0.375,
            "Tokens whose probability is closer than this to 0.5 are ignored.", minimum=0.0),
    Setting("bayes.max_significant", "int", 100,
            "Most tokens (the strongest) combined per message.", minimum=1),
    Setting("bayes.prefixed_weight", "float", 0.25,
            "Weight of the second Fisher combination over the prefixed tokens alone "
            "(headers, relays, URLs, MIME/HTML structure) added to the score; 0: off. The "
            "shipped calibration is fitted for 0.25 (docs/bayes.md).", minimum=0.0),
    Setting("bayes.calibrate", "bool", True,
            "Map the classifier's score to a spam probability fitted on the corpora, so "
            "BAYES_* bands mean what they say (docs/bayes.md); off: Fisher's raw p."),
    Setting("bayes.autolearn", "bool", True,
            "Learn scanned mail whose score without BAYES_* crosses the thresholds below; "
            "never a message that was learned already."),
    Setting("bayes.autolearn_spam", "float", 12.0,
            "Score (BAYES_* excluded) at or above which a message is autolearned as spam."),
    Setting("bayes.autolearn_ham", "float", -1.0,
            "Score (BAYES_* excluded) at or below which a message is autolearned as ham."),
    Setting("bayes.batch_size", "int", 500,
            "Messages per store transaction when learning (`filterd learn`, autolearn).",
            minimum=1),
    Setting("bayes.token_max_age_days", "int", 180,
            "Expiry removes tokens not learned for this many days.", minimum=1),
    Setting("bayes.max_db_tokens", "int", 1_500_000,
            "Expiry then removes the least recently learned tokens down to this many.",
            minimum=1000),
    Setting("bayes.expire_interval", "float", 86400.0,
            "Seconds between expiry runs in the daemon; 0 disables them (run `filterd bayes "
            "expire` from cron instead).", minimum=0),
    # --- policy per site, domain and recipient (docs/policy.md) ------------------------
    Setting("policy.local_domains", "list", [],
            "Domains whose recipients are ours ('example.com'; '.example.com' adds its "
            "subdomains): only they get X-Spam-* headers and the subject tag (amavis: "
            "@local_domains_maps). Empty: every recipient is local."),
    Setting("policy.recipient_map", "str", "",
            "TOML file of per-recipient and per-domain settings (keys user@domain, @domain, "
            "@.domain, @.); relative to the site directory; '' for none."),
    Setting("policy.recipient_db", "str", "",
            "SQLite database of the same settings (table recipient_policy), for large sites; "
            "relative to the site directory; '' for none. Its rows win over the map's."),
    Setting("policy.recipient_delimiter", "str", "+",
            "Characters that start an address extension (user+ext@domain is looked up as "
            "user@domain too), as Postfix's recipient_delimiter; '' for none."),
    Setting("policy.smtp_extra_listen", "hostports", [],
            "More after-queue SMTP listeners (HOST:PORT), e.g. one for the submission "
            "service's content_filter; policy banks select on their `port`."),
    Setting("lmtp.listen", "hostport?", "",
            "HOST:PORT of an LMTP listener (Postfix content_filter = lmtp:...) that answers "
            "each recipient separately; '' disables it."),
)

BY_KEY: dict[str, Setting] = {s.key: s for s in SETTINGS}
SECTIONS: tuple[str, ...] = tuple(dict.fromkeys(s.section for s in SETTINGS))


def _check_networks(value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError("expected a list of networks such as [\"127.0.0.0/8\"]")
    for v in value:
        try:
            ipaddress.ip_network(v, strict=False)
        except ValueError:
            raise ValueError(f"{v!r} is not an IP network") from None
    return list(value)


def _check_hostport(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("expected \"HOST:PORT\"")
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{value!r} is not HOST:PORT")
    return value


def coerce(setting: Setting, value: Any) -> Any:
    """Validate one value against its setting; raises ValueError with the problem."""
    kind = setting.kind
    if kind == "bool":
        if not isinstance(value, bool):
            raise ValueError(f"expected true or false, got {value!r}")
    elif kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"expected an integer, got {value!r}")
    elif kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"expected a number, got {value!r}")
        value = float(value)
    elif kind == "str":
        if not isinstance(value, str):
            raise ValueError(f"expected a string, got {value!r}")
    elif kind == "list":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"expected a list of strings, got {value!r}")
    elif kind == "choice":
        if value not in setting.choices:
            raise ValueError(f"expected one of {', '.join(setting.choices)}, got {value!r}")
    elif kind == "networks":
        value = _check_networks(value)
    elif kind == "hostport":
        value = _check_hostport(value)
    elif kind == "hostport?":  # HOST:PORT, or '' for "off"
        value = _check_hostport(value) if value != "" else value
    elif kind == "hostports":
        if not isinstance(value, list):
            raise ValueError("expected a list of \"HOST:PORT\"")
        value = [_check_hostport(v) for v in value]
    if setting.minimum is not None and value < setting.minimum:
        raise ValueError(f"must be at least {setting.minimum:g}, got {value!r}")
    return value


class Section:
    __slots__ = ("_name", "_values")

    def __init__(self, name: str, values: dict[str, Any]):
        self._name, self._values = name, values

    def __getattr__(self, item: str) -> Any:
        try:
            return self._values[item]
        except KeyError:
            raise AttributeError(f"no setting {self._name}.{item}") from None


class Settings:
    """Validated settings: `settings.smtp.listen`, `settings.get("smtp.listen")`."""

    def __init__(self, values: dict[str, Any], sources: dict[str, str], path: Path | None):
        self._values = values
        self._sources = sources
        self.path = path
        self._sections = {sec: Section(sec, {s.name: values[s.key] for s in SETTINGS
                                             if s.section == sec}) for sec in SECTIONS}

    def __getattr__(self, item: str) -> Section:
        try:
            return self._sections[item]
        except KeyError:
            raise AttributeError(f"no settings section {item}") from None

    def get(self, key: str) -> Any:
        return self._values[key]

    def source(self, key: str) -> str:
        return self._sources.get(key, "default")

    def items(self) -> Iterable[tuple[Setting, Any]]:
        return ((s, self._values[s.key]) for s in SETTINGS)

    # --- derived paths -------------------------------------------------------------------
    @property
    def state_dir(self) -> Path:
        return Path(self.daemon.state_dir)

    @property
    def compile_cache_dir(self) -> Path | None:
        value = self.rules.compile_cache
        if value == "off":
            return None
        return Path(value) if value else self.state_dir / "rules-cache"

    @property
    def rules_dir(self) -> Path:
        return Path(self.rules.dir) if self.rules.dir else PROJECT_RULES

    @property
    def site_rules_dir(self) -> Path | None:
        if self.rules.site_dir:
            return Path(self.rules.site_dir)
        return self.path.parent if self.path is not None else None

    @property
    def quarantine_dir(self) -> Path:
        return Path(self.quarantine.dir) if self.quarantine.dir else self.state_dir / "quarantine"

    @property
    def control_socket(self) -> Path:
        return Path(self.control.socket) if self.control.socket else self.state_dir / "control.sock"

    @property
    def hostname(self) -> str:
        if self.daemon.hostname:
            return self.daemon.hostname
        import socket
        return socket.getfqdn()

    def with_overrides(self, overrides: dict[str, Any], source: str = "override") -> "Settings":
        values, sources = dict(self._values), dict(self._sources)
        for key, value in overrides.items():
            setting = BY_KEY.get(key)
            if setting is None:
                raise ConfigError(source, key, "unknown setting")
            try:
                values[key] = coerce(setting, value)
            except ValueError as exc:
                raise ConfigError(source, key, str(exc)) from None
            sources[key] = source
        return Settings(values, sources, self.path)


def load(path: Path | str | None = None, *, state_dir: str | None = None,
         explicit: bool | None = None) -> Settings:
    """Load settings from a TOML file layered over the defaults.

    `path` None means FILTERD_CONFIG or the default path; the default path may be absent.
    """
    if explicit is None:
        explicit = path is not None or "FILTERD_CONFIG" in os.environ
    if path is None:
        path = os.environ.get("FILTERD_CONFIG") or DEFAULT_CONFIG
    path = Path(path)
    values = {s.key: s.default for s in SETTINGS}
    sources: dict[str, str] = {}
    used_path: Path | None = None
    if path.exists():
        used_path = path
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(str(path), "(syntax)", str(exc)) from None
        except OSError as exc:
            raise ConfigError(str(path), "(file)", exc.strerror or str(exc)) from None
        for section, table in data.items():
            if section not in SECTIONS:
                raise ConfigError(str(path), section,
                                  f"unknown section (known: {', '.join(SECTIONS)})")
            if not isinstance(table, dict):
                raise ConfigError(str(path), section, "expected a [section] table")
            for name, value in table.items():
                key = f"{section}.{name}"
                setting = BY_KEY.get(key)
                if setting is None:
                    raise ConfigError(str(path), key, "unknown setting")
                try:
                    values[key] = coerce(setting, value)
                except ValueError as exc:
                    raise ConfigError(str(path), key, str(exc)) from None
                sources[key] = str(path)
    elif explicit:
        raise ConfigError(str(path), "(file)", "no such file")
    env_state = os.environ.get("FILTERD_STATE_DIR")
    if state_dir:
        values["daemon.state_dir"], sources["daemon.state_dir"] = state_dir, "--state-dir"
    elif env_state:
        values["daemon.state_dir"], sources["daemon.state_dir"] = env_state, "FILTERD_STATE_DIR"
    return Settings(values, sources, used_path)


def defaults() -> Settings:
    return Settings({s.key: s.default for s in SETTINGS}, {}, None)


def render_toml(settings: Settings, *, non_default: bool = False, docs: bool = True) -> str:
    """The settings as a TOML document, each key with its one-line doc."""
    import json
    lines: list[str] = []
    current = None
    for setting, value in settings.items():
        if non_default and value == setting.default:
            continue
        if setting.section != current:
            current = setting.section
            lines.append(("\n" if lines else "") + f"[{current}]")
        if docs:
            lines.append(f"# {setting.doc}")
        src = settings.source(setting.key)
        suffix = f"  # from {src}" if src != "default" else ""
        lines.append(f"{setting.name} = {json.dumps(value)}{suffix}")
    return "\n".join(lines) + "\n"


Validator = Callable[[Any], Any]
