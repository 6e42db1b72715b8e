#!/usr/bin/env bash
# The project's one test command: installs what the tests need when it is
# missing, then runs every test target (and the doc tests, if there are any).
#
# Needs a Rust toolchain. The build needs a C compiler (cc, from gcc, for
# linking and for building jemalloc) and make (for jemalloc), and the tests
# call promtool (prometheus), curl, nghttp (nghttp2-client) and prlimit
# (util-linux); on Debian they are installed with apt-get when missing, as
# root or through sudo.
# Safe to run any number of times.
set -euo pipefail

cd "$(dirname "$0")/.."

log() { printf 'test.sh: %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

# command -> Debian package that provides it
declare -A PROVIDER=(
  [cc]=gcc
  [make]=make
  [promtool]=prometheus
  [prometheus]=prometheus
  [curl]=curl
  [nghttp]=nghttp2-client
  [prlimit]=util-linux
)

missing=()
for tool in "${!PROVIDER[@]}"; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("${PROVIDER[$tool]}")
done

if ((${#missing[@]})); then
  # One entry per package, in a stable order.
  mapfile -t packages < <(printf '%s\n' "${missing[@]}" | sort -u)
  # gcc links against the C library, whose headers and crt files are apart.
  [[ " ${packages[*]} " == *" gcc "* ]] && packages+=(libc6-dev)
  log "missing tools; installing: ${packages[*]}"
  command -v apt-get >/dev/null 2>&1 \
    || die "apt-get not found; install ${packages[*]} by hand and run again"
  if [ "$(id -u)" -eq 0 ]; then
    sudo=()
  elif command -v sudo >/dev/null 2>&1; then
    sudo=(sudo)
  else
    die "not root and no sudo; install ${packages[*]} by hand and run again"
  fi
  export DEBIAN_FRONTEND=noninteractive
  "${sudo[@]}" apt-get update
  "${sudo[@]}" apt-get install -y --no-install-recommends "${packages[@]}"
  for tool in "${!PROVIDER[@]}"; do
    command -v "$tool" >/dev/null 2>&1 || die "'$tool' is still missing after apt-get install"
  done
else
  log "${!PROVIDER[*]} are present"
fi

command -v cargo >/dev/null 2>&1 || die "cargo not found; install a Rust toolchain (https://rustup.rs)"

log "cargo test --all-targets"
cargo test --all-targets

# `--all-targets` does not run doc tests; run them when a doc comment has a code block.
if grep -rqE '^\s*//[/!]\s*```' src; then
  log "cargo test --doc"
  cargo test --doc
else
  log "no doc tests in src/; skipping cargo test --doc"
fi

log "all tests passed"
