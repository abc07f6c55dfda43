#!/usr/bin/env bash
# Deletes what deploy/local/up.sh made, if a crash left it: the fedmesh-*
# network namespaces (with their interfaces, addresses, routes and iptables
# rules) and the root namespace's link to them.
set -euo pipefail
if [ "$(id -u)" != 0 ]; then
    echo "deploy/local/down.sh: needs root" >&2
    exit 1
fi
removed=0
for ns in $(ip netns list | awk '{print $1}' | grep '^fedmesh-' || true); do
    ip netns del "$ns" && echo "deleted network namespace $ns" && removed=$((removed + 1))
done
if ip link show fedmesh0 >/dev/null 2>&1; then
    ip link del fedmesh0 && echo "deleted interface fedmesh0" && removed=$((removed + 1))
fi
echo "$removed removed"
