#!/usr/bin/env bash
# The fedmesh candidate of ../shared/bench/anchors/mesh-mtls.sh: two agents,
# as two Pods' sidecars. Run by benches/mesh-mtls.sh (which starts the
# federation, registers the cluster and makes the join tokens), as
#   bash benches/mesh-pair.sh {listen} {backend} {inbound}
#   frontend agent: outbound listener {listen} (plain HTTP from the load
#                   generator, the "app"), mTLS to the backend agent;
#   backend agent:  inbound listener {inbound} (mTLS, client certificate
#                   required), in front of the app {backend}.
# Both enroll with the federation with join tokens; their certificates chain
# to the anchors' CA (the federation's plug-in root), for the anchors'
# SPIFFE identities spiffe://cluster.local/ns/default/sa/frontend and
# .../sa/backend. One process group: the anchor pins and stops it whole.
set -euo pipefail
listen=$1 backend=$2 inbound=$3
: "${FEDMESH_BENCH_AGENT:?}" "${FEDMESH_BENCH_FEDERATION:?}" "${FEDMESH_BENCH_TOKEN_FRONTEND:?}" "${FEDMESH_BENCH_TOKEN_BACKEND:?}"
common=(--cluster bench --region bench --zone bench-a --namespace default
  --federation "$FEDMESH_BENCH_FEDERATION" --admin off --log-format text)
"$FEDMESH_BENCH_AGENT" "${common[@]}" --service backend --app "127.0.0.1:$backend" \
  --inbound "127.0.0.1:$inbound" --outbound 127.0.0.1:0 --join-token "$FEDMESH_BENCH_TOKEN_BACKEND" &
"$FEDMESH_BENCH_AGENT" "${common[@]}" --service frontend --app "127.0.0.1:$backend" \
  --inbound 127.0.0.1:0 --outbound "127.0.0.1:$listen" --join-token "$FEDMESH_BENCH_TOKEN_FRONTEND" &
trap 'kill $(jobs -p) 2>/dev/null || true' TERM INT EXIT
wait
