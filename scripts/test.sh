#!/usr/bin/env bash
# The whole test suite: installs what it needs, then formatting, lints, and
# every test (unit, integration against a real etcd on loopback, binaries end
# to end, doc-tests, the proto bootstrap check, benchmark smoke).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== cargo test"
cargo test --workspace --all-targets --locked
echo "== doc-tests"
cargo test --workspace --doc --locked
