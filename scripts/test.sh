#!/usr/bin/env bash
# Runs every test of the workspace against the real parts: fetches the run-time assets
# (ONNX Runtime, the MiniLM model and tokenizer, Postgres + pgvector, MovieLens-100K), starts a
# throwaway Postgres on a free loopback port, runs the tests, and stops Postgres again.
# Extra arguments go to `cargo nextest run` (e.g. a test-name filter).
# With OMEGA_CROSS_TESTS=1, then the TV targets under qemu (docs/c-sdk.md, "CI"): the armv7
# library (tract) with the guide's C example, and with OMEGA_CROSS_AARCH64_TESTS=1 as well
# device-lib's tests cross-built for aarch64 with ONNX Runtime for aarch64. Off by default
# until a cold run on a 2-core machine is timed and fits the CI budget.
set -euo pipefail
cd "$(dirname "$0")/.."

python3 scripts/assets.py fetch all >/dev/null
# The Helm chart is linted and rendered through Helm's Go SDK (no helm binary needed), its
# output validated against Kubernetes' OpenAPI schemas; promtool (Debian `prometheus`) checks
# and unit-tests the alert rules.
python3 -m pip install --quiet --disable-pip-version-check helm-python-sdk==0.2.2 \
  kubernetes-validate==1.37.0
command -v promtool >/dev/null || { apt-get update && apt-get install -y --no-install-recommends prometheus; }
python3 charts/omega/ci/check.py
eval "$(python3 scripts/assets.py env)"
python3 scripts/test_assets.py

OMEGA_PG_DIR=$(mktemp -d /tmp/omega-pg-test.XXXXXX)
export OMEGA_PG_DIR
trap 'scripts/pg.sh destroy "$OMEGA_PG_DIR"' EXIT
OMEGA_TEST_DATABASE_URL=$(scripts/pg.sh start "$OMEGA_PG_DIR")
export OMEGA_TEST_DATABASE_URL
echo "test.sh: Postgres at $OMEGA_TEST_DATABASE_URL" >&2

if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast "$@"
else
  cargo test --workspace --no-fail-fast "$@"
fi
cargo test --workspace --doc
# Every dashboard query against a real Prometheus scraping a shard under omega-load and the
# operator binary run against the fake API server with one federation round (the binaries and
# the operator's cluster test the tests above built).
python3 charts/omega/ci/dashboard_live.py "${CARGO_TARGET_DIR:-target}/debug"

if [ "${OMEGA_CROSS_TESTS:-}" = 1 ]; then
  # One lean profile (opt-level 1: less optimising than release; not timed yet) and one
  # target folder for both targets, which then share the host's build scripts and macros.
  export OMEGA_CROSS_PROFILE=cross-ci
  scripts/cross.sh armv7-unknown-linux-gnueabihf build
  scripts/cross.sh armv7-unknown-linux-gnueabihf example
  if [ "${OMEGA_CROSS_AARCH64_TESTS:-}" = 1 ]; then
    scripts/cross.sh aarch64-unknown-linux-gnu tests
  fi
fi
