#!/usr/bin/env bash
# Runs the whole test suite, as CI does: formatting, clippy, then every unit
# and integration test on SQLite and on a throwaway PostgreSQL that this script
# starts (and removes afterwards).
set -euo pipefail
cd "$(dirname "$0")/.."

cargo fmt --all -- --check
cargo clippy --all-targets -- -D warnings
source scripts/pg.sh
cargo test --all-targets
# Explicitly, so the cluster goes even where the shell would exec the last command.
pg_stop
trap - EXIT
