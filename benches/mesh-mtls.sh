#!/usr/bin/env bash
# The mesh path, the one every mesh request takes: app -> outbound sidecar
# -> mTLS (client certificate required and verified) -> inbound sidecar ->
# app. ../shared/bench/anchors/mesh-mtls.sh runs direct and pairs of Envoy,
# HAProxy and nginx; this adds two fedmesh agents as the candidate row
# (benches/mesh-pair.sh), in one run, ratios to direct:
#   - a federation (the real fedmesh-federation binary, memory registry,
#     TLS API) whose CA is a plug-in root: the anchors' CA (their
#     ca.pem/ca.key), so the agents' certificates chain where the other
#     rows' do, for the same SPIFFE identities (sa/frontend, sa/backend);
#   - the cluster registered through the API (meshctl cluster add) and
#     the agents enrolled with join tokens (meshctl token create), as an
#     operator would; their data plane is mTLS (no --plaintext).
# The federation runs on the load generator's core (it idles during the
# runs: heartbeats only), the pair on the server core like the other rows.
# Then benches/mesh_resources.py runs each pair again on the same configs
# and reads /proc: both proxies' RSS idle and with 1,000 idle keep-alive
# client connections, their CPU time per request under wrk keep-alive, and
# their peak RSS.
# Usage: bash benches/mesh-mtls.sh   (about 6 minutes after the build;
# REPS, DURATION, MODES and the shared script's other knobs pass through)
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${SHARED_BENCH:-../shared/bench}
bash scripts/deps.sh
bash "$SHARED/anchors/setup.sh"
cargo build --release --locked -p mesh-agent -p federation -p meshctl
AGENT=$PWD/target/release/fedmesh-agent
FED=$PWD/target/release/fedmesh-federation
CTL=$PWD/target/release/meshctl
PKI=${BENCH_CACHE:-/tmp/bench-cache}/pki
mkdir -p target/bench
OUT=${OUT:-target/bench/mesh-mtls-$(date -u +%Y-%m-%dT%H%M).txt}
FED_PORT=${FED_PORT:-18591}

tmp=$(mktemp -d)
admin_cfg=$tmp/admin.yaml
setsid taskset -c 0 "$FED" --listen "127.0.0.1:$FED_PORT" --registry memory \
  --ca-cert "$PKI/ca.pem" --ca-key "$PKI/ca.key" \
  --bootstrap-admin "$admin_cfg" >"$tmp/federation.log" 2>&1 &
fed=$!
cleanup() {
  kill -TERM -- "-$fed" 2>/dev/null || true
  wait "$fed" 2>/dev/null || true
  rm -rf "$tmp"
}
trap cleanup EXIT
for _ in $(seq 100); do
  [ -s "$admin_cfg" ] && break
  kill -0 "$fed" 2>/dev/null || { cat "$tmp/federation.log" >&2; exit 1; }
  sleep 0.1
done
export FEDMESH_CONFIG=$admin_cfg
"$CTL" cluster add bench --region bench --zone bench-a --network bench --allow-local-endpoints >/dev/null
token() {
  "$CTL" token create --cluster bench --namespace default --service-account "$1" --ttl 12h --reusable -o json |
    python3 -c 'import json, sys; print(json.load(sys.stdin)[0]["token"])'
}
export FEDMESH_BENCH_AGENT=$AGENT
export FEDMESH_BENCH_FEDERATION=https://127.0.0.1:$FED_PORT
FEDMESH_BENCH_TOKEN_FRONTEND=$(token frontend)
FEDMESH_BENCH_TOKEN_BACKEND=$(token backend)
export FEDMESH_BENCH_TOKEN_FRONTEND FEDMESH_BENCH_TOKEN_BACKEND
unset FEDMESH_CONFIG

PAIR_CMD="bash $PWD/benches/mesh-pair.sh {listen} {backend} {inbound}"
before=$(ls -d /tmp/bench-run.* 2>/dev/null | sort || true)
KEEP_WORK=1 CANDIDATE_NAME=agents MODES=${MODES:-"h1 c1"} CANDIDATE_CMD="$PAIR_CMD" \
  bash "$SHARED/anchors/mesh-mtls.sh" | tee "$OUT"
work=$(comm -13 <(echo "$before") <(ls -d /tmp/bench-run.* | sort) | tail -n 1)
[ -n "$work" ] || { echo "mesh-mtls.sh: cannot find the kept run directory" >&2; exit 1; }
# The pairs' CPU per request and memory from /proc, on the same configs.
python3 benches/mesh_resources.py --workdir "$work" --pair-cmd "$PAIR_CMD" | tee -a "$OUT"
rm -rf "$work"
echo "results: $OUT"
