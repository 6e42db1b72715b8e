#!/usr/bin/env bash
# Three measurements beside the load comparison (benches/compare.sh), with the
# same peers and the same 90/10 sticky split on loopback:
#
#   benches/extras.sh rss [connections]      memory per idle keep-alive client connection
#   benches/extras.sh rate [rps] [seconds]   latency at a fixed request rate (oha, corrected
#                                            for coordinated omission): p50, p99, p99.9
#   benches/extras.sh cpu [seconds]          CPU per request at saturation (or at
#                                            CPU_RATE), split into user space and kernel
#
# `rss` opens `connections` (default 5000) keep-alive connections to each
# proxy, sends one request on each, waits 12 s, and reports the growth of
# the proxy process's resident set divided by the connections; then, for
# Cohort, runs wrk LOAD_RUNS times (default 3) for LOAD_SECONDS each
# (default 10) and reports the resident set after each run with the
# connections closed (no growth under load).
# `rate` runs `oha -q rps -z seconds -c 64 --latency-correction` against
# each proxy (default 10000 rps for 20 s). oha must be on PATH or in OHA.
# `cpu` runs wrk as the comparison does (1 thread, 64 connections, default
# 10 s) against each proxy and divides the process's user and system time
# (/proc/PID/stat) by the requests served: every proxy makes the same
# socket calls per request, so the kernel part is a floor they share.
# With SYSCALLS=1 it also counts, with `perf stat` (linux-perf), the
# proxy's system calls, reads, writes, `epoll_wait`s and context switches
# per request over the run (the tracepoints add a little kernel time to
# every call, so read the CPU figures from a run without it).
# With CPU_PATH=/big it asks for a 1 MiB body instead of a 7-byte one
# (bulk transfers). With CPU_RATE=<rps> the load is oha at that fixed rate
# instead of wrk at saturation (one user, `user-42`, as in `rate`): every
# proxy then serves the same requests with its core partly idle, so the one
# that saturates first does not pay alone for the wake-ups of a less busy
# load generator and backend.
#
# Backends (one nginx worker) and the load generators run on core 0, each
# proxy is pinned to core 1 with one worker (Cohort: `listen.workers = 1`,
# or COHORT_WORKERS). COHORT_BIN defaults to target/release/cohort.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
MODE=${1:-}
case $MODE in
  rss) N=${2:-5000} ;;
  rate) RATE=${2:-10000}; SECS=${3:-20} ;;
  cpu) SECS=${2:-10} ;;
  *) echo "usage: $0 rss [connections] | rate [rps] [seconds] | cpu [seconds]" >&2; exit 2 ;;
esac
COHORT_BIN=$(realpath -e -- "${COHORT_BIN:-$ROOT/target/release/cohort}")
OHA=${OHA:-oha}
for t in nginx haproxy wrk curl taskset python3; do
  command -v "$t" >/dev/null || { echo "extras.sh: '$t' not found" >&2; exit 1; }
done
if [ "${SYSCALLS:-0}" = 1 ] && ! perf stat -e raw_syscalls:sys_enter -- true >/dev/null 2>&1; then
  echo "extras.sh: SYSCALLS=1 needs perf (linux-perf) allowed to read tracepoints (root, or perf_event_paranoid -1)" >&2; exit 1
fi
if [ "$MODE" = rate ] || [ -n "${CPU_RATE:-}" ]; then command -v "$OHA" >/dev/null || { echo "extras.sh: oha not found (cargo install oha)" >&2; exit 1; }; fi
for p in 9101 9102 9201 9202 9203 9903; do
  if (exec 3<>/dev/tcp/127.0.0.1/$p) 2>/dev/null; then echo "extras.sh: port $p is in use" >&2; exit 1; fi
done

W=$(mktemp -d)
cleanup() {
  set +e
  local p pids=""
  for p in $(cat "$W"/*.pid 2>/dev/null); do pids="$pids $p $(ps -o pid= --ppid "$p" 2>/dev/null)"; done
  [ -n "${pids// /}" ] && kill $pids 2>/dev/null
  for _ in $(seq 100); do
    local left=""; for p in $pids; do kill -0 "$p" 2>/dev/null && left=1; done
    [ -z "$left" ] && break; sleep 0.1
  done
  wait 2>/dev/null; rm -rf "$W"
}
trap cleanup EXIT
trap 'exit 130' INT; trap 'exit 143' TERM

cat > $W/backend.conf <<CONF
worker_processes 1; pid $W/backend.pid; error_log $W/backend.err; daemon on;
worker_rlimit_nofile 20000;
events { worker_connections 16384; }
http { access_log off; keepalive_requests 1000000;
  server { listen 127.0.0.1:9101; location / { return 200 "stable\n"; } location = /big { alias $W/big.bin; } }
  server { listen 127.0.0.1:9102; location / { return 200 "canary\n"; } location = /big { alias $W/big.bin; } } }
CONF
head -c 1048576 /dev/zero > $W/big.bin
chmod 644 $W/big.bin; chmod 711 $W  # nginx's workers may run as another user
cat > $W/nginx.conf <<CONF
worker_processes 1; pid $W/nginx.pid; error_log $W/nginx.err; daemon on;
worker_rlimit_nofile 20000;
events { worker_connections 16384; }
http { access_log off; keepalive_requests 1000000; keepalive_timeout 600s;
  upstream stable { server 127.0.0.1:9101; keepalive 256; }
  upstream canary { server 127.0.0.1:9102; keepalive 256; }
  split_clients "\${http_x_user_id}" \$pool { 10% canary; * stable; }
  map \$pool \$ver { canary "v2-canary"; default "v1-stable"; }
  server { listen 127.0.0.1:9201;
    location / { proxy_pass http://\$pool; proxy_http_version 1.1; proxy_set_header Connection "";
      add_header x-agent-version \$ver always; } } }
CONF
cat > $W/haproxy.cfg <<CONF
global
  nbthread 1
  maxconn 8192
  pidfile $W/haproxy.pid
  daemon
defaults
  mode http
  timeout connect 5s
  timeout client 600s
  timeout server 30s
  timeout http-keep-alive 600s
  http-reuse always
frontend fe
  bind 127.0.0.1:9202
  acl is_canary req.hdr(x-user-id),xxh32,mod(100) lt 10
  use_backend canary if is_canary
  default_backend stable
backend stable
  http-response set-header x-agent-version v1-stable
  server s1 127.0.0.1:9101
backend canary
  http-response set-header x-agent-version v2-canary
  server c1 127.0.0.1:9102
CONF
cat > $W/cohort.toml <<CONF
[listen]
addr = "127.0.0.1:9203"
workers = ${COHORT_WORKERS:-1}
max_connections = 16384
[routing]
salt = "bench"
sticky_keys = ["header:x-user-id"]
[versions.stable]
name = "v1-stable"
upstreams = ["127.0.0.1:9101"]
[versions.canary]
name = "v2-canary"
upstreams = ["127.0.0.1:9102"]
weight = 10
[admin]
addr = "127.0.0.1:9903"
[state]
path = "$W/state.json"
audit_log = "$W/audit.jsonl"
CONF
cat > $W/users.lua <<'LUA'
local n = 0
request = function()
  n = n + 1
  return wrk.format(nil, nil, { ["x-user-id"] = "user-" .. (n % 5000) })
end
LUA
# Opens N keep-alive connections, one GET each, holds them until stdin closes.
cat > $W/idle.py <<'PY'
import socket, sys
port, n = int(sys.argv[1]), int(sys.argv[2])
conns = []
for i in range(n):
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"GET / HTTP/1.1\r\nHost: bench\r\nx-user-id: user-%d\r\n\r\n" % i)
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(4096)
        if not chunk: sys.exit("connection %d closed early" % i)
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    length = next(int(l.split(b":")[1]) for l in head.split(b"\r\n") if l.lower().startswith(b"content-length:"))
    while len(body) < length:
        body += s.recv(4096)
    conns.append(s)
print("open", flush=True)
sys.stdin.read()
PY

taskset -c 0 nginx -c $W/backend.conf -p $W
taskset -c 1 nginx -c $W/nginx.conf -p $W
taskset -c 1 haproxy -f $W/haproxy.cfg
(cd $W && exec taskset -c 1 "$COHORT_BIN" serve --config $W/cohort.toml >$W/cohort.log 2>&1) & echo $! > $W/cohort.pid
for url in 9101 9102 9201 9202 9203; do
  for _ in $(seq 100); do curl -sf -o /dev/null -H 'x-user-id: u' http://127.0.0.1:$url/ && break; sleep 0.1; done
done
worker() { ps -o pid= --ppid "$(cat "$1")" | head -n1 | tr -d ' '; }
declare -A PID=([nginx]=$(worker $W/nginx.pid) [haproxy]=$(head -n1 $W/haproxy.pid) [cohort]=$(cat $W/cohort.pid))
declare -A PORT=([nginx]=9201 [haproxy]=9202 [cohort]=9203)
rss() { awk '/^VmRSS/{print $2}' /proc/$1/status; }  # KiB

if [ "$MODE" = rss ]; then
  for name in nginx haproxy cohort; do
    pid=${PID[$name]}
    before=$(rss $pid)
    coproc HOLD { taskset -c 0 python3 $W/idle.py ${PORT[$name]} $N; }
    read -r line <&"${HOLD[0]}"
    # Cohort frees an idle connection's HTTP/1.1 buffers after one to two
    # seconds idle, and its allocator hands the freed pages back to the
    # kernel over about ten seconds; every proxy gets the same wait.
    sleep 12
    after=$(rss $pid)
    if [ $name = cohort ]; then  # how many of them Cohort holds as freed idle connections
      curl -s http://127.0.0.1:9903/metrics | grep '^cohort_client_connections' >&2 || true
    fi

    exec {HOLD[1]}>&-; wait $HOLD_PID 2>/dev/null || true
    awk -v n=$name -v b=$before -v a=$after -v c=$N \
      'BEGIN{printf "%-8s idle_conns=%d rss_before_kib=%d rss_after_kib=%d kib_per_conn=%.2f\n", n, c, b, a, (a-b)/c}'
  done
  pid=${PID[cohort]}
  echo "cohort rss_kib start=$(rss $pid)"
  for i in $(seq "${LOAD_RUNS:-3}"); do
    taskset -c 0 wrk -t1 -c64 -d${LOAD_SECONDS:-10}s -s $W/users.lua http://127.0.0.1:9203/ >/dev/null
    sleep 1
    echo "cohort rss_kib after_wrk_run_$i=$(rss $pid)"
  done
elif [ "$MODE" = cpu ]; then
  hz=$(getconf CLK_TCK)
  cpu_ticks() { awk '{print $14, $15}' /proc/$1/stat; }  # user and system clock ticks
  for name in nginx haproxy cohort; do
    pid=${PID[$name]}
    size=$(curl -s -o /dev/null -w '%{size_download}' -H 'x-user-id: u' http://127.0.0.1:${PORT[$name]}${CPU_PATH:-/})
    echo "$name: a response to ${CPU_PATH:-/} has $size bytes" >&2
    if [ "${SYSCALLS:-0}" = 1 ]; then
      # Until the load generator is done (it takes under a second to start and stop).
      perf stat -x, -o $W/perf.$name -p $pid -e raw_syscalls:sys_enter,syscalls:sys_enter_recvfrom \
        -e syscalls:sys_enter_read,syscalls:sys_enter_sendto,syscalls:sys_enter_write,syscalls:sys_enter_writev \
        -e syscalls:sys_enter_epoll_wait,context-switches -- sleep $((SECS + 1)) &
      perf_pid=$!
    fi
    read -r user0 sys0 < <(cpu_ticks $pid)
    if [ -n "${CPU_RATE:-}" ]; then
      out=$(taskset -c 0 "$OHA" --no-tui -q "$CPU_RATE" -z ${SECS}s -c 64 --latency-correction \
        -H 'x-user-id: user-42' http://127.0.0.1:${PORT[$name]}${CPU_PATH:-/} 2>&1) || { echo "$out" >&2; exit 1; }
      requests=$(awk '$1 ~ /^\[[0-9]+\]$/ && $3 == "responses" {n += $2} END {print n + 0}' <<<"$out")
    else
      out=$(taskset -c 0 wrk -t1 -c64 -d${SECS}s -s $W/users.lua http://127.0.0.1:${PORT[$name]}${CPU_PATH:-/} 2>&1)
      requests=$(awk '/requests in/{print $1}' <<<"$out")
    fi
    read -r user1 sys1 < <(cpu_ticks $pid)
    awk -v n=$name -v u=$((user1 - user0)) -v s=$((sys1 - sys0)) -v hz=$hz -v r="$requests" \
      'BEGIN{printf "%-8s requests=%d user_us_per_req=%.2f system_us_per_req=%.2f\n", n, r, 1e6*u/hz/r, 1e6*s/hz/r}'
    if [ "${SYSCALLS:-0}" = 1 ]; then
      wait $perf_pid
      awk -F, -v n=$name -v r="$requests" '
        $3 ~ /sys_enter$/ {all = $1} $3 ~ /recvfrom|_read$/ {reads += $1}
        $3 ~ /sendto|_write$|writev/ {writes += $1} $3 ~ /epoll_wait/ {waits = $1}
        $3 == "context-switches" {switches = $1}
        END {printf "%-8s syscalls_per_req=%.2f reads_per_req=%.2f writes_per_req=%.2f requests_per_epoll_wait=%.1f requests_per_context_switch=%.0f\n",
          n, all / r, reads / r, writes / r, waits ? r / waits : 0, switches ? r / switches : 0}' $W/perf.$name
    fi
  done
else
  for name in nginx haproxy cohort; do
    out=$(taskset -c 0 "$OHA" --no-tui -q $RATE -z ${SECS}s -c 64 --latency-correction \
      -H 'x-user-id: user-42' http://127.0.0.1:${PORT[$name]}/ 2>&1) || { echo "$out" >&2; exit 1; }
    printf '%-8s rate=%s %s\n' $name $RATE "$(awk '
      /Success rate/{sr=$3} /Requests\/sec/{rps=$2}
      $1=="50.00%" && $2=="in" {p50=$3" "$4} $1=="99.00%" && $2=="in" {p99=$3" "$4}
      $1=="99.90%" && $2=="in" {p999=$3" "$4}
      END{printf "success=%s rps=%s p50=%s p99=%s p99.9=%s", sr, rps, p50, p99, p999}' <<<"$out")"
  done
fi
