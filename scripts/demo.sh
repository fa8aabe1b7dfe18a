#!/usr/bin/env bash
# The main job: a local constellation on one machine. Shard servers (embedded store) run
# in-process on loopback gRPC, one simulated TV per MovieLens-100K user replays its ratings,
# syncs every 5-15 simulated minutes, federation rounds run on the simulated hour, and every
# method is evaluated next to the fleet (popularity, MF with BPR and BCE, EASE, the federated
# scorer fitted centrally, local-only, federated, and with --full federated with DP).
#
#   scripts/demo.sh           the quick run: the first 100 users, one seed, a few minutes
#   scripts/demo.sh --full    the whole evaluation: 943 users, 5 seeds, baselines searched on
#                             the validation item, the DP pass
#
# Extra arguments go to omega-sim (`--help` lists them), e.g. `--ties item-index`,
# `--database-url postgres://…` for Postgres, `--json` for the JSON report only.
set -euo pipefail
cd "$(dirname "$0")/.."

python3 scripts/assets.py fetch ort model tokenizer movielens >/dev/null
eval "$(python3 scripts/assets.py env)"
cargo run --release --locked -p omega-e2e --bin omega-sim -- "$@"
