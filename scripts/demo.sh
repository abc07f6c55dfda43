#!/usr/bin/env bash
# The main job: builds fedmesh and runs `meshctl demo`, a federation on the
# embedded registry with a sample 3-region, 4-cluster mesh registered, until
# Ctrl-C. Extra arguments go to `meshctl demo` (e.g. --listen, --etcd).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh
cargo build --release -p meshctl
exec target/release/meshctl demo "$@"
