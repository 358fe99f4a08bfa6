#!/usr/bin/env bash
# Checks the deploy files with what this machine has: systemd-analyze for the
# unit, promtool for the alert rules, JSON and YAML parsers for the
# dashboard, compose and provisioning files; and that every metric they name
# is one the gateway exports. Exits non-zero on the first failure.
set -euo pipefail
cd "$(dirname "$0")"

metrics_rs=../src/telemetry/metrics.rs

echo "deploy: systemd unit"
# verify needs the ExecStart binaries to exist; check against a stand-in.
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
sed "s|/usr/local/bin/edge-gateway|$tmp/edge-gateway|g" edge-gateway.service > "$tmp/edge-gateway.service"
printf '#!/bin/sh\nexit 0\n' > "$tmp/edge-gateway"
chmod +x "$tmp/edge-gateway"
out=$(systemd-analyze verify "$tmp/edge-gateway.service" 2>&1 || true)
# Missing network targets are fine in a build container; anything else is not.
if echo "$out" | grep -v -E "network-online.target|^$" | grep -q .; then
  echo "$out" >&2
  exit 1
fi

echo "deploy: prometheus rules"
if command -v promtool >/dev/null 2>&1; then
  promtool check rules prometheus/alerts.yml
  promtool check config prometheus/prometheus.yml >/dev/null 2>&1 || promtool check config --syntax-only prometheus/prometheus.yml
else
  echo "promtool not found: install it (Debian: apt-get install prometheus)" >&2
  exit 1
fi

echo "deploy: dashboard, compose, provisioning"
python3 - "$metrics_rs" <<'PY'
import json, re, sys, yaml
exported = set(re.findall(r'edge_gateway_[a-z0-9_]+', open(sys.argv[1]).read()))
# Histograms export _bucket, _sum and _count series.
for name in list(exported):
    exported |= {name + "_bucket", name + "_sum", name + "_count"}
def referenced(text):
    return set(re.findall(r'edge_gateway_[a-z0-9_]+', text))
dash = json.load(open("grafana/dashboards/edge-gateway.json"))
assert dash["panels"], "dashboard has panels"
exprs = " ".join(t["expr"] for p in dash["panels"] for t in p["targets"])
rules = open("prometheus/alerts.yml").read()
yaml.safe_load(rules)
unknown = (referenced(exprs) | referenced(rules)) - exported
assert not unknown, f"metrics not exported by the gateway: {sorted(unknown)}"
compose = yaml.safe_load(open("compose.yaml"))
services = compose["services"]
for name in ["postgres", "mosquitto", "gateway", "firmware-sim", "prometheus", "grafana"]:
    assert name in services, f"compose lacks {name}"
for svc in services.values():
    for vol in svc.get("volumes", []):
        src = vol.split(":")[0]
        if src.startswith("./"):
            import os
            assert os.path.exists(src), f"compose mounts missing {src}"
for f in ["grafana/provisioning/datasources/prometheus.yml", "grafana/provisioning/dashboards/edge-gateway.yml", "prometheus/prometheus.yml"]:
    yaml.safe_load(open(f))
print("deploy: ok")
PY
