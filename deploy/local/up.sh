#!/usr/bin/env bash
# The demo mesh with every cluster in a network namespace of its own
# (fedmesh-<cluster>), the regions' bridges, the WAN relay and the
# federation in fedmesh-wan, addresses from 198.18.0.0/15, and the relay's
# delay and loss between regions. Needs root. Ctrl-C stops it and deletes
# everything it made; after a crash, deploy/local/down.sh does.
#
#   sudo deploy/local/up.sh [--rate N] [--topology PATH] [--etcd URL]
#
# Then, from the root namespace:
#   sudo target/release/meshctl weights get reviews   (the "demo" context written to root's meshctl config)
#   sudo target/release/meshctl drill run scenarios/blackhole-gateway.yaml
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ "$(id -u)" != 0 ]; then
    echo "deploy/local/up.sh: needs root (network namespaces, veth, iptables); try: sudo $0 $*" >&2
    exit 1
fi
bash scripts/deps.sh
cargo build --release -p meshctl
exec target/release/meshctl demo --netns "$@"
