#!/usr/bin/env bash
# SNI passthrough benchmark: fedmesh-gateway beside direct, Envoy, HAProxy and
# nginx (stream ssl_preread), all in one run, loopback only.
#   1. ../shared/bench/anchors/sni-passthrough.sh with our gateway as the
#      candidate row: requests/s and latency, keep-alive and new connection
#      per request, ratios against direct in the same run.
#   2. benches/sni_resources.py on the same configs: CPU per request (keep-
#      alive) and per new connection, idle RSS, RSS per idle TLS connection.
# Usage: bash benches/sni-passthrough.sh     (about 12 minutes; REPS, DURATION
# and the shared script's other knobs pass through)
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${SHARED_BENCH:-../shared/bench}
bash scripts/deps.sh
bash "$SHARED/anchors/setup.sh"
cargo build --release -p gateway
GW=$PWD/target/release/fedmesh-gateway
mkdir -p target/bench
OUT=${OUT:-target/bench/sni-passthrough-$(date -u +%Y-%m-%dT%H%M).txt}

before=$(ls -d /tmp/bench-run.* 2>/dev/null | sort || true)
KEEP_WORK=1 CANDIDATE_NAME=gateway \
CANDIDATE_CMD="$GW --cluster bench --listen 127.0.0.1:{listen} --route {sni_a}=127.0.0.1:{backend_a} --route {sni_b}=127.0.0.1:{backend_b} --threads {threads} --access-log off" \
  bash "$SHARED/anchors/sni-passthrough.sh" | tee "$OUT"
work=$(comm -13 <(echo "$before") <(ls -d /tmp/bench-run.* | sort) | tail -n 1)
[ -n "$work" ] || { echo "sni-passthrough.sh: cannot find the kept run directory" >&2; exit 1; }
python3 benches/sni_resources.py --workdir "$work" --gateway "$GW" | tee -a "$OUT"
rm -rf "$work"
echo "results: $OUT"
