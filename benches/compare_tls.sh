#!/usr/bin/env bash
# HTTP/2 over TLS: Cohort beside nginx and HAProxy, each terminating TLS with
# the same certificate and doing the same sticky 10% split.
#
# Usage: [ROUNDS=n] benches/compare_tls.sh [duration_s] [connections] [streams]
#   Builds target/release/cohort unless COHORT_BIN is set. Installs nginx,
#   haproxy, nghttp2-client (h2load) and openssl with apt-get when missing.
#
# Layout, as in the shared HTTP/1.1 comparison: two nginx backends (stable,
# canary) and the load generator share core 0; each proxy is pinned alone to
# core 1 with one worker. h2load cannot vary a header per request, so the
# sticky key is the query parameter `user` (5,000 users, read from a URI
# list): nginx splits on $arg_user, HAProxy on url_param(user), Cohort on
# `query:user`. CPU per request is the proxy's own user+system time over the
# run divided by the requests it served.
set -euo pipefail
D=${1:-10}; C=${2:-64}; M=${3:-10}
cd "$(dirname "$0")/.."

need=()
for tool in nginx haproxy h2load openssl curl taskset; do
  command -v "$tool" >/dev/null 2>&1 || need+=("$tool")
done
if ((${#need[@]})); then
  pkgs=()
  for tool in "${need[@]}"; do
    case $tool in h2load) pkgs+=(nghttp2-client) ;; taskset) pkgs+=(util-linux) ;; *) pkgs+=("$tool") ;; esac
  done
  sudo=(); [ "$(id -u)" -eq 0 ] || sudo=(sudo)
  "${sudo[@]}" apt-get update && "${sudo[@]}" apt-get install -y --no-install-recommends "${pkgs[@]}"
fi
if [ -z "${COHORT_BIN:-}" ]; then
  cargo build --release --bin cohort
  COHORT_BIN=$PWD/target/release/cohort
fi
COHORT_BIN=$(realpath -e -- "$COHORT_BIN")

for p in 9121 9122 9221 9222 9223 9923; do
  if (exec 3<>/dev/tcp/127.0.0.1/$p) 2>/dev/null; then
    echo "compare_tls.sh: 127.0.0.1:$p is already in use" >&2; exit 1
  fi
done

W=$(mktemp -d)
cleanup() {
  set +e
  for f in "$W"/*.pid; do [ -s "$f" ] && kill "$(cat "$f")" 2>/dev/null; done
  wait 2>/dev/null
  sleep 0.5
  rm -rf "$W"
}
trap cleanup EXIT
trap 'exit 130' INT; trap 'exit 143' TERM

openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=localhost \
  -addext "subjectAltName=IP:127.0.0.1,DNS:localhost" \
  -keyout "$W/key.pem" -out "$W/cert.pem" 2>/dev/null
cat "$W/cert.pem" "$W/key.pem" > "$W/combined.pem"

cat > "$W/backend.conf" <<CONF
worker_processes 1; pid $W/backend.pid; error_log $W/backend.err; daemon on;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000;
  server { listen 127.0.0.1:9121; location / { return 200 "stable\n"; } }
  server { listen 127.0.0.1:9122; location / { return 200 "canary\n"; } } }
CONF
cat > "$W/nginx.conf" <<CONF
worker_processes 1; pid $W/nginx.pid; error_log $W/nginx.err; daemon on;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000;
  upstream stable { server 127.0.0.1:9121; keepalive 256; }
  upstream canary { server 127.0.0.1:9122; keepalive 256; }
  split_clients "\${arg_user}" \$pool { 10% canary; * stable; }
  map \$pool \$ver { canary "v2-canary"; default "v1-stable"; }
  server { listen 127.0.0.1:9221 ssl http2;
    ssl_certificate $W/cert.pem; ssl_certificate_key $W/key.pem;
    location / { proxy_pass http://\$pool; proxy_http_version 1.1; proxy_set_header Connection "";
      add_header x-agent-version \$ver always; } } }
CONF
cat > "$W/haproxy.cfg" <<CONF
global
  nbthread 1
  pidfile $W/haproxy.pid
  daemon
defaults
  mode http
  timeout connect 5s
  timeout client 30s
  timeout server 30s
  http-reuse always
frontend fe
  bind 127.0.0.1:9222 ssl crt $W/combined.pem alpn h2,http/1.1
  acl is_canary url_param(user),xxh32,mod(100) lt 10
  use_backend canary if is_canary
  default_backend stable
backend stable
  http-response set-header x-agent-version v1-stable
  server s1 127.0.0.1:9121
backend canary
  http-response set-header x-agent-version v2-canary
  server c1 127.0.0.1:9122
CONF
cat > "$W/cohort.toml" <<CONF
[listen]
addr = "127.0.0.1:9223"
workers = 1
[listen.tls]
cert = "$W/cert.pem"
key = "$W/key.pem"
[routing]
salt = "bench"
sticky_keys = ["query:user"]
fallback = "stable"
[versions.stable]
name = "v1-stable"
upstreams = ["127.0.0.1:9121"]
[versions.canary]
name = "v2-canary"
upstreams = ["127.0.0.1:9122"]
weight = 10
[admin]
addr = "127.0.0.1:9923"
[state]
path = "$W/state.json"
audit_log = "$W/audit.jsonl"
CONF

wait_for() { # file-or-url
  local i; for i in $(seq 100); do
    case $1 in http*) curl -sfk -o /dev/null "$1" && return 0 ;; *) [ -s "$1" ] && return 0 ;; esac
    sleep 0.1
  done
  echo "compare_tls.sh: $1 did not come up" >&2; return 1
}
taskset -c 0 nginx -c "$W/backend.conf" -p "$W"; wait_for "$W/backend.pid"
taskset -c 1 nginx -c "$W/nginx.conf" -p "$W"; wait_for "$W/nginx.pid"
taskset -c 1 haproxy -f "$W/haproxy.cfg"; wait_for "$W/haproxy.pid"
(cd "$W" && exec taskset -c 1 "$COHORT_BIN" serve --config "$W/cohort.toml" >"$W/cohort.log" 2>&1) &
echo $! > "$W/cohort.pid"
wait_for http://127.0.0.1:9923/ready
for port in 9221 9222 9223; do
  wait_for "https://127.0.0.1:$port/?user=user-1"
  curl -sk --http2 -D - -o /dev/null "https://127.0.0.1:$port/?user=user-1" | grep -qi '^x-agent-version:' \
    || { echo "compare_tls.sh: :$port answers without x-agent-version" >&2; exit 1; }
done

for port in 9221 9222 9223; do
  for i in $(seq 0 4999); do echo "https://127.0.0.1:$port/?user=user-$i"; done > "$W/uris-$port"
done
ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }
worker() { ps -o pid= --ppid "$(cat "$1")" | head -n1 | tr -d ' '; }
run() { # name port pid
  local t0 t1 out reqs
  t0=$(ticks "$3")
  out=$(taskset -c 0 h2load -c "$C" -m "$M" -D "$D" --warm-up-time=1 -i "$W/uris-$2" 2>&1) || true
  t1=$(ticks "$3")
  reqs=$(awk '/^requests:/{print $8}' <<<"$out")  # succeeded
  printf '%-8s rps=%-10s mean=%-9s max=%-9s cpu_us_per_req=%-7s failed=%s\n' "$1" \
    "$(awk '/^finished in/{print $4}' <<<"$out")" \
    "$(awk '/^time for request:/{print $6}' <<<"$out")" \
    "$(awk '/^time for request:/{print $5}' <<<"$out")" \
    "$(awk -v d=$((t1 - t0)) -v n="${reqs:-0}" -v hz="$(getconf CLK_TCK)" 'BEGIN{printf "%.2f", (n > 0) ? 1e6 * d / hz / n : 0}')" \
    "$(awk '/^requests:/{print $10}' <<<"$out")"
}
for round in $(seq "${ROUNDS:-1}"); do
  run nginx 9221 "$(worker "$W/nginx.pid")"
  run haproxy 9222 "$(head -n1 "$W/haproxy.pid")"
  run cohort 9223 "$(cat "$W/cohort.pid")"
done
