#!/usr/bin/env bash
# Instructions Cohort runs for a fixed number of requests, counted by
# valgrind's callgrind: a figure that, unlike CPU time, does not move with
# the machine's load, so two builds can be told apart by a change of 1%.
#
#   benches/instructions.sh [binary ...]    default: target/release/cohort
#
# For each binary: one nginx worker as the backend (stable and canary),
# Cohort with `listen.workers = 1` and a 10% canary, run under callgrind;
# REQUESTS (default 12000) GETs with an `x-user-id` from oha over 16
# keep-alive connections; then Cohort is stopped and the whole process's
# instruction count printed (start-up and shutdown included: the same for
# every build). RUNS (default 2) runs of each binary, interleaved.
# Needs valgrind, nginx, curl and oha (on PATH, in OHA, or installed by
# benches/compare.sh into target/bench-tools). The profiles are kept in
# PROFILES (default: a fresh directory, printed) for callgrind_annotate.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
REQUESTS=${REQUESTS:-12000}
RUNS=${RUNS:-2}
OHA=${OHA:-$(command -v oha || echo "$ROOT/target/bench-tools/bin/oha")}
for t in valgrind nginx curl "$OHA"; do
  command -v "$t" >/dev/null || { echo "instructions.sh: '$t' not found" >&2; exit 1; }
done
BINS=("$@")
[ ${#BINS[@]} -gt 0 ] || BINS=("$ROOT/target/release/cohort")
for p in 9501 9502 9500 9509; do
  if (exec 3<>/dev/tcp/127.0.0.1/$p) 2>/dev/null; then echo "instructions.sh: port $p is in use" >&2; exit 1; fi
done

W=$(mktemp -d)
PROFILES=${PROFILES:-$(mktemp -d)}
cleanup() {
  set +e
  [ -f "$W/backend.pid" ] && kill "$(cat "$W/backend.pid")" 2>/dev/null
  rm -rf "$W"
}
trap cleanup EXIT

cat > "$W/backend.conf" <<CONF
worker_processes 1; pid $W/backend.pid; error_log $W/backend.err; daemon on;
events { worker_connections 1024; }
http { access_log off; keepalive_requests 1000000;
  server { listen 127.0.0.1:9501; location / { return 200 "stable\n"; } }
  server { listen 127.0.0.1:9502; location / { return 200 "canary\n"; } } }
CONF
nginx -c "$W/backend.conf"
cat > "$W/cohort.toml" <<CONF
[listen]
addr = "127.0.0.1:9500"
workers = 1
[admin]
addr = "127.0.0.1:9509"
[state]
path = "$W/state.json"
audit_log = "$W/audit.jsonl"
[routing]
sticky_keys = ["header:x-user-id"]
[versions.stable]
name = "v1"
upstreams = ["127.0.0.1:9501"]
[versions.canary]
name = "v2"
upstreams = ["127.0.0.1:9502"]
weight = 10
CONF

# Prints the instruction count of one run of the binary $1, profile tagged $2.
count() {
  local out="$PROFILES/callgrind.$2"
  rm -f "$W/state.json"
  valgrind --tool=callgrind --callgrind-out-file="$out" "$1" serve --config "$W/cohort.toml" \
    > "$W/cohort.log" 2>&1 &
  local pid=$!
  local up=""
  for _ in $(seq 300); do
    curl -fs -o /dev/null -H 'x-user-id: warm-up' http://127.0.0.1:9500/ && { up=1; break; }
    sleep 0.2
  done
  [ -n "$up" ] || { echo "instructions.sh: $1 did not start" >&2; cat "$W/cohort.log" >&2; exit 1; }
  "$OHA" -n "$REQUESTS" -c 16 --no-tui -H 'x-user-id: user-42' http://127.0.0.1:9500/ > "$W/oha.txt"
  grep -q 'Success rate:.*100.00%' "$W/oha.txt" || { echo "instructions.sh: requests failed" >&2; cat "$W/oha.txt" >&2; exit 1; }
  kill -TERM "$pid"
  wait "$pid" || true
  sed -n 's/^summary: //p' "$out"
}

echo "profiles in $PROFILES"
for run in $(seq "$RUNS"); do
  i=0
  for bin in "${BINS[@]}"; do
    i=$((i + 1))
    printf '%s\trun %s\t%s instructions\n' "$bin" "$run" "$(count "$bin" "$i.$run")"
  done
done
