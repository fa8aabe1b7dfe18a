#!/usr/bin/env bash
# The main job: a local constellation on one machine. Shard servers (embedded store) run
# in-process on loopback gRPC, one simulated TV per MovieLens-100K user replays its ratings,
# syncs every 5-15 simulated minutes, federation rounds run on the simulated hour, and every
# method is evaluated (popularity, local-only, centralised MF, federated, federated with DP).
# Extra arguments go to omega-sim, e.g. `scripts/demo.sh --users 100 --no-dp` for a quick run,
# `--database-url postgres://…` for Postgres, `--json` for the JSON report only.
set -euo pipefail
cd "$(dirname "$0")/.."

python3 scripts/assets.py fetch ort model tokenizer movielens >/dev/null
eval "$(python3 scripts/assets.py env)"
cargo run --release --locked -p omega-e2e --bin omega-sim -- "$@"
