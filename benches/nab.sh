#!/usr/bin/env bash
# Scores the gateway's anomaly detector on the labelled NAB data: runs
# `edge-gateway replay` (default settings, the same for every file) over
# every file and prints the scorer's JSON line (standard, low FP, low FN).
set -euo pipefail
cd "$(dirname "$0")/.."
NAB=${NAB:-../shared/nab}
[ -d "$NAB/data" ] || { echo "no NAB data at $NAB (set NAB=...)" >&2; exit 1; }
cargo build --release -q --bin edge-gateway
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for f in "$NAB"/data/*/*.csv; do
  category=$(basename "$(dirname "$f")")
  mkdir -p "$out/$category"
  target/release/edge-gateway replay ${CONFIG:+--config "$CONFIG"} --input "$f" --output "$out/$category/$(basename "$f")" 2>/dev/null
done
python3 "$NAB/score.py" --data "$NAB/data" --windows "$NAB/windows.json" --results "$out"
