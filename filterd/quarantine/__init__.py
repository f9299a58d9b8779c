"""The quarantine: durable storage of messages that are not delivered, and what admins do with it.

Trusts: the spool directory (quarantine.dir); callers (both front ends) tempfail the message
when put() raises, so nothing is ever dropped: put() returns only after the message and its
sidecar are fsynced and renamed into place.
Reads: quarantine.* (see filterd/config), daemon.state_dir.
Emits: no symbols.

Modules: store (interface, values, ID rules, categories), spool (the embedded backend: files +
sidecars), index (SQLite WAL index, rebuildable), service (release/expire/show), notify (admin
notices and recipient digests). The on-disk contract is quarantine/README.md at the top of the
repository. `maintenance()` is the daemon's periodic task: reconcile the index with the newest
sidecars, expire old items, send due notifications.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

from filterd.quarantine.spool import SpoolStore, new_id
from filterd.quarantine.store import (
    CATEGORIES, SCHEMA_VERSION, STATES, InvalidId, Item, NoSuchItem, QuarantineError,
    QuarantineStore, Query, ReindexReport, StoredItem, category_of, check_id, sidecar)

log = logging.getLogger("filterd.quarantine")

MAINTENANCE_INTERVAL = 300.0  # seconds between runs of maintenance() inside the daemon

_stores: dict[Path, SpoolStore] = {}
_stores_lock = threading.Lock()


def open_store(settings: Any) -> SpoolStore:
    """The store for these settings; one instance per directory and process (it holds the
    index connection)."""
    directory = Path(settings.quarantine_dir)
    with _stores_lock:
        store = _stores.get(directory)
        if store is None:
            store = _stores[directory] = SpoolStore(directory)
            try:
                # a crash between a sidecar's rename and its index row leaves the row out;
                # pick such items up once per process, before anyone lists
                added = store.reconcile(days=2)
                if added:
                    log.info("quarantine index: added %d item(s) missing after a crash", added)
            except (OSError, QuarantineError) as exc:
                log.error("quarantine %s not usable yet: %s", directory, exc)
            except Exception as exc:  # sqlite3.Error and friends: the index is derived data
                log.error("quarantine index %s not usable (run `filterd quarantine reindex`): "
                          "%s", directory, exc)
        return store


def maintenance(settings: Any) -> dict[str, int]:
    """The daemon's periodic quarantine job; returns what it did (for logs and tests)."""
    store = open_store(settings)
    done = {"indexed": 0, "expired": 0, "notices": 0, "digests": 0}
    done["indexed"] = store.reconcile(days=2)
    expired = store.expire(time.time() - settings.quarantine.retention_days * 86400)
    done["expired"] = len(expired)
    if expired:
        log.info("quarantine expiry removed %d item(s) older than %d days", len(expired),
                 settings.quarantine.retention_days)
    from filterd.quarantine import notify
    sent = notify.run(settings, store)
    done["notices"], done["digests"] = sent.notices, sent.digests
    for key in ("indexed", "notices", "digests"):
        if done[key]:
            log.info("quarantine maintenance: %s=%d", key, done[key])
    return done


__all__ = ["CATEGORIES", "STATES", "SCHEMA_VERSION", "QuarantineError", "InvalidId", "NoSuchItem",
           "QuarantineStore", "SpoolStore", "StoredItem", "Item", "Query", "ReindexReport",
           "category_of", "check_id", "sidecar", "new_id", "open_store",
           "maintenance", "MAINTENANCE_INTERVAL"]
