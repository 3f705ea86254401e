#!/usr/bin/env bash
# The test command: fetches the default model (once) and runs every test of the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/fetch-model.sh
cargo test --workspace --locked "$@"
