#!/usr/bin/env bash
# Requests lost to reloads that restart the proxy workers, under load.
#
#   benches/reload.sh [reloads] [method]     default: 5 reloads, GET
#
# One nginx worker answers as the stable and the canary version; Cohort
# (COHORT_BIN, default target/release/cohort) runs two workers with a 10%
# canary; wrk sends `method` requests over 32 keep-alive connections with
# an `x-user-id` from 1000 users while the script sends `reloads` SIGHUPs,
# 1.5 s apart, each with a new `upstream.idle_timeout` (a `[upstream]`
# change: a new set of workers, the old ones drained). It prints wrk's
# summary: its "Socket errors" line counts requests that got no answer.
# With MODE=weight the SIGHUPs change the canary's weight instead, which
# the running workers take without a restart.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
RELOADS=${1:-5}
METHOD=${2:-GET}
COHORT_BIN=$(realpath -e -- "${COHORT_BIN:-$ROOT/target/release/cohort}")
for t in nginx wrk curl; do
  command -v "$t" >/dev/null || { echo "reload.sh: '$t' not found" >&2; exit 1; }
done
for p in 9111 9211 9911; do
  if (exec 3<>/dev/tcp/127.0.0.1/$p) 2>/dev/null; then echo "reload.sh: port $p is in use" >&2; exit 1; fi
done

W=$(mktemp -d)
cleanup() {
  set +e
  [ -f "$W/cohort.pid" ] && kill "$(cat "$W/cohort.pid")" 2>/dev/null
  [ -f "$W/backend.pid" ] && kill "$(cat "$W/backend.pid")" 2>/dev/null
  wait 2>/dev/null; rm -rf "$W"
}
trap cleanup EXIT

cat > "$W/backend.conf" <<CONF
worker_processes 1; pid $W/backend.pid; error_log $W/backend.err; daemon on;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000; keepalive_timeout 300s;
  server { listen 127.0.0.1:9111; location / { return 200 "ok\n"; } } }
CONF
chmod 711 "$W"  # nginx's workers may run as another user
nginx -c "$W/backend.conf" -p "$W" -e "$W/backend.err"

config() {  # idle_timeout weight
  cat > "$W/cohort.toml.new" <<CONF
[listen]
addr = "127.0.0.1:9211"
workers = 2
[upstream]
idle_timeout = "$1"
[versions.stable]
name = "v1"
upstreams = ["127.0.0.1:9111"]
[versions.canary]
name = "v2"
upstreams = ["127.0.0.1:9111"]
weight = $2
[admin]
addr = "127.0.0.1:9911"
[state]
path = "$W/state.json"
audit_log = "$W/audit.jsonl"
CONF
  mv "$W/cohort.toml.new" "$W/cohort.toml"
}
config 90s 10
"$COHORT_BIN" serve --config "$W/cohort.toml" > "$W/cohort.log" 2>&1 &
echo $! > "$W/cohort.pid"
for _ in $(seq 100); do curl -sf 127.0.0.1:9911/ready >/dev/null && break; sleep 0.1; done

cat > "$W/users.lua" <<LUA
wrk.method = "$METHOD"
local n = 0
request = function()
  n = n + 1
  local body = nil
  if wrk.method == "POST" then body = '{"q": 1}' end
  return wrk.format(nil, "/", {["x-user-id"] = "user-" .. (n % 1000)}, body)
end
LUA
wrk -t2 -c32 -d"$((RELOADS * 2 + 4))s" -s "$W/users.lua" --latency \
  -H "content-type: application/json" http://127.0.0.1:9211/ > "$W/wrk.out" 2>&1 &
WRK=$!
sleep 2
for i in $(seq "$RELOADS"); do
  if [ "${MODE:-workers}" = weight ]; then config 90s "$((10 + i))"; else config "$((80 + i))s" 10; fi
  kill -HUP "$(cat "$W/cohort.pid")"
  sleep 1.5
done
wait $WRK
echo "reload.sh: $RELOADS reloads (${MODE:-workers}), $METHOD"
grep -E 'requests in|Socket errors|Non-2xx' "$W/wrk.out" || true
