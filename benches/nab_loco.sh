#!/usr/bin/env bash
# Leave-one-category-out scoring of the anomaly detector on the NAB data
# (see benches/nab_loco.py): settings chosen on three categories, scored on
# the fourth, for each of the four; last line JSON.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q --bin edge-gateway
exec python3 benches/nab_loco.py "$@"
