#!/usr/bin/env bash
# `make bench`: run every bench/bench_*.py in order; each prints its table and writes JSON
# under bench/out/. Not part of `make test`.
set -uo pipefail
cd "$(dirname "$0")/.."
mkdir -p bench/out
status=0
for script in bench/bench_*.py; do
  echo "=== $script"
  .venv/bin/python "$script" || { echo "!!! $script failed"; status=1; }
done
exit $status
