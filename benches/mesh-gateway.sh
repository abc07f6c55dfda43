#!/usr/bin/env bash
# The mesh path across networks, through the destination cluster's east-west
# gateway (issue 19, point 1b): app -> outbound sidecar -> mTLS, client
# certificate required and verified, end to end -> east-west gateway (routes
# on the TLS server name, does not decrypt) -> inbound sidecar -> app. The
# same path as benches/mesh-mtls.sh with the gateway hop inserted; the
# shared anchor script cannot insert a hop, so the rows run here, with its
# helpers (../shared/bench/anchors/lib.sh: pinning, wrk and report.lua, the
# table, the checks, the summary) and its backend, PKI and sidecar configs:
#   direct      wrk -> the app (the anchors' nginx, fixed 200)
#   envoy+gw    the anchors' Envoy pair (../shared/bench/anchors/mesh-mtls.sh's
#               envoy-out.yaml and envoy-in.yaml, rendered from that file; only
#               the outbound's upstream port and SNI differ) with an Envoy
#               east-west gateway between them: tls_inspector, a filter chain
#               matched on server_names, tcp_proxy to the inbound sidecar (TLS
#               passed through, as Istio's AUTO_PASSTHROUGH gateway). The
#               outbound sends the AUTO_PASSTHROUGH name
#               outbound_.<port>_._.backend.default.svc.cluster.local
#   haproxy+gw  the anchors' HAProxy pair, the same way, with an HAProxy TCP
#               gateway (req.ssl_sni); its inbound shows a leaf whose DNS name
#               is the SNI name (HAProxy checks the certificate against the SNI)
#   agents+gw   two fedmesh agents in two clusters on two networks, set up as
#               an operator would: fedmesh-federation (memory registry, the
#               anchors' CA as plug-in root, so every row's certificates chain
#               to the same root, for the same SPIFFE identities), clusters
#               `front` (network net-front) and `back` (net-back, its gateway
#               listed) added with meshctl, join tokens from meshctl, the
#               service default/backend exported from `back` (SetExport:
#               benches/mesh-gateway/set_export.py, meshctl has no command for
#               it), `back`'s fedmesh-gateway enrolled with a gateway token
#               and routing from the federation's Discovery stream. The
#               frontend agent (cluster front) reaches the backend endpoint
#               only through that gateway; the script checks it did after
#               the preflight and every run, and fails otherwise: the
#               gateway's /metrics (bytes spliced for default/backend at least
#               the responses' bodies) and the sockets (every connection into
#               the backend agent's inbound listener is the gateway's).
# Modes: h1 (wrk keep-alive, $CONNS connections), c1 (one connection),
# h1close (optional: a new client connection per request). Requests carry
# Host: $MESH_HOST as in the anchors. Pinning as the anchors: wrk on cpu0
# (LOAD_CPU); the three proxies of a row AND the app on cpu1 (SERVER_CPU),
# one worker each; the federation on cpu0 (it idles: heartbeats). Each row
# must answer the backend's body with 200 before it is measured.
# Then, on the last repetition, each row's CPU time per request of each of
# its three processes (outbound sidecar, gateway, inbound sidecar) and their
# peak RSS, from /proc (benches/mesh-gateway/resources.py, on
# benches/proxy_resources.py): wrk -c32 keep-alive for DURATION seconds.
# Usage: bash benches/mesh-gateway.sh
#   (about 3 minutes with the defaults; build first:
#    cargo build --release --locked -p mesh-agent -p gateway -p federation -p meshctl)
# Knobs: REPS (1), DURATION (8), WARMUP, CONNS, MODES ("h1 c1"), ROWS
# ("direct envoy+gw haproxy+gw agents+gw"), PORT_BASE (18800), FED_PORT
# (18592), WAIT_IDLE, OUT; the anchors' other knobs (lib.sh) pass through.
set -euo pipefail
SELF=$(realpath "$0")
cd "$(dirname "$SELF")/.."
ROOT=$PWD
SHARED=${SHARED_BENCH:-../shared/bench}
ANCHORS=$(cd "$SHARED/anchors" && pwd)
ROWS=${ROWS:-"direct envoy+gw haproxy+gw agents+gw"}
MODES=${MODES:-"h1 c1"}
REPS=${REPS:-1}
BIN=$ROOT/target/release

if [[ " $ROWS " == *" agents+gw "* ]]; then
  missing=()
  for b in fedmesh-agent fedmesh-gateway fedmesh-federation meshctl; do
    [ -x "$BIN/$b" ] || missing+=("$b")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "mesh-gateway.sh: no ${missing[*]} in $BIN; build with:" >&2
    echo "  cargo build --release --locked -p mesh-agent -p gateway -p federation -p meshctl" >&2
    exit 2
  fi
fi
bash "$ANCHORS/setup.sh"
mkdir -p target/bench
OUT=${OUT:-target/bench/mesh-gateway-$(date -u +%Y-%m-%dT%H%M).txt}
# Everything from here is copied to $OUT. tee ignores INT and TERM, so that it outlives an
# interrupted run's cleanup (which would otherwise die writing to a closed pipe) and ends at EOF.
exec > >(trap '' INT TERM; exec tee "$OUT") 2>&1
TEE=$!

source "$ANCHORS/lib.sh"   # WORK, PIDS, start_bg, stop_bg, wait_port, run_wrk, record, summarize; its
                           # EXIT trap stops every process group started (the federation too) and removes WORK
trap 'cleanup; echo "results: $OUT"; exec >&- 2>&-; wait "$TEE" 2>/dev/null || true' EXIT

# The anchors' names and body, from their mesh-mtls.sh.
eval "$(grep -m1 '^MESH_HOST=' "$ANCHORS/mesh-mtls.sh")"
eval "$(grep -m1 '^BODY=' "$ANCHORS/mesh-mtls.sh")"
: "${MESH_HOST:?}" "${BODY:?}"
BASE=${PORT_BASE:-18800}
BACK=$((BASE + 1))
BLOG=$WORK/backend.access
# The anchors' heredocs use PORT[envoy|haproxy|nginx], BASE, BACK, PKI, WORK, BLOG and BODY, with
# the pair's inbound listener at BASE+12 (Envoy) and BASE+22 (HAProxy); the gateways are added.
declare -A PORT=([direct]=$BACK [envoy]=$((BASE + 11)) [haproxy]=$((BASE + 21)) [nginx]=$((BASE + 31))
  [envoy+gw]=$((BASE + 11)) [haproxy+gw]=$((BASE + 21)) [agents+gw]=$((BASE + 41)))
ENVOY_GW=$((BASE + 15)) ENVOY_GW_ADMIN=$((BASE + 16)) HAPROXY_GW=$((BASE + 25))
AGENT_IN=$((BASE + 42)) FEDMESH_GW=$((BASE + 45)) FEDMESH_GW_ADMIN=$((BASE + 46))
FED_PORT=${FED_PORT:-18592}
for row in $ROWS; do [ -n "${PORT[$row]:-}" ] || { echo "unknown row $row (rows: direct envoy+gw haproxy+gw agents+gw)" >&2; exit 2; }; done
for mode in $MODES; do case $mode in h1 | c1 | h1close) ;; *) echo "unknown mode $mode (modes: h1 c1 h1close)" >&2; exit 2 ;; esac; done
# The AUTO_PASSTHROUGH name of backend.default's port: the agents' service port is the app's.
SNI=outbound_.${BACK}_._.$MESH_HOST
ports_free "$BACK" "${PORT[@]}" $((BASE + 12)) $((BASE + 13)) $((BASE + 14)) $((BASE + 22)) \
  "$ENVOY_GW" "$ENVOY_GW_ADMIN" "$HAPROXY_GW" "$AGENT_IN" "$FEDMESH_GW" "$FEDMESH_GW_ADMIN" "$FED_PORT"
for f in ca.pem ca.key mesh-client.pem mesh-client.key mesh-server.pem mesh-server.key; do
  [ -f "$PKI/$f" ] || { echo "missing $PKI/$f: run anchors/setup.sh" >&2; exit 2; }
done
cat "$PKI/mesh-client.pem" "$PKI/mesh-client.key" >"$WORK/mesh-client.combined.pem"
cat "$PKI/mesh-server.pem" "$PKI/mesh-server.key" >"$WORK/mesh-server.combined.pem"

# anchor_conf FILE : the anchors' mesh-mtls.sh heredoc that writes $WORK/FILE, expanded here.
anchor_conf() {
  local body
  body=$(WANT="cat >\"\$WORK/$1\" <<EOF" awk '$0 == ENVIRON["WANT"] {on = 1; next} on && $0 == "EOF" {exit} on' \
    "$ANCHORS/mesh-mtls.sh")
  [ -n "$body" ] || { echo "mesh-gateway.sh: no $1 in $ANCHORS/mesh-mtls.sh" >&2; exit 2; }
  eval "cat <<EOF
$body
EOF" >"$WORK/$1"
}
# swap FILE OLD NEW : replace the fixed string OLD, which must occur on exactly one line.
swap() {
  local n; n=$(grep -cF -- "$2" "$1" || true)
  [ "$n" = 1 ] || { echo "mesh-gateway.sh: expected one '$2' in $1, found $n" >&2; exit 2; }
  OLD=$2 NEW=$3 awk '{i = index($0, ENVIRON["OLD"])
    if (i) $0 = substr($0, 1, i - 1) ENVIRON["NEW"] substr($0, i + length(ENVIRON["OLD"])); print}' "$1" >"$1.new"
  mv "$1.new" "$1"
}

# --- the app, and the pairs' configs: the anchors', pointed at a gateway with the SNI name ----
for f in backend.conf envoy-out.yaml envoy-in.yaml haproxy-out.cfg haproxy-in.cfg; do anchor_conf "$f"; done
swap "$WORK/envoy-out.yaml" "port_value: $((BASE + 12))}" "port_value: $ENVOY_GW}"
swap "$WORK/envoy-out.yaml" "sni: backend.mesh.local" "sni: $SNI"
swap "$WORK/haproxy-out.cfg" "server s1 127.0.0.1:$((BASE + 22)) " "server s1 127.0.0.1:$HAPROXY_GW "
swap "$WORK/haproxy-out.cfg" "sni str(backend.mesh.local)" "sni str($SNI)"
# HAProxy checks the server's certificate against the SNI it sends (verifyhost only applies without
# one) and cannot match a SPIFFE URI, so its inbound shows a leaf of the anchors' CA for the same
# identity whose DNS name is the SNI name (the anchors' leaf names backend.mesh.local).
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/O=bench mesh" \
  -keyout "$WORK/mesh-server-sni.key" -out "$WORK/mesh-server-sni.csr" 2>/dev/null
openssl x509 -req -in "$WORK/mesh-server-sni.csr" -CA "$PKI/ca.pem" -CAkey "$PKI/ca.key" \
  -set_serial "0x$(openssl rand -hex 8)" -days 2 -out "$WORK/mesh-server-sni.pem" -extfile <(printf \
  'subjectAltName=URI:spiffe://cluster.local/ns/default/sa/backend,DNS:%s\nextendedKeyUsage=serverAuth,clientAuth' "$SNI") \
  2>/dev/null
cat "$WORK/mesh-server-sni.pem" "$WORK/mesh-server-sni.key" >"$WORK/mesh-server-sni.combined.pem"
swap "$WORK/haproxy-in.cfg" "crt $WORK/mesh-server.combined.pem " "crt $WORK/mesh-server-sni.combined.pem "

# --- the gateways ------------------------------------------------------------------------------
cat >"$WORK/envoy-gw.yaml" <<EOF
admin: {address: {socket_address: {address: 127.0.0.1, port_value: $ENVOY_GW_ADMIN}}}
static_resources:
  listeners:
  - name: eastwest
    address: {socket_address: {address: 127.0.0.1, port_value: $ENVOY_GW}}
    listener_filters:
    - name: envoy.filters.listener.tls_inspector
      typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector}
    filter_chains:
    - filter_chain_match: {server_names: ["$SNI"]}
      filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: backend
          cluster: backend
  clusters:
  - name: backend
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: backend
      endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: $((BASE + 12))}}}}]}]
EOF
cat >"$WORK/haproxy-gw.cfg" <<EOF
global
  nbthread 1
  maxconn 4096
defaults
  mode tcp
  timeout connect 1s
  timeout client 30s
  timeout server 30s
frontend eastwest
  bind 127.0.0.1:$HAPROXY_GW
  tcp-request inspect-delay 5s
  tcp-request content accept if { req.ssl_hello_type 1 }
  use_backend sidecar_in if { req.ssl_sni -i $SNI }
backend sidecar_in
  server s1 127.0.0.1:$((BASE + 22))
EOF

# --- fedmesh: the federation, two clusters on two networks, tokens, the export ----------------
fedmesh_setup() {
  local admin_cfg=$WORK/admin.yaml i
  setsid taskset -c "$LOAD_CPU" "$BIN/fedmesh-federation" --listen "127.0.0.1:$FED_PORT" --registry memory \
    --ca-cert "$PKI/ca.pem" --ca-key "$PKI/ca.key" --bootstrap-admin "$admin_cfg" \
    >"$WORK/federation.out" 2>&1 &
  PIDS+=("$!")
  wait_port "$FED_PORT" "$!" federation
  for i in $(seq 100); do [ -s "$admin_cfg" ] && break; sleep 0.1; done
  [ -s "$admin_cfg" ] || { echo "the federation wrote no $admin_cfg" >&2; tail -20 "$WORK/federation.out" >&2; exit 1; }
  ctl() { FEDMESH_CONFIG=$admin_cfg "$BIN/meshctl" "$@"; }
  ctl cluster add front --region bench --zone bench-a --network net-front --allow-local-endpoints >/dev/null
  ctl cluster add back --region bench --zone bench-b --network net-back --gateway "127.0.0.1:$FEDMESH_GW" \
    --allow-local-endpoints >/dev/null
  token() { ctl token create "$@" --ttl 12h --reusable -o json | python3 -c 'import json, sys; print(json.load(sys.stdin)[0]["token"])'; }
  TOKEN_FRONTEND=$(token --cluster front --namespace default --service-account frontend)
  TOKEN_BACKEND=$(token --cluster back --namespace default --service-account backend)
  TOKEN_GATEWAY=$(token --cluster back --gateway)
  python3 "$ROOT/benches/mesh-gateway/set_export.py" "$admin_cfg" back default "${MESH_HOST%%.*}" >/dev/null
}

# The gateway's counters for default/backend: "connections bytes_downstream".
gw_counters() {
  curl -sf --max-time 2 "http://127.0.0.1:$FEDMESH_GW_ADMIN/metrics" | awk '
    /^fedmesh_gateway_connections_total\{/ && /service="default\/backend"/ {c += $NF}
    /^fedmesh_gateway_bytes_total\{/ && /service="default\/backend"/ && /direction="downstream"/ {b += $NF}
    END {printf "%d %d\n", c, b}'
}

# --- rows --------------------------------------------------------------------------------------
ROW_OUT= ROW_GW= ROW_IN=
start_row() { # ROW -> ROW_OUT ROW_GW ROW_IN (process group ids; empty for direct)
  ROW_OUT= ROW_GW= ROW_IN=
  local envoy=("$ENVOY" --concurrency 1 --disable-hot-restart -l warn) i
  local agent=("$BIN/fedmesh-agent" --namespace default --region bench --federation "https://127.0.0.1:$FED_PORT"
    --admin off --log-format text --drain-deadline 1s)
  case $1 in
    direct) return ;;
    envoy+gw)
      start_bg envoy-in "${envoy[@]}" -c "$WORK/envoy-in.yaml" --base-id 71; ROW_IN=$LAST_PID
      start_bg envoy-gw "${envoy[@]}" -c "$WORK/envoy-gw.yaml" --base-id 73; ROW_GW=$LAST_PID
      start_bg envoy+gw "${envoy[@]}" -c "$WORK/envoy-out.yaml" --base-id 72; ROW_OUT=$LAST_PID
      wait_port $((BASE + 12)) "$ROW_IN" envoy-in
      wait_port "$ENVOY_GW" "$ROW_GW" envoy-gw ;;
    haproxy+gw)
      start_bg haproxy-in haproxy -db -f "$WORK/haproxy-in.cfg"; ROW_IN=$LAST_PID
      start_bg haproxy-gw haproxy -db -f "$WORK/haproxy-gw.cfg"; ROW_GW=$LAST_PID
      start_bg haproxy+gw haproxy -db -f "$WORK/haproxy-out.cfg"; ROW_OUT=$LAST_PID
      wait_port $((BASE + 22)) "$ROW_IN" haproxy-in
      wait_port "$HAPROXY_GW" "$ROW_GW" haproxy-gw ;;
    agents+gw)
      start_bg fedmesh-gw "$BIN/fedmesh-gateway" --cluster back --listen "127.0.0.1:$FEDMESH_GW" \
        --federation "https://127.0.0.1:$FED_PORT" --join-token "$TOKEN_GATEWAY" \
        --admin "127.0.0.1:$FEDMESH_GW_ADMIN" --access-log off --log-format text --drain-deadline 1s
      ROW_GW=$LAST_PID
      start_bg agent-in "${agent[@]}" --cluster back --zone bench-b --service backend --id backend-bench \
        --app "127.0.0.1:$BACK" --inbound "127.0.0.1:$AGENT_IN" --outbound 127.0.0.1:0 --join-token "$TOKEN_BACKEND"
      ROW_IN=$LAST_PID
      start_bg agents+gw "${agent[@]}" --cluster front --zone bench-a --service frontend --id frontend-bench \
        --app "127.0.0.1:$BACK" --inbound 127.0.0.1:0 --outbound "127.0.0.1:${PORT[agents+gw]}" \
        --join-token "$TOKEN_FRONTEND"
      ROW_OUT=$LAST_PID
      wait_port "$FEDMESH_GW_ADMIN" "$ROW_GW" fedmesh-gw
      wait_port "$AGENT_IN" "$ROW_IN" agent-in
      # Ready: routes from the federation loaded.
      for i in $(seq 200); do
        [ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "http://127.0.0.1:$FEDMESH_GW_ADMIN/ready")" = 200 ] && break
        alive "$ROW_GW" || break
        sleep 0.1
      done
      [ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "http://127.0.0.1:$FEDMESH_GW_ADMIN/ready")" = 200 ] ||
        { echo "fedmesh-gateway not ready; its output:" >&2; tail -20 "$WORK/fedmesh-gw.out" >&2; exit 1; } ;;
  esac
  wait_port "${PORT[$1]}" "$ROW_OUT" "$1"
}
stop_row() { local p; for p in $ROW_OUT $ROW_GW $ROW_IN; do stop_bg "$p"; done; }

preflight() { # ROW : the backend's body with 200 through every hop; retried while the row settles
  local got i tries=50
  [ "$1" != agents+gw ] || tries=150   # enrollment, then the backend's endpoint and the export reaching the agent
  for i in $(seq "$tries"); do
    got=$(curl -sS --max-time 3 -H "Host: $MESH_HOST" -w ' %{http_code}' "http://127.0.0.1:${PORT[$1]}/" 2>&1 || true)
    [ "$got" = "$BODY"$'\n'" 200" ] && break
    sleep 0.2
  done
  [ "$got" = "$BODY"$'\n'" 200" ] || { echo "preflight $1 failed: $got" >&2; tail -n 5 "$WORK"/*.out >&2; exit 1; }
  if [ "$1" = agents+gw ]; then
    set -- $(gw_counters)
    [ "$1" -ge 1 ] || { echo "agents+gw: the answer came, but fedmesh-gateway routed no connection for default/backend:" \
      "the frontend agent did not go through the gateway" >&2; exit 1; }
    got=$(inbound_peers)
    [ "$got" = ok ] || { echo "agents+gw: $got: the frontend agent did not (only) go through the gateway" >&2; exit 1; }
  fi
}

# inbound_peers : "ok" if every established connection into the backend agent's inbound listener
# belongs to the gateway's process (and there is one), else what owns them.
inbound_peers() {
  local owners
  owners=$(ss -Htnp state established "( dport = :$AGENT_IN )" | grep -o 'pid=[0-9]*' | sort -u | tr '\n' ' ')
  if [ "$owners" = "pid=$ROW_GW " ]; then echo ok; else echo "connections into 127.0.0.1:$AGENT_IN owned by [${owners% }], the gateway is pid=$ROW_GW"; fi
}

# gw_check MODE REP BEFORE_CONNS BEFORE_BYTES : after a run, the gateway must have carried at least
# the bodies of the responses counted (the warm-up's only add to it).
gw_check() {
  local mode=$1 rep=$2 c0=$3 b0=$4 c1 b1 line requests=0 non2xx=0
  set -- $(gw_counters); c1=$1 b1=$2
  line=$(grep '^WRK ' "$WORK/wrk.out" || true)
  [ -z "$line" ] || eval "${line#WRK }"
  local ok=$((requests - non2xx)) need
  need=$((ok * ${#BODY}))
  printf "%-10s %-10s %3s %12s %14s %12s %10s\n" "$mode" agents+gw "$rep" "$ok" "$((b1 - b0))" \
    "$(( ok > 0 ? (b1 - b0) / ok : 0 ))" "$((c1 - c0))" >>"$WORK/gateway.txt"
  if [ "$ok" -eq 0 ] || [ $((b1 - b0)) -lt "$need" ]; then
    echo "agents+gw $mode: fedmesh-gateway spliced $((b1 - b0)) bytes downstream for default/backend during a run" \
      "of $ok responses of ${#BODY}+ bytes each: the traffic did not cross the gateway" >&2
    exit 1
  fi
  local peers; peers=$(inbound_peers)
  [ "$peers" = ok ] || { echo "agents+gw $mode: $peers: the traffic did not (only) cross the gateway" >&2; exit 1; }
}

# --- run ---------------------------------------------------------------------------------------
start_bg backend nginx -e "$WORK/backend.err" -c "$WORK/backend.conf" -g 'daemon off;'
wait_port "$BACK" "$LAST_PID" backend
[[ " $ROWS " != *" agents+gw "* ]] || fedmesh_setup

say "== mesh-gateway  $(date -u +%FT%TZ)  $(uname -r)  $(nproc) cores"
say "   app -> outbound sidecar -> mTLS (client cert verified) -> east-west gateway (SNI passthrough) ->"
say "   inbound sidecar -> app; Host: $MESH_HOST; SNI $SNI"
say "   h1: wrk -t1 -c$CONNS keep-alive; c1: one connection; ${DURATION}s measured after ${WARMUP}s warm-up,"
say "   $REPS reps interleaved by row. Load generator on cpu$LOAD_CPU; the three proxies AND the app share"
say "   cpu$SERVER_CPU (envoy --concurrency 1, haproxy nbthread 1, the fedmesh binaries pinned: one worker);"
say "   agents+gw: clusters front (net-front) and back (net-back), federation on cpu$LOAD_CPU."
idle_check
print_header
: >"$WORK/resources.tsv"
for rep in $(seq "$REPS"); do
  for row in $ROWS; do
    start_row "$row"
    preflight "$row"
    for mode in $MODES; do
      case $mode in
        h1) extra=() ;;
        c1) extra=(-c1) ;;
        h1close) extra=(-H "Connection: close") ;;
      esac
      [ "$row" != agents+gw ] || read -r gw_conns gw_bytes < <(gw_counters)
      run_wrk "$mode" "$row" "$rep" "http://127.0.0.1:${PORT[$row]}/" "$BLOG" -H "Host: $MESH_HOST" "${extra[@]}"
      [ "$row" != agents+gw ] || gw_check "$mode" "$rep" "$gw_conns" "$gw_bytes"
    done
    if [ "$rep" = "$REPS" ] && [ "$row" != direct ]; then
      python3 "$ROOT/benches/mesh-gateway/resources.py" measure "$row" "${PORT[$row]}" "$MESH_HOST" "$DURATION" \
        "out=$ROW_OUT" "gw=$ROW_GW" "in=$ROW_IN" >>"$WORK/resources.tsv"
    fi
    stop_row
  done
done
say "-- mesh-gateway summary (median of $REPS; ratios vs direct in the same mode)"
summarize
if [ -s "$WORK/gateway.txt" ]; then
  say "-- agents+gw through fedmesh-gateway (its /metrics, default/backend, warm-up included): it carried"
  say "   every run (checked: bytes downstream >= responses x ${#BODY}-byte body, and every connection"
  say "   into the backend agent's inbound listener is the gateway's)"
  printf "%-10s %-10s %3s %12s %14s %12s %10s\n" mode row rep responses bytes_down bytes/resp new_conns
  cat "$WORK/gateway.txt"
fi
if [ -s "$WORK/resources.tsv" ]; then
  say "-- per-process CPU per request and peak RSS (wrk -c32 keep-alive ${DURATION}s, last rep; out = outbound"
  say "   sidecar, gw = gateway, in = inbound sidecar; all three and the app on cpu$SERVER_CPU)"
  python3 "$ROOT/benches/mesh-gateway/resources.py" table "$WORK/resources.tsv"
fi
