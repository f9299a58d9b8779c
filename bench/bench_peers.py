"""filterd beside SpamAssassin and rspamd on the same messages, in one run (`make bench`).

What it measures (shared/notes/evaluation.md, shared/notes/peers.md):
  * the development split of ../shared/corpora/SPLIT.tsv: learners train on half A, every
    system is measured on half B (or a fixed, hash-chosen sample of it with --sample N, the
    same messages for every system); virus messages are left out;
  * filterd `scan` in-process (one process, the daemon's Scanner, network checks off) and
    through the milter protocol against a real `filterd serve` at concurrency 1 and 4
    (bench/milter_client.py plays Postfix's part: one connection per message);
  * SpamAssassin's spamd (bench/peers/spamassassin.sh) over its socket, speaking SPAMC/1.5
    (SYMBOLS) ourselves, and rspamd's normal worker (bench/peers/rspamd.sh) by HTTP POST
    /checkv2, both at concurrency 4 (their worker pools are sized for it);
  * per system: messages/s (wall), messages per CPU-second of the scanning processes (the
    "per core" figure), latency p50/p99, peak RSS of the scanning process tree, accuracy at
    its default thresholds (FP/FN rates), ROC AUC from its score and the FN rate at the most
    sensitive threshold keeping FP <= 0.1 % of ham; then ratios filterd/peer.

Writes bench/out/peers.json (everything) and bench/out/peers.md (the table). Peers that are
not installed are reported as skipped. Not part of `make test`: a full run takes tens of
minutes on two cores (SpamAssassin scans ~8 messages/s).

  .venv/bin/python bench/bench_peers.py [--sample N] [--skip-train] [--only filterd,sa,rspamd]
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import hashlib
import http.client
import json
import os
import platform
import resource
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))
from spamc import spam_score, spamd_symbols  # noqa: E402 (bench/spamc.py, beside this script)
CORPORA = Path(os.environ.get("FILTERD_CORPORA", ROOT.parent / "shared" / "corpora"))
OUT = HERE / "out"
PEERS = Path(os.environ.get("PEERS_ROOT", "/tmp/peers"))
PY = ROOT / ".venv" / "bin" / "python"
FILTERD = ROOT / ".venv" / "bin" / "filterd"
SPAMD_PORT, RSPAMD_PORT = 7833, 11433
FP_TARGET = 0.001


# --- the messages --------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Sample:
    path: str
    label: str          # ham or spam (phish counts as spam)
    corpus: str


def load_split(sample: int | None) -> tuple[list[Sample], list[Sample]]:
    """(half A, half B) from SPLIT.tsv; B optionally cut to a hash-chosen sample."""
    halves: dict[str, list[Sample]] = {"A": [], "B": []}
    for line in (CORPORA / "SPLIT.tsv").read_text().splitlines()[1:]:
        path, label, half = line.split("\t")
        if label == "virus":
            continue
        halves[half].append(Sample(str(CORPORA / path), "ham" if label == "ham" else "spam",
                                   path.split("/", 1)[0]))
    b = halves["B"]
    if sample and sample < len(b):
        b = sorted(b, key=lambda s: hashlib.sha1(s.path.encode()).hexdigest())[:sample]
        b.sort(key=lambda s: s.path)
    return halves["A"], b


# --- measuring processes -------------------------------------------------------------------

def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            tree.setdefault(ppid, []).append(int(entry))
    return tree


def process_tree(pid: int) -> list[int]:
    tree, out, todo = _children(), [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(tree.get(p, []))
    return out


def _stat_cpu(pid: int, with_children: bool) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    ticks = int(fields[11]) + int(fields[12])          # utime, stime
    if with_children:
        ticks += int(fields[13]) + int(fields[14])     # reaped children (spamd's recycled)
    return ticks / os.sysconf("SC_CLK_TCK")


def tree_cpu(pid: int) -> float:
    return sum(_stat_cpu(p, with_children=True) for p in process_tree(pid))


def _rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class RssSampler:
    """Largest total RSS of a process tree, sampled every 0.2 s while running."""

    def __init__(self, pid: int):
        self.pid, self.peak_kb = pid, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_kb = max(self.peak_kb, sum(_rss_kb(p) for p in process_tree(self.pid)))
            self._stop.wait(0.2)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class Run:
    system: str
    mode: str
    concurrency: int
    results: list[dict[str, Any]] = field(default_factory=list)   # per message
    wall: float = 0.0
    cpu: float = 0.0
    peak_rss_mb: float = 0.0
    notes: list[str] = field(default_factory=list)


def drive(run: Run, samples: Sequence[Sample], data: dict[str, bytes],
          one: Callable[[bytes], dict[str, Any]], pid: int | None) -> Run:
    """Send every message with `one` at run.concurrency; time each; measure the server."""
    def task(sample: Sample) -> dict[str, Any]:
        started = time.perf_counter()
        try:
            answer = one(data[sample.path])
        except Exception as exc:  # a peer failing on one message is a result, not a crash
            answer = {"error": f"{type(exc).__name__}: {exc}", "spam": False, "score": None}
        answer.update(path=sample.path, label=sample.label, corpus=sample.corpus,
                      seconds=time.perf_counter() - started)
        return answer

    cpu0 = tree_cpu(pid) if pid else 0.0
    sampler = RssSampler(pid) if pid else None
    if sampler:
        sampler.__enter__()
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(run.concurrency) as pool:
        run.results = list(pool.map(task, samples))
    run.wall = time.perf_counter() - started
    if sampler:
        sampler.__exit__()
        run.peak_rss_mb = round(sampler.peak_kb / 1024, 1)
    run.cpu = tree_cpu(pid) - cpu0 if pid else 0.0
    return run


# --- SpamAssassin ----------------------------------------------------------------------------

def spamc_symbols(raw: bytes) -> dict[str, Any]:
    """One SPAMC/1.5 SYMBOLS request on its own connection, as spamc sends it."""
    head, symbols = spamd_symbols(SPAMD_PORT, raw)
    verdict = spam_score(head)
    if verdict is None:
        raise RuntimeError("no Spam: header in spamd's reply")
    return {"spam": verdict[0], "score": verdict[1], "symbols": symbols}


def spamd_pid() -> int | None:
    try:
        return int((PEERS / "spamassassin" / "spamd.pid").read_text())
    except (OSError, ValueError):
        return None


# --- rspamd ----------------------------------------------------------------------------------

RSPAMD_SPAM_ACTIONS = {"add header", "rewrite subject", "reject"}


def rspamd_check(raw: bytes) -> dict[str, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", RSPAMD_PORT, timeout=300)
    try:
        conn.request("POST", "/checkv2", body=raw)
        response = conn.getresponse()
        data = json.loads(response.read())
    finally:
        conn.close()
    action = data.get("action", "")
    return {"spam": action in RSPAMD_SPAM_ACTIONS, "score": float(data.get("score", 0.0)),
            "action": action, "score_ge_6": float(data.get("score", 0.0)) >= 6.0}


def rspamd_pid() -> int | None:
    try:
        return int((PEERS / "rspamd" / "run" / "main.pid").read_text())
    except (OSError, ValueError):
        return None


# --- filterd ---------------------------------------------------------------------------------

def filterd_config(workdir: Path, *, milter_port: int | None = None) -> Path:
    """A settings file and site layer for the benchmark: the shipped rules with network
    checks and antivirus off (the peers run neither), state (Bayes) under workdir."""
    site = workdir / "site"
    (site / "local.d").mkdir(parents=True, exist_ok=True)
    from filterd import config as cfg
    from filterd import pipeline
    from filterd.ruleset import load
    settings = cfg.defaults()
    registry = pipeline.load_checks()
    ruleset = load(settings.rules_dir, None)
    off = [b.name for b in ruleset.bindings
           if b.function in registry and (registry[b.function].network
                                          or b.function in ("clamav", "antivirus"))]
    (site / "local.d" / "bench.toml").write_text(
        "# written by bench/bench_peers.py: peers run without network checks and antivirus\n"
        + "".join(f'[check."{name}"]\nenabled = false\n' for name in off))
    text = textwrap.dedent(f"""\
        [daemon]
        state_dir = "{workdir / 'state'}"
        user = ""
        [rules]
        site_dir = "{site}"
        [smtp]
        enabled = false
        [metrics]
        listen = ""
        [milter]
        listen = "inet:{milter_port or 18899}@127.0.0.1"
        [bayes]
        # as for the peers (peers.md): the measured messages must not teach the learner
        autolearn = false
        """)
    path = workdir / "filterd.toml"
    path.write_text(text)
    return path


def filterd_train(config: Path, ham: Sequence[Sample], spam: Sequence[Sample]) -> dict[str, Any]:
    """Train filterd's Bayes on half A with `filterd learn` when the command exists."""
    probe = subprocess.run([str(FILTERD), "learn", "--help"], capture_output=True, text=True)
    if probe.returncode != 0:
        return {"trained": False, "note": "no `filterd learn` command in this build"}
    started = time.perf_counter()
    for label, items in (("ham", ham), ("spam", spam)):
        for i in range(0, len(items), 1000):
            chunk = [s.path for s in items[i:i + 1000]]
            done = subprocess.run([str(FILTERD), "--config", str(config), "learn", f"--{label}",
                                   *chunk], capture_output=True, text=True)
            if done.returncode not in (0, 1):
                return {"trained": False, "note": f"filterd learn failed: {done.stderr[-500:]}"}
    return {"trained": True, "seconds": round(time.perf_counter() - started, 1),
            "ham": len(ham), "spam": len(spam)}


def scan_worker(config: str, listfile: str, outfile: str) -> None:
    """Subprocess: the daemon's Scanner over the list, one message at a time; per message
    results, CPU seconds and peak RSS of this process only."""
    from filterd import config as cfg
    from filterd.message import Envelope
    from filterd.service import Scanner

    settings = cfg.load(config)
    scanner = Scanner(settings)
    samples = [json.loads(line) for line in Path(listfile).read_text().splitlines()]
    envelope = Envelope(listener="bench")
    results = []

    async def go() -> None:
        for s in samples:
            raw = Path(s["path"]).read_bytes()
            started = time.perf_counter()
            outcome = await scanner.scan(raw, envelope, skip_network=True)
            verdict = outcome.verdict
            results.append({"path": s["path"], "label": s["label"], "corpus": s["corpus"],
                            "seconds": time.perf_counter() - started,
                            "spam": verdict.action.is_spam_verdict,
                            "score": verdict.score, "action": verdict.action.value})

    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    wall0 = time.perf_counter()
    asyncio.run(go())
    wall = time.perf_counter() - wall0
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    Path(outfile).write_text(json.dumps({
        "results": results, "wall": wall,
        "cpu": (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime),
        "peak_rss_mb": round(cpu1.ru_maxrss / 1024, 1)}))


def run_filterd_scan(config: Path, samples: Sequence[Sample], workdir: Path) -> Run:
    listfile, outfile = workdir / "scan-list.jsonl", workdir / "scan-out.json"
    listfile.write_text("".join(json.dumps({"path": s.path, "label": s.label,
                                            "corpus": s.corpus}) + "\n" for s in samples))
    subprocess.run([str(PY), __file__, "_scan_worker", str(config), str(listfile), str(outfile)],
                   check=True)
    data = json.loads(outfile.read_text())
    run = Run("filterd", "scan (in-process)", 1, data["results"], data["wall"], data["cpu"],
              data["peak_rss_mb"])
    run.notes.append("wall and CPU count scanning only (messages read from disk inside)")
    return run


class FilterdServer:
    def __init__(self, config: Path, port: int, workdir: Path):
        self.config, self.port, self.workdir = config, port, workdir
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> "FilterdServer":
        log = open(self.workdir / "serve.log", "wb")
        self.proc = subprocess.Popen([str(FILTERD), "--config", str(self.config), "serve",
                                      "--log-level", "warning"], stdout=log, stderr=log)
        deadline = time.monotonic() + 300  # compiling the rule set takes a while on a busy box
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError("filterd serve exited; see " + str(self.workdir / "serve.log"))
                time.sleep(0.1)
        self.__exit__()
        raise RuntimeError("filterd serve did not open its milter port")

    def __exit__(self, *exc: Any) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def milter_one(port: int) -> Callable[[bytes], dict[str, Any]]:
    from milter_client import MilterClient
    client = MilterClient("127.0.0.1", port)

    def one(raw: bytes) -> dict[str, Any]:
        result = client.send_message(raw)
        flag = (result.header("X-Spam-Flag") or "").strip().upper() == "YES"
        score_text = result.header("X-Spam-Score")
        spam = result.action in ("reject", "discard") or flag or (
            result.action == "replycode" and result.reply.startswith("5"))
        return {"spam": spam, "action": result.action, "reply": result.reply,
                "score": float(score_text) if score_text else None,
                "tempfail": result.action == "tempfail" or result.reply.startswith("4")}
    return one


# --- figures ---------------------------------------------------------------------------------

def percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def figures(run: Run) -> dict[str, Any]:
    from filterd.replay import fn_at_fp, roc_auc
    ok = [r for r in run.results if "error" not in r]
    ham = [r for r in ok if r["label"] == "ham"]
    spam = [r for r in ok if r["label"] == "spam"]
    lat = [r["seconds"] for r in ok]
    fp = sum(r["spam"] for r in ham)
    fn = sum(not r["spam"] and not r.get("tempfail") for r in spam)
    # a score for every message, or no ROC at all (the milter path shows X-Spam-Score only
    # from tag_level on, so its scores are partial: accuracy comes from the scan rows)
    complete = all(r.get("score") is not None for r in ok)
    scored_ham = [r["score"] for r in ham] if complete else []
    scored_spam = [r["score"] for r in spam] if complete else []
    at = fn_at_fp(scored_ham, scored_spam, FP_TARGET) if scored_spam and scored_ham else None
    n = len(run.results)
    out = {
        "system": run.system, "mode": run.mode, "concurrency": run.concurrency,
        "messages": n, "errors": n - len(ok),
        "tempfail": sum(bool(r.get("tempfail")) for r in ok),
        "wall_seconds": round(run.wall, 2),
        "messages_per_second": round(n / run.wall, 2) if run.wall else None,
        "cpu_seconds": round(run.cpu, 2),
        "messages_per_cpu_second": round(n / run.cpu, 2) if run.cpu else None,
        "latency_p50_ms": round(percentile(lat, 0.5) * 1000, 2) if lat else None,
        "latency_p99_ms": round(percentile(lat, 0.99) * 1000, 2) if lat else None,
        "peak_rss_mb": run.peak_rss_mb,
        "ham": len(ham), "spam": len(spam), "fp": fp, "fn": fn,
        "fp_rate": fp / len(ham) if ham else None, "fn_rate": fn / len(spam) if spam else None,
        "auc": roc_auc(scored_ham, scored_spam) if scored_ham and scored_spam else None,
        "fn_at_fp": at, "notes": run.notes,
    }
    corpora: dict[str, dict[str, int]] = {}
    for r in ok:
        c = corpora.setdefault(r["corpus"], {"ham": 0, "spam": 0, "fp": 0, "fn": 0})
        c[r["label"]] += 1
        if r["label"] == "ham" and r["spam"]:
            c["fp"] += 1
        if r["label"] == "spam" and not r["spam"] and not r.get("tempfail"):
            c["fn"] += 1
    out["corpora"] = corpora
    return out


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v * 100:.2f}%"


def _num(v: Any, fmt: str = "{:g}") -> str:
    return "-" if v is None else fmt.format(v)


def table(rows: list[dict[str, Any]]) -> str:
    head = ("| system | mode | conc. | msgs | msgs/s | msgs/CPU-s | p50 ms | p99 ms | peak RSS MB "
            "| FP rate | FN rate | AUC | FN @ FP≤0.1% |\n|" + "---|" * 13 + "\n")
    lines = []
    for r in rows:
        at = r.get("fn_at_fp") or {}
        lines.append(f"| {r['system']} | {r['mode']} | {r['concurrency']} | {r['messages']} | "
                     f"{_num(r['messages_per_second'])} | {_num(r['messages_per_cpu_second'])} | "
                     f"{_num(r['latency_p50_ms'])} | {_num(r['latency_p99_ms'])} | "
                     f"{_num(r['peak_rss_mb'])} | {_pct(r['fp_rate'])} | {_pct(r['fn_rate'])} | "
                     f"{_num(r['auc'], '{:.4f}')} | {_pct(at.get('fn_rate'))} |")
    return head + "\n".join(lines) + "\n"


def ratios(rows: list[dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    base = next((r for r in rows if r["system"] == "filterd" and r["concurrency"] == 1
                 and r["mode"].startswith("scan")), None)
    if base is None:
        return "", {}
    out: dict[str, Any] = {}
    lines = ["| filterd scan / peer | msgs/s | msgs per CPU-s | p50 latency | peak RSS | FN @ equal FP |",
             "|---|---|---|---|---|---|"]

    def ratio(a: Any, b: Any) -> float | None:
        return round(a / b, 2) if a is not None and b else None

    for peer in rows:
        if peer["system"] == "filterd":
            continue
        r = {"messages_per_second": ratio(base["messages_per_second"], peer["messages_per_second"]),
             "messages_per_cpu_second": ratio(base["messages_per_cpu_second"],
                                              peer["messages_per_cpu_second"]),
             "latency_p50": ratio(base["latency_p50_ms"], peer["latency_p50_ms"]),
             "peak_rss": ratio(base["peak_rss_mb"], peer["peak_rss_mb"]),
             "fn_at_equal_fp": ratio((base.get("fn_at_fp") or {}).get("fn_rate"),
                                     (peer.get("fn_at_fp") or {}).get("fn_rate"))}
        out[peer["system"]] = r
        lines.append(f"| vs {peer['system']} | {_num(r['messages_per_second'])}× | "
                     f"{_num(r['messages_per_cpu_second'])}× | {_num(r['latency_p50'])}× | "
                     f"{_num(r['peak_rss'])}× | {_num(r['fn_at_equal_fp'])}× |")
    return "\n".join(lines) + "\n", out


def machine() -> dict[str, Any]:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30

    def version(cmd: list[str]) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.split("\n")[0]
        except (OSError, subprocess.TimeoutExpired):
            return "not installed"
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem, 1),
            "kernel": platform.release(), "python": platform.python_version(),
            "os": Path("/etc/debian_version").read_text().strip()
            if Path("/etc/debian_version").exists() else platform.platform(),
            "spamassassin": version(["spamassassin", "--version"]),
            "rspamd": version(["rspamd", "--version"]),
            "load_at_start": os.getloadavg()}


# --- main ------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sample", type=int, default=None,
                        help="measure on this many hash-chosen messages of half B (default all)")
    parser.add_argument("--only", default="filterd,milter,sa,rspamd",
                        help="comma list of: filterd (scan), milter, sa, rspamd")
    parser.add_argument("--skip-train", action="store_true",
                        help="reuse the peers' trained Bayes databases from an earlier run")
    parser.add_argument("--reuse-filterd-bayes", action="store_true",
                        help="with --skip-train, also reuse filterd's Bayes database")
    parser.add_argument("--workdir", default="/tmp/filterd-bench")
    args = parser.parse_args(argv)
    only = set(args.only.split(","))
    if not (CORPORA / "SPLIT.tsv").exists():
        print(f"bench_peers: no corpora at {CORPORA}; skipped", file=sys.stderr)
        return 0
    OUT.mkdir(parents=True, exist_ok=True)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    half_a, half_b = load_split(args.sample)
    a_ham = [s for s in half_a if s.label == "ham"]
    a_spam = [s for s in half_a if s.label == "spam"]
    lists = workdir / "lists"
    lists.mkdir(exist_ok=True)
    (lists / "A-ham.txt").write_text("".join(s.path + "\n" for s in a_ham))
    (lists / "A-spam.txt").write_text("".join(s.path + "\n" for s in a_spam))
    data = {s.path: Path(s.path).read_bytes() for s in half_b}
    print(f"half A: {len(a_ham)} ham, {len(a_spam)} spam for training; measuring on "
          f"{len(half_b)} messages of half B", file=sys.stderr)
    report: dict[str, Any] = {"machine": machine(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                              "sample": args.sample, "measured_on": len(half_b),
                              "trained_on": {"ham": len(a_ham), "spam": len(a_spam)},
                              "training": {}, "runs": [], "skipped": {}}
    rows = report["runs"]

    if only & {"filterd", "milter"}:
        config = filterd_config(workdir / "filterd", milter_port=18899)
        # filterd's own training is cheap (a minute): --skip-train reuses the peers' databases,
        # and filterd's too only with --reuse-filterd-bayes (a Bayes change needs retraining).
        reuse = args.skip_train and args.reuse_filterd_bayes
        if not reuse:
            shutil.rmtree(workdir / "filterd" / "state", ignore_errors=True)
        (workdir / "filterd" / "state").mkdir(parents=True, exist_ok=True)
        report["training"]["filterd"] = (filterd_train(config, a_ham, a_spam)
                                         if not reuse else {"reused": True})
        print(f"filterd training: {report['training']['filterd']}", file=sys.stderr)
        if "filterd" in only:
            rows.append(figures(run_filterd_scan(config, half_b, workdir / "filterd")))
            print(table(rows[-1:]), file=sys.stderr)
        if "milter" in only:
            with FilterdServer(config, 18899, workdir / "filterd") as server:
                assert server.proc is not None
                for conc in (1, 4):
                    run = Run("filterd", "milter", conc)
                    run.notes.append("bench/milter_client.py plays the MTA, one connection "
                                     "per message; server CPU and RSS of `filterd serve`")
                    rows.append(figures(drive(run, half_b, data, milter_one(18899),
                                              server.proc.pid)))
                    print(table(rows[-1:]), file=sys.stderr)

    peers_dir = HERE / "peers"
    if "sa" in only:
        if not shutil.which("spamd"):
            report["skipped"]["spamassassin"] = "spamd not installed"
        else:
            sa = [str(peers_dir / "spamassassin.sh")]
            if not args.skip_train:
                subprocess.run([*sa, "stop"], check=False)
                subprocess.run([*sa, "configure"], check=True, capture_output=True)
                t0 = time.perf_counter()
                subprocess.run([*sa, "train", str(lists / "A-ham.txt"), str(lists / "A-spam.txt")],
                               check=True)
                report["training"]["spamassassin"] = {"seconds": round(time.perf_counter() - t0, 1)}
            subprocess.run([*sa, "start"], check=True)
            try:
                run = Run("spamassassin", "spamd SPAMC/1.5", 4)
                rows.append(figures(drive(run, half_b, data, spamc_symbols, spamd_pid())))
                print(table(rows[-1:]), file=sys.stderr)
            finally:
                subprocess.run([*sa, "stop"], check=False)

    if "rspamd" in only:
        if not shutil.which("rspamd"):
            report["skipped"]["rspamd"] = "rspamd not installed"
        else:
            rs = [str(peers_dir / "rspamd.sh")]
            if not args.skip_train:
                subprocess.run([*rs, "stop"], check=False)
                subprocess.run([*rs, "configure"], check=True, capture_output=True)
                subprocess.run(["redis-cli", "-p", "6389", "FLUSHALL"], capture_output=True)
            subprocess.run([*rs, "start"], check=True)
            try:
                if not args.skip_train:
                    subprocess.run(["redis-cli", "-p", "6389", "FLUSHALL"], capture_output=True)
                    t0 = time.perf_counter()
                    subprocess.run([*rs, "train", str(lists / "A-ham.txt"),
                                    str(lists / "A-spam.txt")], check=True)
                    report["training"]["rspamd"] = {"seconds": round(time.perf_counter() - t0, 1)}
                run = Run("rspamd", "HTTP /checkv2", 4)
                rows.append(figures(drive(run, half_b, data, rspamd_check, rspamd_pid())))
                print(table(rows[-1:]), file=sys.stderr)
            finally:
                subprocess.run([*rs, "stop"], check=False)

    ratio_table, report["ratios"] = ratios(rows)
    report["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    (OUT / "peers.json").write_text(json.dumps(report, indent=1) + "\n")
    text = table(rows) + "\n" + ratio_table
    (OUT / "peers.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_scan_worker":
        scan_worker(*sys.argv[2:5])
        sys.exit(0)
    sys.exit(main())
