#!/usr/bin/env bash
# End-to-end load benchmark: throwaway PostgreSQL and mosquitto, the release
# gateway with analytics on, packed publishes as fast as the broker accepts,
# then at half that rate; compared with raw binary COPY of the same rows.
# Prints a table and, last, one JSON line. Settings (E2E_READINGS,
# E2E_DEVICES, E2E_PACK, E2E_INDEX, E2E_SOAK_SECS, ...): see benches/e2e.rs.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q --bin edge-gateway
export E2E_GATEWAY=${E2E_GATEWAY:-$PWD/target/release/edge-gateway}
exec cargo bench -q --bench e2e
