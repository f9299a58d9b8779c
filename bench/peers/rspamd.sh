#!/usr/bin/env bash
# rspamd 3.4 (Debian) + a private redis for the side-by-side benchmark, configured as described
# in ../shared/notes/peers.md: a copy of /etc/rspamd, every override in local.d/, network checks
# off (rbl, surbl, emails, spf, dkim, dmarc, arc, asn, fuzzy_check, url_redirector,
# once_received, hfilter's from checks, phishing feeds), greylist and neural off, Bayes in redis
# 127.0.0.1:6389 without autolearn; normal worker :11433, controller :11434, proxy :11432.
#
#   bench/peers/rspamd.sh configure
#   bench/peers/rspamd.sh start|stop
#   bench/peers/rspamd.sh train HAM SPAM      rspamc learn_ham/learn_spam (Learn-Type: bulk)
# Everything lives under $RS_ROOT (default /tmp/peers/rspamd); /etc/rspamd is only read.
set -euo pipefail
RS_ROOT=${RS_ROOT:-/tmp/peers/rspamd}
ETC=$RS_ROOT/etc
REDIS_PORT=6389

configure() {
  rm -rf "$ETC"; mkdir -p "$RS_ROOT"/{db,run,log,redis}
  cp -a /etc/rspamd "$ETC"
  # private ports (loopback only) in our copy of rspamd.conf
  sed -i -e 's/localhost:11333/127.0.0.1:11433/' -e 's/localhost:11334/127.0.0.1:11434/' \
         -e 's/localhost:11332/127.0.0.1:11432/' -e 's/localhost:11335/127.0.0.1:11435/' \
         "$ETC/rspamd.conf"
  local L=$ETC/local.d; mkdir -p "$L"
  echo "servers = \"127.0.0.1:$REDIS_PORT\";" > "$L/redis.conf"
  echo 'autolearn = false;' > "$L/classifier-bayes.conf"
  echo 'dns { nameserver = ["127.0.0.1:53"]; }' > "$L/options.inc"
  for m in rbl surbl emails spf dkim dmarc arc asn fuzzy_check url_redirector once_received \
           greylist neural; do
    echo 'enabled = false;' > "$L/$m.conf"
  done
  echo 'from_enabled = false;' > "$L/hfilter.conf"
  printf 'openphish_enabled = false;\nphishtank_enabled = false;\n' > "$L/phishing.conf"
  printf 'type = "file";\nfilename = "$LOGDIR/rspamd.log";\nlevel = "info";\n' > "$L/logging.inc"
  if [ -n "${RSPAMD_NORMAL_WORKERS:-}" ]; then
    echo "count = $RSPAMD_NORMAL_WORKERS;" > "$L/worker-normal.inc"
  fi
  chown -R _rspamd:_rspamd "$RS_ROOT"/{db,run,log}
  echo "configured $RS_ROOT"
}

redis_start() {
  redis-cli -p $REDIS_PORT ping >/dev/null 2>&1 && return 0
  redis-server --port $REDIS_PORT --bind 127.0.0.1 --save "" --appendonly no \
      --dir "$RS_ROOT/redis" --daemonize yes --pidfile "$RS_ROOT/redis/redis.pid" \
      --logfile "$RS_ROOT/redis/redis.log"
  for _ in $(seq 1 50); do redis-cli -p $REDIS_PORT ping >/dev/null 2>&1 && return 0; sleep 0.1; done
  return 1
}

start() {
  redis_start
  if [ -s "$RS_ROOT/run/main.pid" ] && kill -0 "$(cat "$RS_ROOT/run/main.pid")" 2>/dev/null; then
    return 0
  fi
  rspamd -f -u _rspamd -g _rspamd -c "$ETC/rspamd.conf" --var CONFDIR="$ETC" \
      --var LOCAL_CONFDIR="$ETC" --var DBDIR="$RS_ROOT/db" --var RUNDIR="$RS_ROOT/run" \
      --var LOGDIR="$RS_ROOT/log" >"$RS_ROOT/log/stdout.log" 2>&1 &
  echo $! > "$RS_ROOT/run/main.pid"
  for _ in $(seq 1 240); do   # config load + hyperscan compile can take a minute
    if curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:11433/ping 2>/dev/null | grep -q 200; then
      echo "rspamd up"; return 0
    fi
    sleep 0.5
  done
  echo "rspamd did not answer" >&2; return 1
}

stop() {
  if [ -s "$RS_ROOT/run/main.pid" ]; then
    local pid; pid=$(cat "$RS_ROOT/run/main.pid"); kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    rm -f "$RS_ROOT/run/main.pid"
  fi
  if [ -s "$RS_ROOT/redis/redis.pid" ]; then
    kill "$(cat "$RS_ROOT/redis/redis.pid")" 2>/dev/null || true
  fi
}

train() {  # $1 ham list, $2 spam list
  local t0=$(date +%s.%N)
  for kind in ham spam; do
    local list=$1; [ $kind = spam ] && list=$2
    split -l 2000 "$list" "$RS_ROOT/run/chunk-$kind-"
    for chunk in "$RS_ROOT"/run/chunk-$kind-*; do
      xargs -a "$chunk" rspamc -h 127.0.0.1:11434 -n 4 -t 120 --header 'Learn-Type: bulk' \
          learn_$kind >>"$RS_ROOT/log/learn-$kind.txt" 2>&1 || true
      rm -f "$chunk"
    done
  done
  redis-cli -p $REDIS_PORT SAVE >/dev/null
  local t1=$(date +%s.%N)
  echo "trained in $(echo "$t1 - $t0" | bc) s: $(grep -c 'success = true' "$RS_ROOT"/log/learn-ham.txt) ham," \
       "$(grep -c 'success = true' "$RS_ROOT"/log/learn-spam.txt) spam learned"
}

"$@"
