#!/usr/bin/env bash
# The main job: builds fedmesh and runs `meshctl demo`, a live 3-region,
# 4-cluster mesh (federation on the embedded registry, a gateway, frontend
# and reviews with their agents per cluster, steady traffic, a live view)
# until Ctrl-C. Extra arguments go to `meshctl demo` (e.g. --listen, --etcd,
# --rate).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh
cargo build --release -p meshctl
exec target/release/meshctl demo "$@"
