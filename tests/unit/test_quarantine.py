"""The quarantine store, its index, release/expire, notifications and the CLI.

Release goes to a real SMTP listener on loopback (aiosmtpd) that can be told to refuse; the store
writes to a real directory. Nothing of filterd is mocked.
"""

import asyncio
import hashlib
import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller

from filterd import config
from filterd.cli.main import main as cli_main
from filterd.message import Envelope
from filterd.policy import Action, Symbol, Verdict
from filterd.quarantine import (InvalidId, NoSuchItem, QuarantineError, Query, SpoolStore,
                                category_of, maintenance, notify, open_store)
from filterd.quarantine.index import SCHEMA_SQL
from filterd.quarantine.service import (AlreadyReleased, ReleaseRefused, add_release_header,
                                        parse_when, release)

REPO = Path(__file__).resolve().parents[2]
CONTRACT = REPO / "quarantine"
GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"
RAW = (b"From: a@example.org\r\nTo: u@test.example\r\nSubject: =?utf-8?q?caf=C3=A9?= offer\r\n"
       b"Message-ID: <m1@example.org>\r\n\r\n" + GTUBE.encode() + b"\r\nline two\r\n")
SPAM = Verdict(Action.QUARANTINE, 1000.0, (Symbol("GTUBE", (), 1000.0),),
               "spam score 1000 >= kill_level 10", 6.0, True, True)
VIRUS = Verdict(Action.REJECT, 0.0, (Symbol("CLAM_VIRUS", ("Eicar-Test",), 0.0),),
                "virus Eicar-Test", 6.0, False, False, ("Eicar-Test",))
BAD_IDS = ["../../etc/passwd", "20261122T101500-3f9a0c41d2/../x", "/etc/passwd", "",
           "20261122T101500-3F9A0C41D2", "20261122T101500-3f9a0c41d", "x" * 300,
           "20261122T101500-3f9a0c41d2\n", ".", "..", "20261122t101500-3f9a0c41d2"]


def env(queue_id="QID1", rcpts=("u@test.example",), sender="a@example.org"):
    return Envelope(sender, tuple(rcpts), "192.0.2.1", "client.example", queue_id=queue_id,
                    listener="smtp")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Sink:
    """A release listener on loopback: records deliveries, or refuses as told."""

    def __init__(self):
        self.messages: list[tuple[str, list[str], bytes]] = []
        self.data_reply: str | None = None
        self.refuse_rcpt: str | None = None
        self.delay = 0.0

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if self.refuse_rcpt and address == self.refuse_rcpt:
            return "550 5.1.1 <%s>: Recipient address rejected: User unknown" % address
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.data_reply:
            return self.data_reply
        self.messages.append((envelope.mail_from, list(envelope.rcpt_tos),
                              envelope.original_content))
        return "250 2.0.0 Ok: queued"


@pytest.fixture
def sink():
    s = Sink()
    port = free_port()
    controller = Controller(s, hostname="127.0.0.1", port=port)
    controller.start()
    s.port = port
    yield s
    controller.stop()


@pytest.fixture
def settings(tmp_path, sink):
    return config.defaults().with_overrides({
        "daemon.state_dir": str(tmp_path / "state"), "daemon.hostname": "mx.test",
        "quarantine.release_via": f"127.0.0.1:{sink.port}", "quarantine.release_timeout": 10})


@pytest.fixture
def store(settings):
    return SpoolStore(settings.quarantine_dir)


# --- storing ---------------------------------------------------------------------------------

def test_put_stores_pristine_bytes_and_sidecar_with_modes(store):
    item = store.put(RAW, env(), SPAM)
    assert item.created and item.path.read_bytes() == RAW
    meta = json.loads(item.path.with_suffix(".json").read_text())
    assert meta["state"] == "held" and meta["category"] == "spam"
    assert meta["sha256"] == hashlib.sha256(RAW).hexdigest() and meta["size"] == len(RAW)
    assert meta["queue_id"] == "QID1" and meta["rcpt_tos"] == ["u@test.example"]
    assert meta["subject"] == "café offer" and meta["message_id"] == "<m1@example.org>"
    assert meta["symbols"] == [{"name": "GTUBE", "score": 1000.0, "options": []}]
    for path in (store.dir, item.path.parent, store.dir / "keys"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o750, path
    for path in (item.path, item.path.with_suffix(".json"), store.dir / "index.sqlite"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o640, path
    assert not list(item.path.parent.glob(".tmp.*"))


def test_put_is_idempotent_by_queue_id_and_digest(store):
    first = store.put(RAW, env(), SPAM)
    again = store.put(RAW, env(), SPAM)
    assert (again.id, again.created) == (first.id, False)
    other_qid = store.put(RAW, env(queue_id="QID2"), SPAM)
    other_body = store.put(RAW + b"x", env(), SPAM)
    no_qid_1 = store.put(RAW, env(queue_id=None), SPAM)
    no_qid_2 = store.put(RAW, env(queue_id=None), SPAM)
    ids = {first.id, other_qid.id, other_body.id, no_qid_1.id, no_qid_2.id}
    assert len(ids) == 5
    assert len(store.search(Query())) == 5


def test_retry_after_crash_between_marker_and_sidecar_completes_the_same_item(store):
    first = store.put(RAW, env(), SPAM)
    # simulate a crash after the marker and the message were written, before the sidecar
    sidecar = first.path.with_suffix(".json")
    sidecar.unlink()
    store.index.remove(first.id)
    assert store.search(Query()) == []  # a message without sidecar is not an item
    retry = store.put(RAW, env(), SPAM)
    assert retry.id == first.id and retry.created
    assert sidecar.exists() and [i.id for i in store.search(Query())] == [first.id]


def test_damaged_marker_is_taken_over(store):
    first = store.put(RAW, env(), SPAM)
    marker = next(p for p in (store.dir / "keys").iterdir() if not p.name.startswith("."))
    marker.write_text("../../garbage")
    retry = store.put(RAW, env(), SPAM)
    assert retry.created and retry.id != first.id
    assert marker.read_text() == retry.id


def test_unwritable_spool_raises_quarantine_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(QuarantineError, match="cannot store"):
        SpoolStore(blocker / "quarantine").put(RAW, env(), SPAM)


@pytest.mark.parametrize("bad", BAD_IDS)
def test_malformed_ids_never_reach_the_filesystem(store, bad):
    store.put(RAW, env(), SPAM)
    for op in (store.get, store.read_raw, store.delete):
        with pytest.raises(InvalidId):
            op(bad)
    with pytest.raises(InvalidId):
        with store.locked(bad):
            pass


def test_category_of():
    assert category_of(SPAM) == "spam"
    assert category_of(VIRUS) == "virus"
    banned = Verdict(Action.QUARANTINE, 0.0, (Symbol("BANNED_EXTENSION", ("a.exe",)),),
                     "BANNED_EXTENSION", 6.0)
    assert category_of(banned) == "banned"
    bad = Verdict(Action.QUARANTINE, 0.5, (Symbol("HEADER_8BIT", (), 0.5),), "HEADER_8BIT", 6.0)
    assert category_of(bad) == "bad-header"
    forced = Verdict(Action.QUARANTINE, 0.0, (Symbol("SITE_RULE"),), "SITE_RULE", 6.0)
    assert category_of(forced) == "policy"


# --- contract: schema, example spool, index -----------------------------------------------

def _validate(value, schema, path="$"):
    """The subset of JSON Schema the metadata schema uses (no extra dependency)."""
    errors = []
    types = schema.get("type")
    if types is not None:
        names = types if isinstance(types, list) else [types]
        pytypes = {"object": dict, "array": list, "string": str, "integer": int,
                   "number": (int, float), "boolean": bool, "null": type(None)}
        ok = any(isinstance(value, pytypes[n]) and not (n in ("integer", "number")
                                                         and isinstance(value, bool))
                 for n in names)
        if not ok:
            return [f"{path}: {value!r} is not {types}"]
    if "const" in schema and value != schema["const"]:
        errors.append(f"{path}: {value!r} != {schema['const']!r}")
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{path}: {value!r} not in {schema['enum']}")
    if "pattern" in schema and isinstance(value, str) and not re.search(schema["pattern"], value):
        errors.append(f"{path}: {value!r} does not match {schema['pattern']}")
    if "minimum" in schema and value < schema["minimum"]:
        errors.append(f"{path}: below minimum")
    if isinstance(value, dict):
        for key in schema.get("required", []):
            if key not in value:
                errors.append(f"{path}: missing {key}")
        props = schema.get("properties", {})
        for key, sub in value.items():
            if key in props:
                errors += _validate(sub, props[key], f"{path}.{key}")
            elif schema.get("additionalProperties") is False:
                errors.append(f"{path}: unexpected {key}")
    if isinstance(value, list) and "items" in schema:
        for n, sub in enumerate(value):
            errors += _validate(sub, schema["items"], f"{path}[{n}]")
    return errors


@pytest.fixture(scope="module")
def metadata_schema():
    return json.loads((CONTRACT / "schema" / "metadata-v1.schema.json").read_text())


def test_index_sql_contract_matches_code():
    assert (CONTRACT / "schema" / "index.sql").read_text() == SCHEMA_SQL


def test_schema_validator_catches_a_bad_sidecar(metadata_schema):
    meta = json.loads(next((CONTRACT / "example-spool").glob("*/*.json")).read_text())
    assert _validate(meta, metadata_schema) == []
    broken = dict(meta, state="lost", extra=1)
    del broken["sha256"]
    problems = _validate(broken, metadata_schema)
    assert any("state" in p for p in problems) and any("extra" in p for p in problems)
    assert any("sha256" in p for p in problems)


def test_written_and_released_sidecars_match_the_schema(store, settings, sink, metadata_schema):
    item = store.put(RAW, env(), SPAM)
    virus = store.put(RAW, env(queue_id="Q9"), VIRUS)
    release(store, settings, item.id, by="tester")
    for item_id in (item.id, virus.id):
        meta = json.loads((store.dir / item_id[:8] / f"{item_id}.json").read_text())
        assert _validate(meta, metadata_schema) == [], item_id


@pytest.fixture
def example(tmp_path, sink):
    spool = tmp_path / "example"
    shutil.copytree(CONTRACT / "example-spool", spool)
    s = config.defaults().with_overrides({
        "daemon.state_dir": str(tmp_path / "st"), "quarantine.dir": str(spool),
        "daemon.hostname": "mx.test", "quarantine.release_via": f"127.0.0.1:{sink.port}"})
    return s, SpoolStore(spool)


def test_example_spool_reindexes_and_validates(example, metadata_schema):
    _, store = example
    report = store.reindex()
    assert report.items == 3 and report.skipped == ()
    for path, meta, problem in store.sidecars():
        assert problem == "" and _validate(meta, metadata_schema) == [], path
    assert [i.id for i in store.search(Query(oldest_first=True))] == [
        "20261101T083000-0a1b2c3d4e", "20261101T091500-5f6e7d8c9b", "20261102T120000-aa00bb11cc"]


def test_list_filters(example):
    _, store = example
    store.reindex()
    ids = lambda **kw: [i.id for i in store.search(Query(oldest_first=True, **kw))]  # noqa: E731
    assert ids(category="virus") == ["20261101T091500-5f6e7d8c9b"]
    assert ids(state="held") == ["20261101T083000-0a1b2c3d4e", "20261102T120000-aa00bb11cc"]
    assert ids(sender="OFFERS@promo.example") == ["20261101T083000-0a1b2c3d4e"]
    assert ids(sender="*@partner.example") == ["20261101T091500-5f6e7d8c9b"]
    assert ids(sender="") == ["20261102T120000-aa00bb11cc"]  # the null sender
    assert ids(recipient="carol@test.example") == ["20261101T091500-5f6e7d8c9b",
                                                   "20261102T120000-aa00bb11cc"]
    assert ids(since=parse_when("2026-11-02")) == ["20261102T120000-aa00bb11cc"]
    assert ids(until=parse_when("2026-11-01T09:00")) == ["20261101T083000-0a1b2c3d4e"]
    assert ids(limit=1) == ["20261101T083000-0a1b2c3d4e"]
    assert ids(sender="100%_off") == []


def test_reindex_equals_the_incremental_index(store, settings, sink):
    items = [store.put(RAW + str(n).encode(), env(queue_id=f"Q{n}", rcpts=("X@test.example",
                                                                          f"r{n}@test.example")),
                       SPAM if n % 2 else VIRUS) for n in range(12)]
    release(store, settings, items[0].id, by="tester")
    with store.locked(items[1].id):
        store.delete(items[1].id)
    before = store.index_rows()
    assert len([r for r in before if r[0] == "items"]) == 11
    (store.dir / "index.sqlite").unlink()
    for suffix in ("-wal", "-shm"):
        (store.dir / f"index.sqlite{suffix}").unlink(missing_ok=True)
    fresh = SpoolStore(store.dir)
    assert fresh.reindex().items == 11
    assert fresh.index_rows() == before


def test_reconcile_picks_up_items_missing_from_the_index(store):
    item = store.put(RAW, env(), SPAM)
    store.index.remove(item.id)
    assert store.reconcile() == 1
    assert [i.id for i in store.search(Query())] == [item.id]


# --- release ---------------------------------------------------------------------------------

def test_release_delivers_pristine_bytes_once_with_one_header(store, settings, sink):
    item = store.put(RAW, env(rcpts=("u@test.example", "v@test.example")), SPAM)
    done = release(store, settings, item.id, by="alice")
    assert done.recipients == ("u@test.example", "v@test.example")
    assert len(sink.messages) == 1
    mail_from, rcpts, data = sink.messages[0]
    assert mail_from == "a@example.org" and rcpts == ["u@test.example", "v@test.example"]
    first, rest = data.split(b"\r\n", 1)
    assert first.startswith(b"X-Filterd-Released: " + item.id.encode() + b" by alice at ")
    assert rest == RAW  # byte for byte
    lf_only = store.put(b"Subject: lf\n\nbody\n", env(queue_id="LF"), SPAM)
    release(store, settings, lf_only.id, by="alice")
    assert sink.messages[-1][2].endswith(b"\r\nSubject: lf\r\n\r\nbody\r\n")  # SMTP wants CRLF
    del sink.messages[-1]
    got = store.get(item.id)
    assert got.state == "released" and got.last_release["by"] == "alice"
    assert got.last_release["to"] == ["u@test.example", "v@test.example"]
    with pytest.raises(AlreadyReleased, match="already released .* by alice"):
        release(store, settings, item.id, by="bob")
    assert len(sink.messages) == 1
    again = release(store, settings, item.id, by="bob", to=["w@test.example"], force=True)
    assert again.recipients == ("w@test.example",) and len(sink.messages) == 2
    assert sink.messages[1][1] == ["w@test.example"]
    assert [r["by"] for r in store.get(item.id).releases] == ["alice", "bob"]
    assert store.read_raw(item.id) == RAW  # the stored message never changes


def test_release_header_is_configurable(store, settings, sink):
    item = store.put(RAW, env(), SPAM)
    release(store, settings.with_overrides({"quarantine.release_header": ""}), item.id, by="x")
    assert sink.messages[0][2] == RAW
    assert add_release_header(b"A: b\n\nbody\n", "X-R", "id1") == b"X-R: id1\nA: b\n\nbody\n"


@pytest.mark.parametrize("how", ["data", "rcpt", "down"])
def test_refused_release_leaves_the_item_held(store, settings, sink, how):
    item = store.put(RAW, env(), SPAM)
    if how == "data":
        sink.data_reply = "554 5.7.1 Rejected by policy"
    elif how == "rcpt":
        sink.refuse_rcpt = "u@test.example"
    else:
        settings = settings.with_overrides({"quarantine.release_via": f"127.0.0.1:{free_port()}"})
    with pytest.raises(ReleaseRefused) as info:
        release(store, settings, item.id, by="alice")
    text = str(info.value)
    assert item.id in text and "stays held" in text
    if how == "data":
        assert info.value.code == 554 and "Rejected by policy" in text
    elif how == "rcpt":
        assert info.value.code == 550 and "User unknown" in text
    else:
        assert "cannot reach" in text
    got = store.get(item.id)
    assert got.state == "held" and got.releases == [] and "releasing" not in got.sidecar
    assert sink.messages == []


def test_interrupted_release_needs_force(store, settings, sink):
    item = store.put(RAW, env(), SPAM)
    with store.locked(item.id):  # what a crash between SMTP and the final write leaves
        store.update(item.id, lambda m: m.update(state="releasing",
                                                 releasing={"at": 1.0, "by": "x", "to": []}))
    with pytest.raises(AlreadyReleased, match="did not finish"):
        release(store, settings, item.id, by="alice")
    assert sink.messages == []
    release(store, settings, item.id, by="alice", force=True)
    assert len(sink.messages) == 1 and store.get(item.id).state == "released"


def test_concurrent_releases_in_threads_deliver_once(store, settings, sink):
    item = store.put(RAW, env(), SPAM)
    sink.delay = 0.3  # keep the first release inside its lock while the others arrive
    results: list[str] = []

    def one():
        try:
            release(SpoolStore(store.dir), settings, item.id, by="t")
            results.append("released")
        except AlreadyReleased:
            results.append("already")

    threads = [threading.Thread(target=one) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(results) == ["already"] * 5 + ["released"]
    assert len(sink.messages) == 1


# --- CLI ---------------------------------------------------------------------------------------

def _cli(settings, *argv):
    return cli_main(["--state-dir", str(settings.state_dir), "quarantine", *argv])


@pytest.fixture
def cli_settings(tmp_path, sink, monkeypatch):
    cfg = tmp_path / "filterd.toml"
    cfg.write_text(f'[quarantine]\nrelease_via = "127.0.0.1:{sink.port}"\n'
                   f'[daemon]\nhostname = "mx.test"\n')
    monkeypatch.setenv("FILTERD_CONFIG", str(cfg))
    s = config.load(cfg, state_dir=str(tmp_path / "state"))
    return s


def test_cli_list_show_release_delete_exit_codes(cli_settings, sink, capsys):
    store = SpoolStore(cli_settings.quarantine_dir)
    a = store.put(RAW, env(), SPAM).id
    b = store.put(RAW, env(queue_id="Q2"), VIRUS).id
    assert _cli(cli_settings, "list", "--json") == 0
    listed = json.loads(capsys.readouterr().out)
    assert {m["id"] for m in listed} == {a, b}
    assert _cli(cli_settings, "list", "--reason", "virus") == 0
    out = capsys.readouterr().out
    assert b in out and a not in out
    assert _cli(cli_settings, "list", "--since", "yesterday") == 2
    assert "not a date" in capsys.readouterr().err
    assert _cli(cli_settings, "show", a) == 0
    out = capsys.readouterr().out
    assert "GTUBE" in out and "1000.000" in out and "category:    spam" in out
    assert _cli(cli_settings, "show", "--headers", a) == 0
    assert "Message-ID: <m1@example.org>" in capsys.readouterr().out
    missing = "20200101T000000-0123456789"
    assert _cli(cli_settings, "release", a, missing) == 1
    captured = capsys.readouterr()
    assert f"{a}: released to u@test.example" in captured.out
    assert f"{missing}: no such item" in captured.err
    assert _cli(cli_settings, "release", a) == 1
    assert "already released" in capsys.readouterr().err
    assert _cli(cli_settings, "release", a, "--force", "--to", "z@test.example") == 0
    assert len(sink.messages) == 2 and sink.messages[1][1] == ["z@test.example"]
    assert _cli(cli_settings, "release", "../etc/passwd", b) == 2
    assert "not a quarantine ID" in capsys.readouterr().err
    assert store.get(b).state == "held"  # a usage error does nothing at all
    assert _cli(cli_settings, "release", b, "--to", missing) == 2
    assert _cli(cli_settings, "delete", b, missing) == 1
    assert f"{missing}: no such item" in capsys.readouterr().err
    with pytest.raises(NoSuchItem):
        store.get(b)
    assert _cli(cli_settings, "stats", "--json") == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["items"] == 1 and stats["by_state"] == {"released": 1}


def test_cli_release_target_down_exits_1_and_keeps_item(cli_settings, sink, capsys, tmp_path):
    store = SpoolStore(cli_settings.quarantine_dir)
    a = store.put(RAW, env(), SPAM).id
    sink.data_reply = "451 4.3.0 Temporary lookup failure"
    assert _cli(cli_settings, "release", a) == 1
    err = capsys.readouterr().err
    assert a in err and "451" in err and "Temporary lookup failure" in err
    assert store.get(a).state == "held"


def test_cli_learn_ham_without_bayes_is_a_clear_error(cli_settings, sink, capsys, monkeypatch):
    store = SpoolStore(cli_settings.quarantine_dir)
    a = store.put(RAW, env(), SPAM).id
    monkeypatch.setitem(sys.modules, "filterd.bayes.api", None)  # as if Bayes were not installed
    assert _cli(cli_settings, "release", "--learn-ham", a) == 1
    assert "Bayes is not available" in capsys.readouterr().err
    assert store.get(a).state == "held" and sink.messages == []


def test_cli_learn_ham_calls_bayes_learn(cli_settings, sink, capsys, monkeypatch):
    import types
    learned = []
    api = types.ModuleType("filterd.bayes.api")
    api.learn = lambda settings, raw, label: learned.append((raw, label))
    monkeypatch.setitem(sys.modules, "filterd.bayes.api", api)
    store = SpoolStore(cli_settings.quarantine_dir)
    a = store.put(RAW, env(), SPAM).id
    assert _cli(cli_settings, "release", "--learn-ham", a) == 0
    assert learned == [(RAW, "ham")] and len(sink.messages) == 1


def test_concurrent_cli_releases_in_processes_deliver_once(cli_settings, sink, tmp_path):
    store = SpoolStore(cli_settings.quarantine_dir)
    a = store.put(RAW, env(), SPAM).id
    sink.delay = 0.5
    cmd = [sys.executable, "-m", "filterd", "--state-dir", str(cli_settings.state_dir),
           "quarantine", "release", a]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env=dict(os.environ)) for _ in range(4)]
    codes = [p.wait(60) for p in procs]
    assert sorted(codes) == [0, 1, 1, 1]
    assert len(sink.messages) == 1
    assert store.get(a).state == "released" and len(store.get(a).releases) == 1


def _age(store, item_id, days):
    """Move an item to where it would be had it been stored `days` ago."""
    when = time.time() - days * 86400
    new_id = time.strftime("%Y%m%dT%H%M%S", time.gmtime(when)) + item_id[15:]
    day = store.dir / new_id[:8]
    day.mkdir(mode=0o750, exist_ok=True)
    meta = json.loads((store.dir / item_id[:8] / f"{item_id}.json").read_text())
    meta.update(id=new_id, time=when)
    os.rename(store.dir / item_id[:8] / f"{item_id}.eml", day / f"{new_id}.eml")
    (day / f"{new_id}.json").write_text(json.dumps(meta))
    os.unlink(store.dir / item_id[:8] / f"{item_id}.json")
    store.reindex()
    return new_id, day


def test_expire_removes_old_items_and_crash_leftovers(store):
    old_id, old_day = _age(store, store.put(RAW, env(), SPAM).id, 40)
    young = store.put(RAW, env(queue_id="Q2"), SPAM)
    orphan = young.path.with_name("20261122T000000-00000000aa.eml")
    orphan.write_bytes(b"half")
    tmp = young.path.with_name(".tmp.x")
    tmp.write_bytes(b"tmp")
    ancient = time.time() - 3 * 86400
    os.utime(orphan, (ancient, ancient))
    os.utime(tmp, (ancient, ancient))
    fresh_orphan = young.path.with_name("20261122T000000-00000000bb.eml")
    fresh_orphan.write_bytes(b"being written right now")
    assert store.expire(time.time() - 30 * 86400) == [old_id]
    assert not old_day.exists()  # the emptied day directory went too
    # leftovers are swept in the days the cutoff reaches: cut just before the young item
    assert store.expire(store.get(young.id).time - 1) == []
    assert not orphan.exists() and not tmp.exists() and fresh_orphan.exists()
    assert [i.id for i in store.search(Query())] == [young.id]


def test_parse_when():
    assert parse_when("2026-11-22") == 1795305600.0
    assert parse_when("2026-11-22T10:15Z") == 1795305600.0 + 36900
    assert parse_when("3d", now=1000000.0) == 1000000.0 - 3 * 86400
    with pytest.raises(ValueError):
        parse_when("last tuesday")


# --- notifications -----------------------------------------------------------------------

def test_admin_notice_once_per_virus_item_and_digest(store, settings, sink, tmp_path):
    s = settings.with_overrides({"quarantine.notify_admin": "admin@test.example",
                                 "quarantine.digest_hours": 1})
    virus = store.put(RAW, env(queue_id="Q1"), VIRUS)
    store.put(RAW, env(queue_id="Q2", rcpts=("u@test.example", "v@test.example")), SPAM)
    sent = notify.run(s, store)
    assert sent.notices == 1
    notices = [m for m in sink.messages if m[1] == ["admin@test.example"]]
    assert len(notices) == 1 and notices[0][0] in ("", "<>")  # null sender: never bounces
    assert virus.id.encode() in notices[0][2] and b"filterd quarantine release" in notices[0][2]
    assert store.get(virus.id).sidecar["notified"]
    # the first digest covers the last digest_hours: u@ (virus + spam) and v@ (spam)
    assert sent.digests == 2
    digest_u = next(m for m in sink.messages if m[1] == ["u@test.example"])
    assert digest_u[2].count(b"filterd quarantine release ") == 2
    again = notify.run(s, store)
    assert (again.notices, again.digests) == (0, 0)  # once only; the next digest is not due
    store.put(RAW, env(queue_id="Q3", rcpts=("w@test.example",)), SPAM)
    later = notify.run(s, store, now=time.time() + 3601)
    assert later.digests == 1 and sink.messages[-1][1] == ["w@test.example"]


def test_custom_templates_override_key_by_key(store, settings, sink, tmp_path):
    tpl = tmp_path / "tpl.toml"
    tpl.write_text('[admin_notice]\nsubject = "VIRUS {virus_names} in {id}"\n')
    s = settings.with_overrides({"quarantine.notify_admin": "admin@test.example",
                                 "quarantine.templates": str(tpl)})
    item = store.put(RAW, env(), VIRUS)
    assert notify.run(s, store).notices == 1
    assert f"Subject: VIRUS Eicar-Test in {item.id}".encode() in sink.messages[0][2]
    assert b"Inspect it:" in sink.messages[0][2]  # the body kept the default


def test_open_store_and_maintenance_reconcile_the_index(settings):
    store = SpoolStore(settings.quarantine_dir)
    item = store.put(RAW, env(), SPAM)
    store.index.remove(item.id)  # as if the daemon died between sidecar and index row
    opened = open_store(settings)  # a (re)started process reconciles when it opens the spool
    assert [i.id for i in opened.search(Query())] == [item.id]
    opened.index.remove(item.id)
    done = maintenance(settings)  # and so does the periodic task
    assert done["indexed"] == 1 and done["expired"] == 0
    old_id, _ = _age(opened, item.id, settings.quarantine.retention_days + 1)
    assert maintenance(settings)["expired"] == 1
    assert opened.search(Query()) == []
