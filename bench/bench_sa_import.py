"""Do the imported SpamAssassin stock rules hit what spamd hits? (issue 5, not in `make test`)

1. Translates /etc/spamassassin/*.pre and /usr/share/spamassassin/*.cf with `filterd.ruleset.sa_import` and loads the result
   on top of the shipped rules, as a site's local.d would.
2. Starts a private spamd (-L: local tests only; no Bayes, no DNS, no Razor/Pyzor/DCC) on a
   loopback port with its own site config in a temporary directory, as the user debian-spamd
   (or uses one already listening: --spamd-port with --no-start).
3. Sends a deterministic sample of half B of ../shared/corpora (every k-th message, --messages)
   to spamd with SYMBOLS (SPAMC/1.5, one connection per message) and runs filterd's engine and
   meta rules on the same bytes.
4. Per message compares the two sets of hits restricted to the rules that were translated and
   that SpamAssassin scores in score set 0 (rules scoring 0 do not run in SpamAssassin; `__`
   helpers are never reported by spamd). A message agrees when both sets are equal.
Prints the agreement rate and the rules that disagree most (filterd-only / spamd-only counts),
and writes bench/out/sa_import.json. spamd does ~8 msgs/s on this machine: run it in the
background for a few hundred messages.
Usage: bench/bench_sa_import.py [--messages 300] [--spamd-port 7843] [--no-start]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from spamc import spamd_symbols  # noqa: E402 (bench/spamc.py, beside this script)

from filterd.checks import sa_evals  # noqa: E402
from filterd.config import PROJECT_RULES  # noqa: E402
from filterd.message import parse  # noqa: E402
from filterd.ruleset import fit, load, sa_import  # noqa: E402

CORPORA = REPO.parent / "shared" / "corpora"
SA_DIR = Path("/usr/share/spamassassin")
RUN_AS = "debian-spamd"
SITE_CF = """required_score 5
use_bayes 0
skip_rbl_checks 1
dns_available no
ifplugin Mail::SpamAssassin::Plugin::Razor2
use_razor2 0
endif
ifplugin Mail::SpamAssassin::Plugin::Pyzor
use_pyzor 0
endif
ifplugin Mail::SpamAssassin::Plugin::DCC
use_dcc 0
endif
"""


def start_spamd(port: int, workdir: Path) -> subprocess.Popen[bytes]:
    etc = workdir / "etc"
    shutil.copytree("/etc/spamassassin", etc)
    (etc / "zz_bench_sa_import.cf").write_text(SITE_CF)
    (workdir / "home").mkdir()
    shutil.chown(workdir / "home", RUN_AS)
    os.chmod(workdir, 0o755)
    proc = subprocess.Popen(
        ["spamd", "-L", "-x", "-C", str(SA_DIR), f"--siteconfigpath={etc}", "-u", RUN_AS,
         "-H", str(workdir / "home"), f"--listen=127.0.0.1:{port}", "--min-children=2",
         "--max-children=2", "-s", "stderr"],
        stdout=subprocess.DEVNULL, stderr=open(workdir / "spamd.log", "wb"))
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            log = (workdir / "spamd.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"spamd exited:\n{log}")
        try:
            spamd_symbols(port, b"Subject: ping\n\nping\n")
            return proc
        except OSError:
            time.sleep(1)
    proc.terminate()
    raise RuntimeError("spamd did not start within 180 s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=300)
    parser.add_argument("--spamd-port", type=int, default=7843)
    parser.add_argument("--no-start", action="store_true", help="use a spamd already listening")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--no-hyperscan", action="store_true",
                        help="compile and match with plain `re` (rule by rule) instead of "
                             "Hyperscan: the same hits (tests/unit/test_rules_engine checks "
                             "both paths agree), without Hyperscan's compile time for ~2,500 "
                             "imported patterns")
    parser.add_argument("--stop-after", type=int, default=0,
                        help="compare only the first N messages of the sample (quick looks)")
    args = parser.parse_args()
    if not SA_DIR.is_dir() or not CORPORA.is_dir():
        print(f"needs {SA_DIR} and {CORPORA}", file=sys.stderr)
        return 2

    started = time.time()
    # the .pre files first: their loadplugin lines decide the ifplugin/if can() blocks, as in
    # the spamd started below (it reads the same /etc/spamassassin)
    result = sa_import.import_files(sorted(Path("/etc/spamassassin").glob("*.pre"))
                                    + sorted(SA_DIR.glob("*.cf")))
    compared = {n for n in [*result.rules, *result.local_evals]
                if not n.startswith("__") and result.scores.get(n, 0)}
    tmp = Path(tempfile.mkdtemp(prefix="bench-sa-import-"))
    os.chmod(tmp, 0o755)          # spamd runs as debian-spamd and reads its config here
    site = tmp / "site"
    (site / "local.d").mkdir(parents=True)
    (site / "local.d" / "sa.toml").write_text(sa_import.to_toml(result))
    if args.no_hyperscan:
        from filterd.ruleset import engine as engine_module
        engine_module.HAVE_HYPERSCAN = False
    ruleset = load(PROJECT_RULES, site)
    engine = ruleset.engine
    settings = fit.make_settings(None)
    print(f"{sa_import.summary(result)}; {len(compared)} scored rules compared; "
          f"loaded in {time.time() - started:.0f}s", flush=True)
    # The DNS list tests became [check.*] bindings (network checks): neither side runs them
    # here (spamd -L does no network tests, and only the engine is run), so they and the metas
    # over them are compared with those names unset on both sides.
    print(f"{len(result.check_symbols)} DNS list tests translated as network checks, not run "
          f"by this bench (spamd -L runs none either)", flush=True)

    samples = [s for s in fit.read_split(CORPORA / "SPLIT.tsv", CORPORA, [CORPORA])
               if s.half == "B"]
    step = max(1, len(samples) // args.messages)
    samples = samples[::step][:args.messages]
    if args.stop_after:
        samples = samples[:args.stop_after]

    proc = None
    try:
        if not args.no_start:
            proc = start_spamd(args.spamd_port, tmp / "spamd")
        agree = 0
        only_filterd: collections.Counter[str] = collections.Counter()
        only_spamd: collections.Counter[str] = collections.Counter()
        both: collections.Counter[str] = collections.Counter()
        per_message = []
        t0 = time.time()
        for i, sample in enumerate(samples):
            raw = (CORPORA / sample.path).read_bytes()
            theirs = set(spamd_symbols(args.spamd_port, raw)[1]) & compared
            view = parse(raw, content_limit=settings.scan.content_size_limit,
                         trusted_networks=settings.scan.trusted_networks)
            match = engine.match(view)
            # the local eval: tests run as filterd's [check.sa_local_evals] binding would
            evals, eval_errors = sa_evals.evaluate_with_errors(
                view, result.local_evals, result.addr_lists, result.freemail_domains)
            if eval_errors:
                print(f"  {sample.path}: eval errors {eval_errors[:3]}", flush=True)
            values = {n: 1.0 for n in match.hits}
            values.update({n: float(v) for n, v in evals.items()})   # counts of `multiple`
            metas, _ = engine.evaluate_metas(values)
            ours = (set(match.hits) | set(evals) | set(metas)) & compared
            if ours == theirs:
                agree += 1
            only_filterd.update(ours - theirs)
            only_spamd.update(theirs - ours)
            both.update(ours & theirs)
            per_message.append({"path": sample.path, "filterd_only": sorted(ours - theirs),
                                "spamd_only": sorted(theirs - ours)})
            if (i + 1) % 50 == 0:
                print(f"  {i + 1}/{len(samples)} messages, agreement so far "
                      f"{100 * agree / (i + 1):.1f} %, {time.time() - t0:.0f}s", flush=True)
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(tmp, ignore_errors=True)

    n = len(per_message)
    rate = agree / n if n else float("nan")
    disagreeing = sorted(set(only_filterd) | set(only_spamd),
                         key=lambda r: -(only_filterd[r] + only_spamd[r]))
    print(f"\nsame hits as spamd on {agree} of {n} messages of half B: {100 * rate:.1f} %")
    print(f"rule hits compared: {sum(both.values())} in both, {sum(only_filterd.values())} "
          f"filterd only, {sum(only_spamd.values())} spamd only")
    print(f"\n{'rule':<32} {'filterd only':>12} {'spamd only':>10} {'both':>6}")
    for rule in disagreeing[:args.top]:
        print(f"{rule:<32} {only_filterd[rule]:>12} {only_spamd[rule]:>10} {both[rule]:>6}")
    out = REPO / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    (out / "sa_import.json").write_text(json.dumps({
        "summary": sa_import.summary(result), "compared_rules": len(compared),
        "messages": n, "agree": agree, "agreement": rate,
        "disagreeing": [{"rule": r, "filterd_only": only_filterd[r], "spamd_only": only_spamd[r],
                         "both": both[r]} for r in disagreeing],
        "per_message": per_message}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
