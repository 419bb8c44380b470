#!/usr/bin/env bash
# Builds the sidecar with profile-guided optimisation and prints the
# binary's path. An instrumented build serves the benchmark's workload
# (keep-alive requests, from the decision cache and evaluated, and full
# handshakes) and the compiler then lays out and inlines by those counts:
# 13-17% less CPU per request and 2.7 MB less idle RSS than the plain
# release build (docs/performance.md, "Sixth round").
#
#   scripts/pgo.sh      # ~15 minutes on 2 cores: two release builds and a training run
#
# Needs llvm-profdata of rustc's LLVM major version: rustup's llvm-tools,
# or Debian's llvm-N, which this script installs with apt when run as root.
# Progress goes to stderr, the path alone to stdout.
set -euo pipefail
cd "$(dirname "$0")/.."

triple=$(rustc -vV | sed -n 's/^host: //p')
llvm=$(rustc -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')

find_profdata() {
    local c
    for c in "$(rustc --print sysroot)/lib/rustlib/$triple/bin/llvm-profdata" \
        "llvm-profdata-$llvm" "/usr/lib/llvm-$llvm/bin/llvm-profdata"; do
        if command -v "$c" >/dev/null 2>&1; then
            echo "$c"
            return
        fi
    done
}

profdata=$(find_profdata)
if [ -z "$profdata" ] && [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "llvm-$llvm" >&2 || true
    profdata=$(find_profdata)
fi
if [ -z "$profdata" ]; then
    echo "pgo.sh: no llvm-profdata for rustc's LLVM $llvm; install rustup's llvm-tools or Debian's llvm-$llvm" >&2
    exit 1
fi

out=target/pgo
rm -rf "$out/profiles"
mkdir -p "$out/profiles"
# --target keeps the flags off build scripts and proc macros, which would
# otherwise be instrumented (and optimised) too.
echo "pgo.sh: instrumented build" >&2
RUSTFLAGS="-Cprofile-generate=$PWD/$out/profiles" CARGO_TARGET_DIR="$out/generate" \
    cargo build --release --target "$triple" --bin portcullis >&2

# Each sidecar writes its counts when it exits (the bench stops it with
# SIGTERM, and it drains and returns from main).
echo "pgo.sh: training run" >&2
PORTCULLIS_BENCH_BINARY="$PWD/$out/generate/$triple/release/portcullis" \
    cargo bench --bench proxy -- --modes keep-alive,new --idle 0 --rounds 1 --seconds 6 \
    --only portcullis,portcullis-uncached --out "$out/training.md" >&2
shopt -s nullglob
profiles=("$out"/profiles/*.profraw)
if [ ${#profiles[@]} -eq 0 ]; then
    echo "pgo.sh: the training run left no profile in $out/profiles" >&2
    exit 1
fi
"$profdata" merge -o "$out/portcullis.profdata" "${profiles[@]}"

echo "pgo.sh: optimised build" >&2
RUSTFLAGS="-Cprofile-use=$PWD/$out/portcullis.profdata" CARGO_TARGET_DIR="$out/use" \
    cargo build --release --target "$triple" --bin portcullis >&2
echo "$PWD/$out/use/$triple/release/portcullis"
