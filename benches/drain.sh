#!/usr/bin/env bash
# Drain and live throughput on every payload format, with and without the
# (device_id, time) index: for each, `benches/e2e.rs` queues the load in
# mosquitto while the gateway is stopped, starts it and times the drain
# from process start to its last commit (against one raw binary COPY of the
# same rows, and with the CPU split gateway / database / broker), then
# publishes live (burst, then paced at half that rate for p50/p99).
# Prints one line per run, a table, and last one JSON line with every run.
#
# Then the no-index drain of SenML CBOR and native CBOR again with the
# analytics off (DRAIN_NO_ANALYTICS=0 skips it): the pipeline alone, and by
# difference the analytics' CPU per reading. Last, the same SenML CBOR
# backlog drained by a plain Python consumer (benches/peers/consumer.py;
# DRAIN_PEER=0 skips it), the baseline.
#
# Settings: DRAIN_FORMATS (senml-cbor senml-json native-cbor), DRAIN_INDEX
# (1 0), DRAIN_NO_ANALYTICS (1), DRAIN_PEER (1), and the E2E_* variables of
# benches/e2e.rs; defaults here: 5,000,000
# readings from 50 devices, 100 readings a message (50 samples x 2 metrics),
# 10 s paced.
set -euo pipefail
cd "$(dirname "$0")/.."
export E2E_READINGS=${E2E_READINGS:-5000000}
export E2E_DEVICES=${E2E_DEVICES:-50}
export E2E_PACK=${E2E_PACK:-50}
export E2E_METRICS=${E2E_METRICS:-2}
export E2E_PACED_SECS=${E2E_PACED_SECS:-10}
export E2E_DRAIN=1
cargo build --release -q --bin edge-gateway
cargo bench --no-run -q --bench e2e 2>/dev/null
export E2E_GATEWAY=${E2E_GATEWAY:-$PWD/target/release/edge-gateway}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
runs=0
# One run of benches/e2e.rs with the settings given (VAR=value ...): "$1"
# names it, its JSON line goes to $out/"$2".jsonl; a failed run prints the
# end of its log and stops the script.
e2e() {
  local what=$1 into=$2 log="$out/run-$((runs += 1)).log"
  shift 2
  echo "drain: $what ..." >&2
  env "$@" cargo bench -q --bench e2e 2>"$log" | tail -1 >>"$out/$into.jsonl" || {
    echo "drain: $what failed; its log:" >&2
    tail -20 "$log" >&2
    exit 1
  }
}
for format in ${DRAIN_FORMATS:-senml-cbor senml-json native-cbor}; do
  for index in ${DRAIN_INDEX:-1 0}; do
    e2e "$format, index $index" runs E2E_FORMAT="$format" E2E_INDEX="$index"
  done
done
# The pipeline alone: the no-index drain of both CBOR formats with the
# analytics off, which shows what the analytics cost per reading.
if [ "${DRAIN_NO_ANALYTICS:-1}" != 0 ]; then
  for format in senml-cbor native-cbor; do
    e2e "$format, index 0, analytics off" plain \
      E2E_GATEWAY_TOML="${E2E_GATEWAY_TOML:-}"$'\n[analytics]\nenabled = false' \
      E2E_LIVE=0 E2E_FORMAT="$format" E2E_INDEX=0
  done
fi
# The baseline: a plain Python consumer on the same SenML CBOR backlog.
if [ "${DRAIN_PEER:-1}" != 0 ]; then
  python3 -c "import paho.mqtt, cbor2, psycopg" 2>/dev/null || {
    echo "drain: the peer consumer needs paho-mqtt, cbor2 and psycopg: python3 -m pip install paho-mqtt cbor2 'psycopg[binary]' (or DRAIN_PEER=0)" >&2
    exit 1
  }
  for index in ${DRAIN_INDEX:-1 0}; do
    e2e "peer consumer, senml-cbor, index $index" peers \
      E2E_PEER="python3 $PWD/benches/peers/consumer.py" E2E_LIVE=0 \
      E2E_FORMAT=senml-cbor E2E_INDEX="$index"
  done
fi
touch "$out/runs.jsonl" "$out/plain.jsonl" "$out/peers.jsonl"
python3 - "$out/runs.jsonl" "$out/peers.jsonl" "$out/plain.jsonl" <<'EOF'
import json, sys
runs = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
plain = [json.loads(l) for l in open(sys.argv[3]) if l.strip()]
# db: the server's whole process tree; be: only the backends serving the
# gateway (or the raw COPY), without autovacuum and the checkpointer.
head = ("format", "index", "drain r/s", "1 COPY r/s", "ratio", "gw us", "db us",
        "COPY db us", "db/COPY", "be us", "COPY be us", "be/COPY", "mq us", "RSS MiB",
        "live r/s", "p99 ms")
print("  ".join(f"{h:>11}" for h in head))
for r in runs:
    db = r["drain_db_cpu_us"] / max(r["single_copy_db_cpu_us"], 1e-9)
    be = r["drain_db_backends_cpu_us"] / max(r["single_copy_backend_cpu_us"], 1e-9)
    row = (r["format"], r["indexes"], r["drain_readings_per_s"], r["single_copy_readings_per_s"],
           r["drain_ratio"], r["drain_gateway_cpu_us"], r["drain_db_cpu_us"],
           r["single_copy_db_cpu_us"], round(db, 2), r["drain_db_backends_cpu_us"],
           r["single_copy_backend_cpu_us"], round(be, 2), r["drain_broker_cpu_us"],
           r["drain_peak_rss_mb"], r["readings_per_s"], r["p99_ms"])
    print("  ".join(f"{str(v):>11}" for v in row))
for p in plain:
    on = next((r for r in runs if r["format"] == p["format"] and r["indexes"] == 0), None)
    cost = round(on["drain_gateway_cpu_us"] - p["drain_gateway_cpu_us"], 3) if on else None
    p["analytics_cpu_us"] = cost
    print(f"analytics off, {p['format']}, index 0: {p['drain_readings_per_s']:.0f} readings/s "
          f"(ratio {p['drain_ratio']}), gateway {p['drain_gateway_cpu_us']} us/reading, "
          f"database {p['drain_db_cpu_us']} us/reading; the analytics cost {cost} us/reading")
peers = [json.loads(l) for l in open(sys.argv[2]) if l.strip()]
for p in peers:
    gw = next((r for r in runs if r["format"] == p["format"] and r["indexes"] == p["indexes"]), None)
    times = gw["drain_readings_per_s"] / p["drain_readings_per_s"] if gw else None
    p["gateway_over_peer"] = round(times, 2) if times else None
    print(f"peer consumer, {p['format']}, index {p['indexes']}: {p['drain_readings_per_s']:.0f} readings/s "
          f"(ratio to one raw COPY {p['drain_ratio']}, peer CPU {p['drain_peer_cpu_us']} us/reading, "
          f"database {p['drain_db_cpu_us']} us/reading); the gateway drains {times and round(times, 2)}x as fast")
print(json.dumps({"runs": runs, "without_analytics": plain, "peers": peers}))
EOF
