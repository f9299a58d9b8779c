#!/usr/bin/env bash
# SpamAssassin 4.0.1 (Debian) for the side-by-side benchmark, configured as described in
# ../shared/notes/peers.md: stock rules from /usr/share/spamassassin (no sa-update), compiled
# body rules (sa-compile, Debian's default), local tests only (-L), Bayes on without autolearn,
# no DNS, no Razor/Pyzor/DCC; spamd on 127.0.0.1:7833 with 4 children.
#
#   bench/peers/spamassassin.sh configure         write /tmp/peers/spamassassin
#   bench/peers/spamassassin.sh train HAM SPAM    sa-learn from two files listing messages
#   bench/peers/spamassassin.sh start|stop|status
# Everything lives under $SA_ROOT (default /tmp/peers/spamassassin); nothing else is touched.
set -euo pipefail
SA_ROOT=${SA_ROOT:-/tmp/peers/spamassassin}
PORT=${SA_PORT:-7833}
RULES=/usr/share/spamassassin
RUN_AS=debian-spamd

configure() {
  rm -rf "$SA_ROOT/etc" "$SA_ROOT/bayes"; mkdir -p "$SA_ROOT"/{etc,bayes,home,logs}
  cp -a /etc/spamassassin/. "$SA_ROOT/etc/"
  if [ "${SA_RULE2XS:-1}" = 0 ]; then rm -f "$SA_ROOT/etc/sa-compile.pre"; fi
  cat > "$SA_ROOT/etc/zz_peersbench.cf" <<CF
required_score 5
use_bayes 1
bayes_auto_learn 0
bayes_path $SA_ROOT/bayes/bayes
skip_rbl_checks 1
dns_available no
dns_server 127.0.0.1
ifplugin Mail::SpamAssassin::Plugin::Razor2
use_razor2 0
endif
ifplugin Mail::SpamAssassin::Plugin::Pyzor
use_pyzor 0
endif
ifplugin Mail::SpamAssassin::Plugin::DCC
use_dcc 0
endif
CF
  chown -R "$RUN_AS:" "$SA_ROOT"
  spamassassin -C "$RULES" --siteconfigpath="$SA_ROOT/etc" --lint
  echo "configured $SA_ROOT"
}

train() {  # $1: file listing ham paths, $2: file listing spam paths
  local t0=$(date +%s.%N)
  runuser -u "$RUN_AS" -- sa-learn -L -C "$RULES" --siteconfigpath="$SA_ROOT/etc" \
      --ham --no-sync -f "$1" >"$SA_ROOT/logs/learn-ham.txt" 2>&1
  runuser -u "$RUN_AS" -- sa-learn -L -C "$RULES" --siteconfigpath="$SA_ROOT/etc" \
      --spam --no-sync -f "$2" >"$SA_ROOT/logs/learn-spam.txt" 2>&1
  runuser -u "$RUN_AS" -- sa-learn -L -C "$RULES" --siteconfigpath="$SA_ROOT/etc" \
      --sync >"$SA_ROOT/logs/learn-sync.txt" 2>&1
  local t1=$(date +%s.%N)
  runuser -u "$RUN_AS" -- sa-learn -C "$RULES" --siteconfigpath="$SA_ROOT/etc" --dump magic \
      >"$SA_ROOT/logs/bayes-magic.txt" 2>&1 || true
  echo "trained in $(echo "$t1 - $t0" | bc) s: $(cat "$SA_ROOT"/logs/learn-{ham,spam}.txt | tr '\n' ' ')"
}

start() {
  [ -s "$SA_ROOT/spamd.pid" ] && kill -0 "$(cat "$SA_ROOT/spamd.pid")" 2>/dev/null && return 0
  spamd -L -x -C "$RULES" --siteconfigpath="$SA_ROOT/etc" -u "$RUN_AS" -H "$SA_ROOT/home" \
      --listen="127.0.0.1:$PORT" --allowed-ips=127.0.0.1 --min-children=4 --max-children=4 \
      --pidfile="$SA_ROOT/spamd.pid" -s "$SA_ROOT/logs/spamd.log" -d
  for _ in $(seq 1 120); do
    spamc -d 127.0.0.1 -p "$PORT" -K >/dev/null 2>&1 && { echo "spamd up on :$PORT"; return 0; }
    sleep 0.5
  done
  echo "spamd did not answer" >&2; return 1
}

stop() {
  [ -s "$SA_ROOT/spamd.pid" ] || return 0
  local pid; pid=$(cat "$SA_ROOT/spamd.pid")
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
  rm -f "$SA_ROOT/spamd.pid"
}

status() { spamc -d 127.0.0.1 -p "$PORT" -K; }

"$@"
