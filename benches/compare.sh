#!/usr/bin/env bash
# Load comparison of Cohort with nginx and HAProxy doing the same sticky
# canary split on loopback, each proxy pinned to one core.
#
# Usage: [ROUNDS=3] [EXTRAS=1] benches/compare.sh [duration_s] [connections]
#
# Installs nginx, haproxy, wrk, curl and python3 when missing (Debian, as
# root or through sudo) and the fixed-rate load generator oha (cargo install,
# into target/bench-tools), builds the release binary, runs the comparison
# script benches/peers.sh (or the one at COMPARE_SH) with ROUNDS interleaved
# rounds, then prints the
# median of each contender and Cohort's ratio to the best peer. The goal:
# CPU per request at most 0.8x the best peer's, p99 no worse than the best
# peer's.
#
# Then, unless EXTRAS=0, benches/extras.sh measures each proxy's resident
# memory per idle keep-alive connection (IDLE_CONNS, default 5000; goal: at
# most 4 KB), its latency at a fixed rate below saturation (RATE requests
# per second, default 20000, for RATE_SECONDS, default 15) and its CPU per
# request split into user space and kernel (CPU_SECONDS, default 10), and
# the summary adds Cohort's memory ratio to the best peer.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
log() { printf 'compare: %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

# The peers' side of the comparison: backends, nginx, HAProxy and wrk, with
# configs for the same 90/10 sticky split (COMPARE_SH: another copy of it).
COMPARE_SH=${COMPARE_SH:-$ROOT/benches/peers.sh}
[ -f "$COMPARE_SH" ] || die "no comparison script at $COMPARE_SH"

# command -> Debian package (taskset is in util-linux, part of every Debian)
declare -A PROVIDER=([nginx]=nginx [haproxy]=haproxy [wrk]=wrk [curl]=curl [taskset]=util-linux [python3]=python3)
missing=()
for tool in "${!PROVIDER[@]}"; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("${PROVIDER[$tool]}")
done
if ((${#missing[@]})); then
  log "installing: ${missing[*]}"
  command -v apt-get >/dev/null 2>&1 || die "apt-get not found; install ${missing[*]} by hand"
  sudo=()
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || die "not root and no sudo; install ${missing[*]} by hand"
    sudo=(sudo)
  fi
  export DEBIAN_FRONTEND=noninteractive
  "${sudo[@]}" apt-get update
  "${sudo[@]}" apt-get install -y --no-install-recommends "${missing[@]}"
fi
# The Debian packages start their own nginx/haproxy services on ports the
# comparison does not use; benches/peers.sh checks its ports before it starts.

[ "$(nproc)" -ge 2 ] || log "warning: fewer than 2 cores; proxy and load generator will share one"

# oha corrects for coordinated omission (`--latency-correction`), which wrk does not.
OHA=${OHA:-$(command -v oha || echo "$ROOT/target/bench-tools/bin/oha")}
if [ "${EXTRAS:-1}" = 1 ] && [ ! -x "$OHA" ]; then
  log "installing oha into target/bench-tools"
  cargo install oha --locked --version 1.16.0 --root "$ROOT/target/bench-tools"
fi
export OHA

log "cargo build --release"
cargo build --release --locked --bin cohort
export COHORT_BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release/cohort
export ROUNDS=${ROUNDS:-3}

log "running $COMPARE_SH ${*:-} with ROUNDS=$ROUNDS"
raw=$(mktemp)
extras=$(mktemp)
trap 'rm -f "$raw" "$extras"' EXIT
bash "$COMPARE_SH" "$@" | tee "$raw"

echo
awk '
  # wrk latency ("850.00us", "1.23ms", "1.02s") in microseconds
  function us(t) {
    if (t ~ /us$/) return t + 0
    if (t ~ /ms$/) return (t + 0) * 1000
    if (t ~ /m$/)  return (t + 0) * 60e6
    if (t ~ /s$/)  return (t + 0) * 1e6
    return t + 0
  }
  function median(list,   a, n, i, j, x) {
    n = split(list, a, " ")
    for (i = 2; i <= n; i++) { x = a[i] + 0; for (j = i - 1; j >= 1 && a[j] + 0 > x; j--) a[j + 1] = a[j]; a[j + 1] = x }
    return (n % 2) ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
  }
  /^[a-z]+ +rps=/ {
    name = $1
    if (!(name in seen)) { seen[name] = 1; order[++names] = name }
    for (f = 2; f <= NF; f++) {
      split($f, kv, "=")
      if (kv[1] == "rps") rps[name] = rps[name] " " kv[2]
      if (kv[1] == "p50") p50[name] = p50[name] " " us(kv[2])
      if (kv[1] == "p99") p99[name] = p99[name] " " us(kv[2])
      if (kv[1] == "cpu_us_per_req") cpu[name] = cpu[name] " " kv[2]
    }
    rounds[name]++
    if ($0 ~ /errors=.+/) errs[name]++
  }
  END {
    if (!names) { print "compare: no results to summarise" > "/dev/stderr"; exit 1 }
    printf "%-9s %6s %10s %10s %10s %16s %s\n", "median", "rounds", "rps", "p50_us", "p99_us", "cpu_us_per_req", "rounds_with_errors"
    for (i = 1; i <= names; i++) {
      n = order[i]
      m_cpu[n] = median(cpu[n]); m_p99[n] = median(p99[n])
      printf "%-9s %6d %10.0f %10.0f %10.0f %16.2f %d\n", n, rounds[n], median(rps[n]), median(p50[n]), m_p99[n], m_cpu[n], errs[n]
      if (n != "direct" && n != "cohort") {
        if (best_cpu == "" || m_cpu[n] < m_cpu[best_cpu]) best_cpu = n
        if (best_p99 == "" || m_p99[n] < m_p99[best_p99]) best_p99 = n
      }
    }
    if (!("cohort" in seen) || best_cpu == "") exit 0
    printf "\ncohort vs best peer (goal: cpu <= 0.80x, p99 <= 1.00x)\n"
    r = m_cpu["cohort"] / m_cpu[best_cpu]
    printf "  cpu per request: %.2fx %s (%.2f vs %.2f us)  %s\n", r, best_cpu, m_cpu["cohort"], m_cpu[best_cpu], (r <= 0.8 ? "meets goal" : "misses goal")
    r = m_p99["cohort"] / m_p99[best_p99]
    printf "  p99 latency:     %.2fx %s (%.0f vs %.0f us)  %s\n", r, best_p99, m_p99["cohort"], m_p99[best_p99], (r <= 1.0 ? "meets goal" : "misses goal")
  }
' "$raw"

[ "${EXTRAS:-1}" = 1 ] || exit 0
echo
log "memory per idle connection: benches/extras.sh rss ${IDLE_CONNS:-5000}"
"$ROOT/benches/extras.sh" rss "${IDLE_CONNS:-5000}" | tee -a "$extras"
log "latency at a fixed rate: benches/extras.sh rate ${RATE:-20000} ${RATE_SECONDS:-15}"
"$ROOT/benches/extras.sh" rate "${RATE:-20000}" "${RATE_SECONDS:-15}" | tee -a "$extras"
log "CPU per request, user space and kernel: benches/extras.sh cpu ${CPU_SECONDS:-10}"
"$ROOT/benches/extras.sh" cpu "${CPU_SECONDS:-10}" | tee -a "$extras"
echo
awk '
  $2 ~ /^idle_conns=/ { for (f = 2; f <= NF; f++) { split($f, kv, "="); if (kv[1] == "kib_per_conn") mem[$1] = kv[2] + 0 } }
  END {
    if (!("cohort" in mem)) exit 0
    for (n in mem) if (n != "cohort" && (best == "" || mem[n] < mem[best])) best = n
    kb = mem["cohort"] * 1.024
    printf "cohort memory per idle connection: %.2f KiB (%.2f KB), %.2fx %s (%.2f KiB)  %s\n", mem["cohort"], kb, mem["cohort"] / mem[best], best, mem[best], (kb <= 4 ? "meets goal (<= 4 KB)" : "misses goal (<= 4 KB)")
  }
' "$extras"
