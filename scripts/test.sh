#!/usr/bin/env bash
# The whole test suite: installs what it needs, then formatting, lints, and
# every test (unit, integration against a real etcd on loopback, binaries end
# to end, doc-tests, the proto bootstrap check, benchmark smoke), then the
# container images built and tested (scripts/test-images.sh, as root).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh
# No incremental caches: a test build of the workspace writes tens of GB of them.
export CARGO_INCREMENTAL=0

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
log=$(mktemp)
trap 'rm -f "$log"' EXIT
bash scripts/validate-deploy.sh
echo "== cargo test"
cargo test --workspace --all-targets --locked 2>&1 | tee "$log"
echo "== doc-tests"
cargo test --workspace --doc --locked 2>&1 | tee -a "$log"
FEDMESH_RENDERED_FRESH=1 bash scripts/test-images.sh 2>&1 | tee -a "$log"

# One closing line with the totals over every test binary and the doc-tests.
total() { grep -oE "[0-9]+ $1" "$log" | awk '{ s += $1 } END { print s + 0 }'; }
echo "$(total passed) passed, $(total failed) failed, $(total ignored) skipped"
