"""Bayes accuracy and speed on ../shared/corpora, side by side with bogofilter and SpamAssassin.

Train on half A, classify half B (SPLIT.tsv; ../shared/notes/evaluation.md): per corpus,
overall, and cross-corpus (train on one corpus' half A, test on another's half B). For each:
FP and FN at the default band threshold (spam = BAYES_99 or above, p >= 0.99, the bands that
carry the shipped positive scores), ROC AUC, and FN at the most sensitive threshold that
keeps FP <= 0.1 %. Speed: messages learned per second (SQLite, one process), classification
cost per message (median CPU time, warm; tokenise + store read + combine, and with parsing).

Peers (when installed; `--peers none` skips them): bogofilter 1.2.5 with its compiled-in
defaults (spam = spamicity >= 0.99), SpamAssassin 4's Bayes through spamd with every rule but
BAYES_* scored 0 (spam = BAYES_99 or above, the same band as ours). Both are given the same
messages with the verdict headers of earlier filters removed (X-Spam-*, X-Virus-*, ...), as
our tokenizer ignores them.

  .venv/bin/python bench/bench_bayes.py [--peers all|bogofilter|spamassassin|none]
      [--variant osb|unigram|both] [--sa-train-limit N] [--json bench/out/bayes.json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from spamc import spam_score, spamd_symbols  # noqa: E402 (bench/spamc.py, beside this script)

from filterd.bayes import Bayes, Learner  # noqa: E402
from filterd.bayes.classifier import DEFAULT_CALIBRATION, ClassifierParams  # noqa: E402
from filterd.message import parse  # noqa: E402
from filterd.stores import HAM, SPAM  # noqa: E402
from filterd.stores.sqlite import SqliteTokenStore  # noqa: E402

CORPORA = ROOT.parent / "shared" / "corpora"
DEFAULT_THRESHOLD = 0.99
FOREIGN_HEADERS = re.compile(
    rb"^(?:X-Spam[-\w]*|X-Virus[-\w]*|X-Amavis[-\w]*|X-Bogosity|X-Spamd[-\w]*|X-Rspamd[-\w]*|"
    rb"X-Barracuda[-\w]*|X-ASG[-\w]*|X-IronPort[-\w]*|X-MailScanner[-\w]*|"
    rb"Authentication-Results):[^\n]*\n(?:[ \t][^\n]*\n)*", re.I | re.M)


def load_split() -> list[tuple[str, str, str, str]]:
    """(path, corpus, label spam|ham, half) for every spam/phish/ham message."""
    rows = []
    for line in (CORPORA / "SPLIT.tsv").read_text().splitlines()[1:]:
        path, label, half = line.split("\t")
        if label == "virus":
            continue
        corpus = path.split("/", 1)[0]
        if corpus == "spamassassin-samples":
            continue
        rows.append((path, corpus, SPAM if label in ("spam", "phish") else HAM, half))
    return rows


def strip_foreign(raw: bytes) -> bytes:
    m = re.search(rb"\r?\n\r?\n", raw)
    if not m:
        return raw
    return FOREIGN_HEADERS.sub(b"", raw[:m.end()]) + raw[m.end():]


# --- metrics -------------------------------------------------------------------------------
def auc(scores_spam: list[float], scores_ham: list[float]) -> float:
    """ROC AUC by the rank-sum statistic, ties counted half."""
    if not scores_spam or not scores_ham:
        return float("nan")
    allv = sorted([(s, 1) for s in scores_spam] + [(s, 0) for s in scores_ham])
    rank_sum = 0.0
    i = 0
    while i < len(allv):
        j = i
        while j < len(allv) and allv[j][0] == allv[i][0]:
            j += 1
        avg = (i + j + 1) / 2.0
        rank_sum += avg * sum(1 for k in range(i, j) if allv[k][1] == 1)
        i = j
    n1, n0 = len(scores_spam), len(scores_ham)
    return (rank_sum - n1 * (n1 + 1) / 2.0) / (n1 * n0)


def fn_at_fp(scores_spam: list[float], scores_ham: list[float], max_fp: float = 0.001) -> float:
    """FN rate at the lowest threshold t (spam = score >= t) with FP <= max_fp."""
    if not scores_spam or not scores_ham:
        return float("nan")
    hams = sorted(scores_ham, reverse=True)
    allowed = int(max_fp * len(hams))      # ham that may score >= t
    # t must be above the (allowed+1)-th highest ham score
    bar = hams[allowed] if allowed < len(hams) else float("-inf")
    caught = sum(1 for s in scores_spam if s > bar)
    return 1.0 - caught / len(scores_spam)


def summarize(results: list[tuple[str, str, float, bool | None]], corpus: str | None = None
              ) -> dict[str, float]:
    rows = [r for r in results if corpus is None or r[0] == corpus]
    spam = [s for c, lab, s, _ in rows if lab == SPAM]
    ham = [s for c, lab, s, _ in rows if lab == HAM]
    fp = sum(1 for c, lab, s, v in rows if lab == HAM and v) / len(ham) if ham else float("nan")
    fn = sum(1 for c, lab, s, v in rows if lab == SPAM and not v) / len(spam) if spam else float("nan")
    return {"n_spam": len(spam), "n_ham": len(ham), "fp": fp, "fn": fn, "auc": auc(spam, ham),
            "fn_at_fp0.1": fn_at_fp(spam, ham)}


# --- filterd -------------------------------------------------------------------------------
def run_filterd(train: list, test: list, workdir: Path, *, bigrams: bool,
                params: ClassifierParams, measure_speed: bool = False) -> dict:
    db = workdir / f"bayes-{'osb' if bigrams else 'uni'}-{len(train)}-{random.random():.6f}.sqlite"
    store = SqliteTokenStore(db)
    bayes = Bayes(store, bigrams=bigrams, min_spam=1, min_ham=1, params=params)
    learner = Learner(bayes, batch_size=500)
    data = [(p, lab, (CORPORA / p).read_bytes()) for p, _, lab, _ in train]
    t0 = time.process_time()
    w0 = time.perf_counter()
    for p, lab, raw in data:
        learner.add(p, raw, lab)
    learner.flush()
    learn_cpu = time.process_time() - t0
    learn_wall = time.perf_counter() - w0
    nspam, nham = store.message_counts()
    results = []
    tok_times, full_times = [], []
    clock = time.process_time   # CPU time: the machine is shared, wall time measures the load
    for p, corpus, lab, _ in test:
        raw = (CORPORA / p).read_bytes()
        t1 = clock()
        view = parse(raw)
        t2 = clock()
        c = bayes.classify_tokens(bayes.tokens(view), counts=(nspam, nham))
        t3 = clock()
        tok_times.append(t3 - t2)
        full_times.append(t3 - t1)
        # ROC and FN at FP <= 0.1 % rank by the raw score, which orders the messages the
        # calibrated probability ties (a monotone map: the default threshold is unchanged)
        results.append((corpus, lab, c.raw, c.probability >= DEFAULT_THRESHOLD))
    stats = store.stats()
    store.close()
    out = {"results": results, "learned": len(data), "learn_cpu_s": learn_cpu,
           "learn_wall_s": learn_wall, "learn_per_s": len(data) / learn_wall,
           "learn_per_cpu_s": len(data) / learn_cpu,
           "classify_median_ms": statistics.median(tok_times) * 1000,
           "classify_with_parse_median_ms": statistics.median(full_times) * 1000,
           "tokens": stats.ntokens, "db_bytes": stats.size_bytes}
    return out


# --- bogofilter ----------------------------------------------------------------------------
def run_bogofilter(train: list, test: list, workdir: Path) -> dict | None:
    if not shutil.which("bogofilter"):
        return None
    bdir = workdir / f"bogo-{random.random():.6f}"
    bdir.mkdir()
    mdir = workdir / f"msgs-{random.random():.6f}"
    mdir.mkdir()

    def write(rows: list, tag: str) -> list[str]:
        files = []
        for i, (p, *_rest) in enumerate(rows):
            f = mdir / f"{tag}{i}"
            f.write_bytes(strip_foreign((CORPORA / p).read_bytes()))
            files.append(str(f))
        return files

    ham_files = write([r for r in train if r[2] == HAM], "h")
    spam_files = write([r for r in train if r[2] == SPAM], "s")
    t0 = time.perf_counter()
    cpu0 = _children_cpu()
    for files, flag in ((ham_files, "-n"), (spam_files, "-s")):
        for i in range(0, len(files), 1000):
            subprocess.run(["bogofilter", "-d", str(bdir), flag, "-B", *files[i:i + 1000]],
                           check=True, stdout=subprocess.DEVNULL)
    learn_wall = time.perf_counter() - t0
    learn_cpu = _children_cpu() - cpu0
    test_files = write(test, "t")
    by_file = dict(zip(test_files, test))
    results = []
    for i in range(0, len(test_files), 500):
        chunk = test_files[i:i + 500]
        proc = subprocess.run(["bogofilter", "-d", str(bdir), "-TT", "-B", *chunk],
                              capture_output=True, text=True)
        for line in proc.stdout.splitlines():
            parts = line.split()   # -TT: "FILE SPAMICITY"
            if len(parts) < 2 or parts[0] not in by_file:
                continue
            f, spamicity = parts[0], float(parts[-1])
            p, corpus, lab, _ = by_file[f]
            results.append((corpus, lab, spamicity, spamicity >= 0.99))
    shutil.rmtree(mdir, ignore_errors=True)
    learned = len(ham_files) + len(spam_files)
    return {"results": results, "learn_per_s": learned / learn_wall,
            "learn_per_cpu_s": learned / learn_cpu if learn_cpu > 0 else float("nan")}


def _children_cpu() -> float:
    """User + system CPU seconds of the finished child processes (bogofilter runs)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# --- SpamAssassin --------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spamd_symbols(port: int, raw: bytes) -> tuple[float, list[str]]:
    head, symbols = spamd_symbols(port, raw, user="bench", timeout=120)
    verdict = spam_score(head)
    return (verdict[1] if verdict else float("nan")), symbols


def run_spamassassin(train: list, test: list, workdir: Path, limit: int) -> dict | None:
    if not (shutil.which("sa-learn") and shutil.which("spamd")):
        return None
    sa = workdir / f"sa-{random.random():.6f}"
    (sa / "etc").mkdir(parents=True)
    (sa / "bayes").mkdir()
    shutil.copytree("/etc/spamassassin", sa / "etc", dirs_exist_ok=True)
    # Only Bayes counts: every other rule is zeroed by the score overrides written below.
    (sa / "etc" / "zz_bench.cf").write_text(
        "required_score 5\nuse_bayes 1\nbayes_auto_learn 0\nbayes_auto_expire 0\n"
        f"bayes_path {sa}/bayes/bayes\nbayes_file_mode 0777\nskip_rbl_checks 1\n"
        "dns_available no\nbayes_min_ham_num 1\nbayes_min_spam_num 1\n"
        "ifplugin Mail::SpamAssassin::Plugin::Razor2\nuse_razor2 0\nendif\n"
        "ifplugin Mail::SpamAssassin::Plugin::Pyzor\nuse_pyzor 0\nendif\n"
        "ifplugin Mail::SpamAssassin::Plugin::DCC\nuse_dcc 0\nendif\n")
    rules = subprocess.run(
        ["bash", "-c", "cat /usr/share/spamassassin/*.cf | grep -oE '^\\s*(body|rawbody|header|uri|"
         "meta|full|mimeheader|eval|uri_detail|askdns)\\s+[A-Z_0-9a-z]+' | awk '{print $2}' | sort -u"],
        capture_output=True, text=True).stdout.split()
    zero = [f"score {r} 0" for r in rules if not r.startswith("BAYES_") and not r.startswith("__")]
    (sa / "etc" / "zz_zero.cf").write_text("\n".join(zero) + "\n")
    rng = random.Random(7)
    train = list(train)
    rng.shuffle(train)
    train = train[:limit] if limit else train
    mdir = sa / "msgs"
    for lab in (HAM, SPAM):
        (mdir / lab).mkdir(parents=True)
    for i, (p, _, lab, _) in enumerate(train):
        (mdir / lab / str(i)).write_bytes(strip_foreign((CORPORA / p).read_bytes()))
    subprocess.run(["chmod", "-R", "a+rwX", str(sa)], check=True)
    base = ["sa-learn", "-L", "-C", "/usr/share/spamassassin", f"--siteconfigpath={sa}/etc"]
    t0 = time.perf_counter()
    subprocess.run([*base, "--ham", "--no-sync", str(mdir / HAM)], check=True, stdout=subprocess.DEVNULL)
    subprocess.run([*base, "--spam", "--no-sync", str(mdir / SPAM)], check=True, stdout=subprocess.DEVNULL)
    subprocess.run([*base, "--sync"], check=True, stdout=subprocess.DEVNULL)
    learn_wall = time.perf_counter() - t0
    subprocess.run(["chmod", "-R", "a+rwX", str(sa)], check=True)
    port = _free_port()
    spamd = subprocess.Popen(
        ["spamd", "-L", "-x", "-C", "/usr/share/spamassassin", f"--siteconfigpath={sa}/etc",
         "-u", "debian-spamd", f"-H{sa}", f"--listen=127.0.0.1:{port}", "--min-children=2",
         "--max-children=2", "-s", "stderr"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(600):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.2)
        results = []
        from concurrent.futures import ThreadPoolExecutor

        def one(row: tuple) -> tuple:
            p, corpus, lab, _ = row
            score, symbols = _spamd_symbols(port, strip_foreign((CORPORA / p).read_bytes()))
            bands = [s for s in symbols if s.startswith("BAYES_")]
            prob = _SA_BAND_PROB.get(bands[-1] if bands else "", 0.5) if bands else 0.5
            if "BAYES_999" in symbols:
                prob = 0.9995
            return (corpus, lab, prob, prob >= 0.99)

        with ThreadPoolExecutor(2) as pool:
            results = list(pool.map(one, test))
    finally:
        spamd.terminate()
        spamd.wait(30)
    return {"results": results, "learn_per_s": len(train) / learn_wall, "trained_on": len(train)}


# SA reports only the band; its midpoint stands in for the probability (AUC over bands).
_SA_BAND_PROB = {"BAYES_00": 0.005, "BAYES_05": 0.03, "BAYES_20": 0.125, "BAYES_40": 0.3,
                 "BAYES_50": 0.5, "BAYES_60": 0.7, "BAYES_80": 0.875, "BAYES_95": 0.97,
                 "BAYES_99": 0.995, "BAYES_999": 0.9995}


def fmt(m: dict) -> str:
    return (f"FP {m['fp'] * 100:6.2f}%  FN {m['fn'] * 100:6.2f}%  AUC {m['auc']:.5f}  "
            f"FN@FP<=0.1% {m['fn_at_fp0.1'] * 100:6.2f}%   (spam {m['n_spam']}, ham {m['n_ham']})")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peers", default="all", choices=("all", "bogofilter", "spamassassin", "none"))
    ap.add_argument("--variant", default="both", choices=("osb", "unigram", "both"))
    ap.add_argument("--sa-train-limit", type=int, default=0,
                    help="train sa-learn on at most N messages of half A (0 = all; ~45 msgs/s)")
    ap.add_argument("--no-cross", action="store_true", help="skip the cross-corpus runs")
    ap.add_argument("--json", default=str(ROOT / "bench" / "out" / "bayes.json"))
    args = ap.parse_args()
    if not (CORPORA / "SPLIT.tsv").exists():
        print(f"bench_bayes: {CORPORA} not found; skipped")
        return 0
    rows = load_split()
    train = [r for r in rows if r[3] == "A"]
    test = [r for r in rows if r[3] == "B"]
    corpora = sorted({r[1] for r in rows})
    workdir = Path(tempfile.mkdtemp(prefix="bench-bayes-", dir="/tmp"))
    os.chmod(workdir, 0o755)
    report: dict = {"train": len(train), "test": len(test), "systems": {}, "cross": {}}
    variants = {"osb": True, "unigram": False}
    if args.variant != "both":
        variants = {args.variant: variants[args.variant]}
    params = ClassifierParams(calibration=DEFAULT_CALIBRATION)
    try:
        systems: dict[str, dict] = {}
        for name, bigrams in variants.items():
            systems[f"filterd-{name}"] = run_filterd(train, test, workdir, bigrams=bigrams, params=params)
        if args.peers in ("all", "bogofilter"):
            r = run_bogofilter(train, test, workdir)
            if r:
                systems["bogofilter"] = r
        if args.peers in ("all", "spamassassin"):
            r = run_spamassassin(train, test, workdir, args.sa_train_limit)
            if r:
                systems["sa-bayes"] = r
        print(f"Train half A: {len(train)} messages; test half B: {len(test)} messages")
        for name, r in systems.items():
            print(f"\n== {name}")
            entry = {"overall": summarize(r["results"])}
            print(f"  {'overall':18} {fmt(entry['overall'])}")
            for c in corpora:
                entry[c] = summarize(r["results"], c)
                print(f"  {c:18} {fmt(entry[c])}")
            for k in ("learn_per_s", "learn_per_cpu_s", "classify_median_ms", "classify_with_parse_median_ms",
                      "tokens", "db_bytes", "trained_on"):
                if k in r:
                    entry[k] = r[k]
            print("  " + "  ".join(f"{k}={entry[k]:.3f}" if isinstance(entry[k], float) else
                                   f"{k}={entry[k]}" for k in entry if not isinstance(entry[k], dict)))
            report["systems"][name] = entry
        if not args.no_cross:
            pairs = [("trec07p", "spamassassin"), ("spamassassin", "trec07p")]
            print("\n== cross-corpus (train on one corpus' half A, test on another's half B)")
            for src, dst in pairs:
                tr = [r for r in train if r[1] == src]
                te = [r for r in test if r[1] == dst]
                for name, bigrams in variants.items():
                    r = run_filterd(tr, te, workdir, bigrams=bigrams, params=params)
                    m = summarize(r["results"])
                    report["cross"][f"filterd-{name} {src}->{dst}"] = m
                    print(f"  filterd-{name:8} {src:>12} -> {dst:12} {fmt(m)}")
                if args.peers in ("all", "bogofilter"):
                    r = run_bogofilter(tr, te, workdir)
                    if r:
                        m = summarize(r["results"])
                        report["cross"][f"bogofilter {src}->{dst}"] = m
                        print(f"  {'bogofilter':17} {src:>12} -> {dst:12} {fmt(m)}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=1, default=str))
    print(f"\nwritten {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
