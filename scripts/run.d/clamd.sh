# Sourced by scripts/run.sh (bash) before `filterd serve` on `make run`.
# Uses: STATE (state directory), args (filterd's global options); may replace args.
#
# Starts a private clamd under $STATE/clamd (packaging/clamav/clamd.conf.in) and points
# filterd at its socket through a generated settings file, $STATE/run-filterd.toml: the
# settings of ./filterd.toml (if any) plus clamav.socket and clamav.stream_max_length.
#   - signatures: /var/lib/clamav when it has *.cvd/*.cld files (freshclam's), else the
#     project's TEST database (EICAR + ClamAV test files only) with a loud warning;
#   - no clamd installed: the antivirus check is disabled (a site layer in $STATE/run-site),
#     loudly, instead of every message tempfailing on CLAM_UNAVAILABLE.
# clamd runs in the foreground as a child of this shell and so of filterd (run.sh execs it):
# Ctrl-C stops both. A clamd left running from an earlier `make run` is reused.

_clamd_warn() { printf '\n\033[1;31m*** filterd/make run: %s ***\033[0m\n\n' "$*" >&2; }

_clamd_setup() {
  local clamd_bin clamd_dir="$STATE/clamd" db_note="" py=".venv/bin/python"
  local site="$STATE/run-site" orig_config="" disable=0 i sock="$STATE/clamd/clamd.sock"
  for ((i = 0; i < ${#args[@]}; i++)); do
    [ "${args[$i]}" = "--config" ] && orig_config="${args[$((i + 1))]}"
  done
  [ -z "$orig_config" ] && [ -n "${FILTERD_CONFIG:-}" ] && orig_config="$FILTERD_CONFIG"
  if [ -n "$orig_config" ] && grep -q '^\[clamav\]' "$orig_config" 2>/dev/null; then
    echo "filterd: clamd: $orig_config has a [clamav] section: using it, no private clamd" >&2
    return 0
  fi

  clamd_bin="$(command -v clamd || true)"
  [ -z "$clamd_bin" ] && [ -x /usr/sbin/clamd ] && clamd_bin=/usr/sbin/clamd
  if [ -z "$clamd_bin" ]; then
    _clamd_warn "clamd is not installed (Debian: apt-get install clamav-daemon): the" \
      "ANTIVIRUS CHECK IS DISABLED for this run; mail is NOT scanned for viruses"
    disable=1
  else
    mkdir -p "$clamd_dir"
    if ! "$py" - "$sock" <<'PY' 2>/dev/null
import socket, sys
s = socket.socket(socket.AF_UNIX); s.settimeout(2); s.connect(sys.argv[1])
s.sendall(b"zPING\0"); sys.exit(0 if s.recv(16).startswith(b"PONG") else 1)
PY
    then
      local dbdir="$clamd_dir/db"
      if compgen -G "/var/lib/clamav/*.cvd" >/dev/null || compgen -G "/var/lib/clamav/*.cld" >/dev/null; then
        dbdir=/var/lib/clamav
        db_note="system signatures in /var/lib/clamav"
      else
        packaging/clamav/make-test-db "$clamd_dir/db" >/dev/null
        db_note="TEST signatures only"
        _clamd_warn "no ClamAV signatures in /var/lib/clamav (run freshclam): clamd uses the" \
          "project's TEST database (EICAR and the ClamAV test files ONLY); real viruses PASS"
      fi
      local port
      port="$("$py" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
      sed -e "s|@CLAMD_DIR@|$clamd_dir|g" -e "s|@CLAMD_TCP_PORT@|$port|g" \
          -e "s|^DatabaseDirectory .*|DatabaseDirectory $dbdir|" \
          -e "s|^LocalSocketMode .*|LocalSocketMode 660|" -e "/^PidFile /d" \
          packaging/clamav/clamd.conf.in > "$clamd_dir/clamd.conf"
      "$clamd_bin" -c "$clamd_dir/clamd.conf" >>"$clamd_dir/clamd.out" 2>&1 &
      local pid=$! waited=0
      echo "filterd: clamd: starting (pid $pid, $db_note), log $clamd_dir/clamd.log" >&2
      until [ -S "$sock" ] && "$py" - "$sock" <<'PY' 2>/dev/null
import socket, sys
s = socket.socket(socket.AF_UNIX); s.settimeout(2); s.connect(sys.argv[1])
s.sendall(b"zPING\0"); sys.exit(0 if s.recv(16).startswith(b"PONG") else 1)
PY
      do
        if ! kill -0 "$pid" 2>/dev/null || [ "$waited" -ge 240 ]; then
          _clamd_warn "clamd did not start (see $clamd_dir/clamd.log): the ANTIVIRUS CHECK IS" \
            "DISABLED for this run"
          kill "$pid" 2>/dev/null
          disable=1
          break
        fi
        sleep 0.5
        waited=$((waited + 1))
      done
    else
      echo "filterd: clamd: reusing the running clamd on $sock" >&2
    fi
  fi

  # The generated settings file: the original settings plus ours. A site layer of our own
  # keeps the original local.d/override.d files (symlinked) and, without clamd, adds one
  # that disables the antivirus binding.
  local gen="$STATE/run-filterd.toml"
  rm -rf "$site"
  mkdir -p "$site/local.d" "$site/override.d"
  "$py" - "$orig_config" "$gen" "$site" "$sock" "$disable" <<'PY' || return 1
import os, sys
from pathlib import Path
from filterd import config
orig, gen, site, sock, disable = sys.argv[1:6]
settings = config.load(orig or None, explicit=bool(orig))
old_site = settings.site_rules_dir
if old_site is not None:
    for sub in ("local.d", "override.d"):
        for f in sorted((old_site / sub).glob("*.toml")) if (old_site / sub).is_dir() else []:
            os.symlink(f.resolve(), Path(site, sub, f.name))
overrides = {"rules.site_dir": site}
if disable == "1":
    Path(site, "local.d", "zz-run-no-clamd.toml").write_text(
        "# written by scripts/run.d/clamd.sh: clamd is not available for `make run`\n"
        "[check.clamav]\nenabled = false\n")
else:
    overrides.update({"clamav.socket": sock, "clamav.tcp": "",
                      "clamav.stream_max_length": 64 * 1024 * 1024})  # clamd.conf.in: 64M
settings = settings.with_overrides(overrides, source="scripts/run.d/clamd.sh")
tmp = gen + ".tmp"
Path(tmp).write_text("# generated by scripts/run.d/clamd.sh for `make run`; do not edit\n"
                     + config.render_toml(settings, non_default=True, docs=False))
os.replace(tmp, gen)
PY
  local new_args=() skip=0
  for i in "${args[@]}"; do
    if [ "$skip" = 1 ]; then skip=0; continue; fi
    if [ "$i" = "--config" ]; then skip=1; continue; fi
    new_args+=("$i")
  done
  args=(--config "$gen" "${new_args[@]}")
  export FILTERD_CONFIG="$gen"
}

_clamd_setup || _clamd_warn "clamd setup failed; filterd runs on its own settings"
