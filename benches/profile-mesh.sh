#!/usr/bin/env bash
# Flame graphs of the mesh path's two agents under load: the frontend agent
# (outbound: plain HTTP in, mTLS out) and the backend agent (inbound: mTLS
# in, plain HTTP to the app), each recorded with perf (DWARF call graphs,
# cpu-clock: this machine has no hardware counters) while wrk drives
# keep-alive load through them, as in benches/mesh-mtls.sh (same
# federation, tokens and pair; nginx as the app). Writes
# docs/flame/agent-outbound.svg and docs/flame/agent-inbound.svg (inferno;
# `cargo install inferno` puts inferno-collapse-perf and
# inferno-flamegraph in ~/.cargo/bin) and the top functions of each.
# Needs root (perf) and the anchors' PKI (../shared/bench/anchors/setup.sh).
# Usage: bash benches/profile-mesh.sh   (PROFILE_SECONDS=10 FREQ=299 CONNS=32)
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${SHARED_BENCH:-../shared/bench}
bash "$SHARED/anchors/setup.sh" >/dev/null
for t in perf wrk nginx inferno-collapse-perf inferno-flamegraph; do
  command -v "$t" >/dev/null || [ -x "$HOME/.cargo/bin/$t" ] || { echo "profile-mesh.sh: $t not found" >&2; exit 1; }
done
export PATH=$PATH:$HOME/.cargo/bin
cargo build --release --locked -p mesh-agent -p federation -p meshctl
AGENT=$PWD/target/release/fedmesh-agent
FED=$PWD/target/release/fedmesh-federation
CTL=$PWD/target/release/meshctl
PKI=${BENCH_CACHE:-/tmp/bench-cache}/pki
SECS=${PROFILE_SECONDS:-10}
FREQ=${FREQ:-299}
CONNS=${CONNS:-32}
FED_PORT=18691 APP=18692 LISTEN=18693 INBOUND=18694
out=docs/flame
mkdir -p "$out"
tmp=$(mktemp -d)
pids=()
cleanup() {
  local p
  for p in "${pids[@]}"; do kill -TERM -- "-$p" 2>/dev/null || kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$tmp"
}
trap cleanup EXIT

setsid taskset -c 0 "$FED" --listen "127.0.0.1:$FED_PORT" --registry memory \
  --ca-cert "$PKI/ca.pem" --ca-key "$PKI/ca.key" --bootstrap-admin "$tmp/admin.yaml" >"$tmp/fed.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do [ -s "$tmp/admin.yaml" ] && break; sleep 0.1; done
export FEDMESH_CONFIG=$tmp/admin.yaml
"$CTL" cluster add bench --region bench --zone bench-a --network bench --allow-local-endpoints >/dev/null
token() {
  "$CTL" token create --cluster bench --namespace default --service-account "$1" --ttl 1h --reusable -o json |
    python3 -c 'import json, sys; print(json.load(sys.stdin)[0]["token"])'
}
export FEDMESH_BENCH_AGENT=$AGENT FEDMESH_BENCH_FEDERATION=https://127.0.0.1:$FED_PORT
FEDMESH_BENCH_TOKEN_FRONTEND=$(token frontend)
FEDMESH_BENCH_TOKEN_BACKEND=$(token backend)
export FEDMESH_BENCH_TOKEN_FRONTEND FEDMESH_BENCH_TOKEN_BACKEND
unset FEDMESH_CONFIG

cat >"$tmp/app.conf" <<EOF
worker_processes 1;
pid $tmp/app.pid;
error_log $tmp/app.err;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  server { listen 127.0.0.1:$APP; location / { return 200 "hello from backend\n"; } }
}
EOF
setsid taskset -c 1 nginx -c "$tmp/app.conf" -g 'daemon off;' >/dev/null 2>&1 &
pids+=($!)
setsid taskset -c 1 bash benches/mesh-pair.sh "$LISTEN" "$APP" "$INBOUND" >"$tmp/pair.log" 2>&1 &
pair=$!
pids+=("$pair")
ok=""
for _ in $(seq 100); do
  if [ "$(curl -s -o /dev/null -w '%{http_code}' -H 'Host: backend.default.svc.cluster.local' "http://127.0.0.1:$LISTEN/")" = 200 ]; then ok=1; break; fi
  sleep 0.2
done
[ -n "$ok" ] || { echo "the pair never answered:" >&2; cat "$tmp/pair.log" >&2; exit 1; }
agent_pid() { pgrep -g "$pair" -f "fedmesh-agent.*--service $1 " | head -n1; }
front=$(agent_pid frontend)
back=$(agent_pid backend)

echo "== profiling: wrk -c$CONNS keep-alive ${SECS}s through the pair (frontend pid $front, backend pid $back)"
taskset -c 0 wrk -t1 -c"$CONNS" -d"$((SECS + 2))s" -H 'Host: backend.default.svc.cluster.local' \
  "http://127.0.0.1:$LISTEN/" >"$tmp/wrk.txt" &
wrk_pid=$!
sleep 1
perf record -e cpu-clock -F "$FREQ" --call-graph dwarf,16384 -p "$front" -o "$tmp/front.data" -- sleep "$SECS" 2>"$tmp/perf-front.err" &
p1=$!
perf record -e cpu-clock -F "$FREQ" --call-graph dwarf,16384 -p "$back" -o "$tmp/back.data" -- sleep "$SECS" 2>"$tmp/perf-back.err" &
p2=$!
wait "$p1" "$p2"
wait "$wrk_pid"
grep -E "Requests/sec|Latency" "$tmp/wrk.txt"

render() { # DATA NAME TITLE
  perf script -i "$1" 2>/dev/null | inferno-collapse-perf >"$tmp/$2.folded"
  inferno-flamegraph --title "$3" --width 1400 --minwidth 0.2 <"$tmp/$2.folded" >"$out/$2.svg"
  echo "-- $2: top functions by self time (% of samples)"
  perf report -i "$1" --no-children --sort symbol --stdio 2>/dev/null |
    awk '/^ +[0-9.]+%/ && n++ < 20 { sub(/ +- +- *$/, ""); print }'
}
render "$tmp/front.data" agent-outbound "fedmesh-agent, outbound (frontend): plain HTTP in, mTLS out; wrk -c$CONNS keep-alive"
render "$tmp/back.data" agent-inbound "fedmesh-agent, inbound (backend): mTLS in, plain HTTP to the app; wrk -c$CONNS keep-alive"
echo "flame graphs: $out/agent-outbound.svg $out/agent-inbound.svg"
