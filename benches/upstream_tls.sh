#!/usr/bin/env bash
# CPU per request of Cohort in front of `https://` upstreams: one nginx
# worker terminating TLS, reached over HTTP/2 (ALPN `h2`) and over HTTP/1.1
# (an nginx that offers only `http/1.1`), for each binary given, runs
# interleaved.
#
#   benches/upstream_tls.sh [binary ...]    default: target/release/cohort
#
# Layout as in the shared comparison: the backend and the load generator
# (oha, C keep-alive connections, D seconds) share core 0, Cohort
# (`listen.workers = 1`) is pinned alone to core 1. CPU per request is
# Cohort's user+system time over the run divided by the requests served.
# RUNS (default 3) rounds; D (default 8), C (default 64). Needs nginx,
# openssl, curl, taskset and oha (on PATH, in OHA, or installed by
# benches/compare.sh into target/bench-tools).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
RUNS=${RUNS:-3}; D=${D:-8}; C=${C:-64}
OHA=${OHA:-$(command -v oha || echo "$ROOT/target/bench-tools/bin/oha")}
for t in nginx openssl curl taskset "$OHA"; do
  command -v "$t" >/dev/null || { echo "upstream_tls.sh: '$t' not found" >&2; exit 1; }
done
BINS=("$@")
[ ${#BINS[@]} -gt 0 ] || BINS=("$ROOT/target/release/cohort")
for p in 9521 9522 9520 9529; do
  if (exec 3<>/dev/tcp/127.0.0.1/$p) 2>/dev/null; then echo "upstream_tls.sh: port $p is in use" >&2; exit 1; fi
done

W=$(mktemp -d)
COHORT_PID=""
cleanup() {
  set +e
  [ -n "$COHORT_PID" ] && kill "$COHORT_PID" 2>/dev/null
  [ -f "$W/backend.pid" ] && kill "$(cat "$W/backend.pid")" 2>/dev/null
  rm -rf "$W"
}
trap cleanup EXIT

# A leaf for 127.0.0.1 that is its own root (CA:FALSE, as rustls requires).
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
  -subj /CN=127.0.0.1 -addext subjectAltName=IP:127.0.0.1 \
  -addext basicConstraints=critical,CA:FALSE \
  -keyout "$W/leaf.key" -out "$W/leaf.crt" 2>/dev/null
cat > "$W/backend.conf" <<CONF
worker_processes 1; pid $W/backend.pid; error_log $W/backend.err; daemon on;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000;
  ssl_certificate $W/leaf.crt; ssl_certificate_key $W/leaf.key;
  server { listen 127.0.0.1:9521 ssl http2; location / { return 200 "h2\n"; } }
  server { listen 127.0.0.1:9522 ssl; location / { return 200 "http/1.1\n"; } } }
CONF
taskset -c 0 nginx -c "$W/backend.conf"

# Prints Cohort's CPU per request, in µs, with the binary $1 in front of
# the upstream $2, after the label $3.
cpu_per_request() {
  cat > "$W/cohort.toml" <<CONF
[listen]
addr = "127.0.0.1:9520"
workers = 1
[admin]
addr = "127.0.0.1:9529"
[state]
path = "$W/state.json"
[upstream]
ca_file = "$W/leaf.crt"
[versions.stable]
name = "v1"
upstreams = ["$2"]
CONF
  rm -f "$W/state.json"
  taskset -c 1 "$1" serve --config "$W/cohort.toml" > "$W/cohort.log" 2>&1 &
  local pid=$! up=""
  COHORT_PID=$pid
  for _ in $(seq 100); do
    curl -fs -o /dev/null http://127.0.0.1:9520/ && { up=1; break; }
    sleep 0.1
  done
  [ -n "$up" ] || { echo "upstream_tls.sh: $1 did not start" >&2; cat "$W/cohort.log" >&2; exit 1; }
  local tick before after
  tick=$(getconf CLK_TCK)
  before=$(awk '{print $14 + $15}' "/proc/$pid/stat")
  taskset -c 0 "$OHA" -z "${D}s" -c "$C" --no-tui http://127.0.0.1:9520/ > "$W/oha.txt"
  after=$(awk '{print $14 + $15}' "/proc/$pid/stat")
  kill -TERM "$pid"; wait "$pid" || true
  COHORT_PID=""
  grep -q 'Success rate:.*100.00%' "$W/oha.txt" || { echo "upstream_tls.sh: requests failed" >&2; cat "$W/oha.txt" >&2; exit 1; }
  local served
  served=$(sed -n 's/^ *\[200\] \([0-9]*\) responses.*/\1/p' "$W/oha.txt")
  awk -v t=$((after - before)) -v hz="$tick" -v n="$served" -v label="$3" \
    'BEGIN { printf "%s\t%.2f µs/req (%d requests)\n", label, t / hz * 1e6 / n, n }'
}

for run in $(seq "$RUNS"); do
  for bin in "${BINS[@]}"; do
    for upstream in "h2 https://127.0.0.1:9521" "http/1.1 https://127.0.0.1:9522"; do
      read -r alpn addr <<< "$upstream"
      cpu_per_request "$bin" "$addr" "$(printf '%s\trun %s\t%s' "$bin" "$run" "$alpn")"
    done
  done
done
