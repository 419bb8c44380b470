#!/usr/bin/env bash
# Instructions per proxied request, counted by callgrind: the sidecar under
# `valgrind --tool=callgrind`, driven by the proxy bench's keep-alive load
# (`--only portcullis`), counted over a window after the warm-up.
#
# Wall-clock A/B runs on a shared two-core machine move by ±5% between
# identical builds; instruction counts do not, so a change worth 1% of
# the sidecar's user-space work shows here when it cannot show there.
# They count user space only (no kernel, no cache misses): a proxy spends
# about half its time in the kernel, so a 10% cut here is worth about 5%
# of CPU per request.
#
#   scripts/callgrind.sh                      # target/release/portcullis
#   scripts/callgrind.sh /tmp/portcullis-old  # another build
#   PORTCULLIS_CALLGRIND_TARGET=portcullis-uncached scripts/callgrind.sh
#
# Prints instructions per request with and without SHA-256 (valgrind
# hides the SHA extensions, so the audit chain's hash runs in software
# here, at ~35,000 instructions a line, where the real CPU runs it in
# hardware), allocator and memcpy calls per request, and the functions
# costing the most per request. Results stay in target/callgrind/.
set -euo pipefail
cd "$(dirname "$0")/.."

binary=${1:-target/release/portcullis}
if [[ ! -x $binary ]]; then
    cargo build --release
fi
binary=$(realpath "$binary")
if ! command -v valgrind >/dev/null || ! command -v callgrind_control >/dev/null; then
    if [[ $(id -u) -eq 0 ]]; then
        apt-get update -qq && apt-get install -y -qq valgrind >/dev/null
    else
        echo "callgrind.sh: valgrind is not installed (apt-get install valgrind)" >&2
        exit 1
    fi
fi

out=target/callgrind
mkdir -p "$out"
rm -f "$out"/cg.out*
wrapper=$out/wrap.sh
# The bench runs `$PORTCULLIS_BENCH_WRAP <its binary> <args>`; the wrapper
# swaps in the binary under test.
cat > "$wrapper" <<EOF
#!/bin/sh
shift
exec valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file=$PWD/$out/cg.out "$binary" "\$@"
EOF
chmod +x "$wrapper"

PORTCULLIS_BENCH_WRAP=$PWD/$wrapper cargo bench --bench proxy -- \
    --modes keep-alive --idle 0 --rounds 1 --seconds 30 --only "${PORTCULLIS_CALLGRIND_TARGET:-portcullis}" \
    --out "$out/bench.md" > "$out/bench.log" 2>&1 &
bench=$!

# The keep-alive mode starts once the sidecar is up (under valgrind that
# takes a while); its first second is warm-up, and connections are still
# being opened after it at valgrind's pace.
for _ in $(seq 1 600); do
    grep -q "KeepAlive" "$out/bench.log" 2>/dev/null && break
    kill -0 "$bench" 2>/dev/null || { cat "$out/bench.log" >&2; exit 1; }
    sleep 1
done
sleep 8
pid=$(pgrep -f -- "--callgrind-out-file=$PWD/$out/cg.out" | head -1)
callgrind_control -i on "$pid" >/dev/null 2>&1
sleep 12
callgrind_control -d "$pid" >/dev/null 2>&1
callgrind_control -i off "$pid" >/dev/null 2>&1
wait "$bench" || { cat "$out/bench.log" >&2; exit 1; }

dump=$(ls "$out"/cg.out.* | head -1)
callgrind_annotate --inclusive=no "$dump" > "$out/self.txt" 2>/dev/null
python3 - "$dump" "$out/self.txt" "$binary" <<'PY'
import re
import sys

dump, annotated, binary = sys.argv[1:4]
names, calls, total, current = {}, {}, 0, None
for line in open(dump):
    if line.startswith("summary:"):
        total = int(line.split()[1])
    m = re.match(r"^(c?fn)=\((\d+)\)(?: (.*))?$", line.rstrip("\n"))
    if m:
        kind, idx, name = m.groups()
        if name:
            names[idx] = name
        if kind == "cfn":
            current = names.get(idx)
        continue
    m = re.match(r"^calls=(\d+)", line)
    if m and current:
        calls[current] = calls.get(current, 0) + int(m.group(1))

# One audit line per request: its serialisation counts the requests.
requests = calls.get("portcullis::audit::chain::Prepared::new", 0)
if requests == 0:
    sys.exit("callgrind.sh: no request was counted")
rows = []
for line in open(annotated):
    m = re.match(r"^\s*([\d,]+) \(\s*[\d.]+%\)\s+\S*?:(.+?) \[", line)
    if m:
        rows.append((int(m.group(1).replace(",", "")), m.group(2)))
sha = sum(ir for ir, name in rows if "sha256::compress256" in name)
per = lambda n: n / requests
print(f"binary: {binary}")
print(f"requests counted: {requests}")
print(f"instructions per request: {per(total):,.0f}; without SHA-256: {per(total - sha):,.0f}")
for name, label in [
    ("_rjem_malloc", "allocations"),
    ("__memcpy_avx_unaligned_erms", "memcpy calls"),
    ("clock_gettime@@GLIBC_2.17", "clock reads"),
]:
    print(f"{label} per request: {per(calls.get(name, 0)):.1f}")
print("\nown instructions per request, by function:")
for ir, name in rows[:25]:
    if "compress256" not in name:
        print(f"{per(ir):8,.0f}  {name[:110]}")
PY
