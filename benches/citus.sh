#!/usr/bin/env bash
# The end-to-end benchmark (benches/e2e.rs) against a Citus cluster: a
# coordinator and E2E_CITUS workers (2), all on this host, the gateway and
# the raw COPY ceiling both going through the coordinator. Runs it with the
# (device_id, time) index and without; each run prints its table and a JSON
# line, and the last line is one JSON object with both.
# CITUS_SHARDS (4) sets the shard count. Needs Citus:
# bash ../shared/citus/build.sh (root, about 6 minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
export E2E_CITUS=${E2E_CITUS:-2}
export E2E_READINGS=${E2E_READINGS:-2000000}
export E2E_PACED_SECS=${E2E_PACED_SECS:-10}
# Shards per distributed table (database.citus_shard_count): Citus's default
# of 32 loads about 100,000 readings/s on a 2-core host, 4 about 5x that.
shards=${CITUS_SHARDS:-4}
export E2E_GATEWAY_TOML="${E2E_GATEWAY_TOML:-[database]
citus_shard_count = $shards}"
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
