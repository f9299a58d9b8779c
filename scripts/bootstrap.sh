#!/usr/bin/env bash
# Install what filterd needs on a Debian machine, idempotently.
#
#   scripts/bootstrap.sh run    Debian packages for running filterd (when root) + .venv
#   scripts/bootstrap.sh test   the above + everything the test suite starts for real
#                               (Postfix, clamd, a DNS server, Redis) + test Python packages
#   scripts/bootstrap.sh bench  the above + the peers measured by `make bench`
#
# Debian packages are installed only when running as root; otherwise the script says what
# is missing and carries on, so a non-root developer still gets the virtualenv.
set -euo pipefail
cd "$(dirname "$0")/.."
what="${1:-run}"
PY="${PYTHON:-python3}"
VENV=.venv
STAMP_DIR=$VENV/.stamps

run_pkgs=(libmilter-dev gcc libmagic1 clamav-daemon)
test_pkgs=(postfix swaks clamav clamav-testfiles unbound redis-server chromium)
bench_pkgs=(spamassassin spamc spamd sa-compile rspamd bogofilter)

pkgs=("${run_pkgs[@]}")
[ "$what" = test ] || [ "$what" = bench ] && pkgs+=("${test_pkgs[@]}")
[ "$what" = bench ] && pkgs+=("${bench_pkgs[@]}")

missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    # Package scripts must not start daemons (Postfix on :25, freshclam reaching the network,
    # unbound fetching trust anchors): policy-rc.d refuses every start, but only while this
    # install runs. Left in place it would stop every later apt-get on the host from restarting
    # its daemons (Postfix included), so ours is removed on exit; a host's own one is kept.
    if [ ! -e /usr/sbin/policy-rc.d ]; then
      printf '#!/bin/sh\n# temporary: written by filterd scripts/bootstrap.sh, removed when it ends\nexit 101\n' \
        > /usr/sbin/policy-rc.d
      chmod +x /usr/sbin/policy-rc.d
      trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    debconf-set-selections <<'DEB'
postfix postfix/main_mailer_type select No configuration
postfix postfix/mailname string filterd.test
clamav-freshclam clamav-freshclam/autoupdate_freshclam select manual
DEB
    echo "bootstrap: installing Debian packages: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "bootstrap: not root, cannot install Debian packages: ${missing[*]}" >&2
    echo "bootstrap: run 'sudo $0 $what' once, or install them yourself" >&2
  fi
fi

[ -x $VENV/bin/python ] || "$PY" -m venv $VENV
mkdir -p $STAMP_DIR
extras=""
case "$what" in
  run) extras="" ;;
  test|bench) extras="[test,redis,archives,hyperscan,report]" ;;
esac
stamp=$STAMP_DIR/pip-$(echo "$what" | tr -c 'a-z' _)-$(cat setup.cfg | sha1sum | cut -c1-12)
if [ ! -f "$stamp" ]; then
  $VENV/bin/pip install -q --upgrade pip >/dev/null
  $VENV/bin/pip install -q -e ".$extras"
  touch "$stamp"
fi
echo "bootstrap: $what environment ready"
