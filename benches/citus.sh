#!/usr/bin/env bash
# The end-to-end benchmark (benches/e2e.rs) against a Citus cluster: a
# coordinator and E2E_CITUS workers (2), all on this host, the gateway and
# the raw COPY ceiling both going through the coordinator. Runs it with the
# (device_id, time) index and without; each run prints its table and a JSON
# line, and the last line is one JSON object with both.
# Needs Citus: bash ../shared/citus/build.sh (root, about 6 minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
export E2E_CITUS=${E2E_CITUS:-2}
export E2E_READINGS=${E2E_READINGS:-2000000}
export E2E_PACED_SECS=${E2E_PACED_SECS:-10}
cargo build --release -q --bin edge-gateway
export E2E_GATEWAY=${E2E_GATEWAY:-$PWD/target/release/edge-gateway}
out=$(mktemp)
trap 'rm -f "$out"' EXIT
run() {
  E2E_INDEX=$1 cargo bench -q --bench e2e > "$out"
  cat "$out" >&2
  tail -n 1 "$out"
}
with=$(run 1)
without=$(run 0)
echo "{\"citus_with_index\":$with,\"citus_without_index\":$without}"
