#!/usr/bin/env bash
# `make run`: start filterd in the foreground on its built-in defaults, state under ./var.
# Brings up what the default configuration needs and says what to put into Postfix.
set -euo pipefail
cd "$(dirname "$0")/.."
# What this script and its run.d hooks create under the state directory (settings, the private
# clamd's directory) follows the file-mode policy too, whatever the caller's umask.
umask 027
STATE="${1:-./var}"
mkdir -p -m 0750 "$STATE"   # the state dir is no one else's business (filterd/modes.py)
STATE="$(cd "$STATE" && pwd)"
export FILTERD_STATE_DIR="$STATE"
args=()
[ -f /etc/filterd/filterd.toml ] || args+=()
# Optional per-checkout settings file for `make run`; the built-in defaults apply otherwise.
if [ -f ./filterd.toml ]; then args+=(--config ./filterd.toml); fi
for hook in scripts/run.d/*.sh; do
  [ -e "$hook" ] && source "$hook"
done
cat <<MSG
filterd: state in $STATE
filterd: put ONE of these into Postfix (full snippets: packaging/postfix/):
  milter:      smtpd_milters = inet:127.0.0.1:8890
               milter_default_action = tempfail
  after-queue: content_filter = filterd:[127.0.0.1]:10024
               (plus the filterd transport and the 127.0.0.1:10025 reinjection listener
                from packaging/postfix/master.cf.after-queue)
filterd: stop with Ctrl-C
MSG
exec .venv/bin/filterd "${args[@]}" serve
