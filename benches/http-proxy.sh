#!/usr/bin/env bash
# HTTP proxy benchmark: the agent's inbound hop (a sidecar in front of its
# application) beside direct, Envoy, HAProxy and nginx, all in one run,
# loopback only.
#   1. ../shared/bench/anchors/http-proxy.sh with fedmesh-agent as the
#      candidate row: requests/s and latency, keep-alive (h1) and one
#      connection (c1), ratios against direct in the same run. The agent
#      runs as a sidecar does: registered with a federation (the real
#      fedmesh-federation binary, embedded registry, started here, called
#      over TLS with a join token's certificate), its inbound listener in
#      front of the anchors' nginx backend, in plain text as the other rows
#      (no mTLS: they have none).
#   2. benches/http_resources.py on the same configs: idle RSS, RSS per idle
#      keep-alive connection, peak RSS under load, CPU per request.
# Usage: bash benches/http-proxy.sh     (about 8 minutes after the build;
# REPS, DURATION, MODES and the shared script's other knobs pass through)
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${SHARED_BENCH:-../shared/bench}
bash scripts/deps.sh
bash "$SHARED/anchors/setup.sh"
cargo build --release -p mesh-agent -p federation
AGENT=$PWD/target/release/fedmesh-agent
FED=$PWD/target/release/fedmesh-federation
mkdir -p target/bench
OUT=${OUT:-target/bench/http-proxy-$(date -u +%Y-%m-%dT%H%M).txt}
FED_PORT=${FED_PORT:-18590}

# The federation the agents register with, on the load generator's core (it
# idles during the runs: heartbeats only). Stopped by PID on exit.
fedlog=$(mktemp)
admin_cfg=$(mktemp -d)/admin.yaml
setsid taskset -c 0 "$FED" --listen "127.0.0.1:$FED_PORT" --registry memory \
  --bootstrap-admin "$admin_cfg" >"$fedlog" 2>&1 &
fed=$!
before=$(ls -d /tmp/bench-run.* 2>/dev/null | sort || true)
work=
cleanup() {
  kill -TERM -- "-$fed" 2>/dev/null || true
  wait "$fed" 2>/dev/null || true
  rm -f "$fedlog"
  rm -rf "$(dirname "$admin_cfg")"
  [ -z "$work" ] || rm -rf "$work"
}
trap cleanup EXIT
for _ in $(seq 100); do
  (exec 3<>"/dev/tcp/127.0.0.1/$FED_PORT") 2>/dev/null && break
  kill -0 "$fed" 2>/dev/null || { cat "$fedlog" >&2; exit 1; }
  sleep 0.1
done

# The federation serves TLS only: the agent enrolls with a reusable join
# token (it carries the root's hash) for its federation link; its data plane
# stays in plain text like the other rows'.
for _ in $(seq 100); do [ -s "$admin_cfg" ] && break; sleep 0.1; done
cargo build --release -p meshctl
TOKEN=$(FEDMESH_CONFIG=$admin_cfg target/release/meshctl token create --cluster bench \
  --service-account backend --ttl 12h --reusable -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["token"])')
FEDMESH_CONFIG=$admin_cfg target/release/meshctl cluster add bench --region bench --zone bench-a \
  --network bench >/dev/null
# {listen} is the agent's inbound listener, {backend} its application.
AGENT_CMD="$AGENT --cluster bench --region bench --zone bench-a --service backend \
--app 127.0.0.1:{backend} --inbound 127.0.0.1:{listen} --outbound 127.0.0.1:0 --admin off \
--plaintext --join-token $TOKEN --federation https://127.0.0.1:$FED_PORT"
KEEP_WORK=1 CANDIDATE_NAME=agent MODES=${MODES:-"h1 c1"} CANDIDATE_CMD="$AGENT_CMD" \
  bash "$SHARED/anchors/http-proxy.sh" | tee "$OUT"
work=$(comm -13 <(echo "$before") <(ls -d /tmp/bench-run.* | sort) | tail -n 1)
[ -n "$work" ] || { echo "http-proxy.sh: cannot find the kept run directory" >&2; exit 1; }
python3 benches/http_resources.py --workdir "$work" --agent-cmd "$AGENT_CMD" | tee -a "$OUT"
echo "results: $OUT"
