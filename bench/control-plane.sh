#!/usr/bin/env bash
# Control-plane benchmarks, measured in one run on loopback:
#  - propagation: 200 nodes on the config stream; time from an apply returning
#    to every node holding the change (p50, p99, max);
#  - apply throughput of single-resource changes through the REST API, on the
#    embedded store and on etcd, next to the raw store underneath as the anchor
#    (redb commits; etcd puts), with ratios.
# Needs etcd (Debian's etcd-server); installs it when missing.
# Usage: bench/control-plane.sh [NODES] [CHANGES] [COUNT]
set -euo pipefail
cd "$(dirname "$0")/.."
NODES=${1:-200}
CHANGES=${2:-50}
COUNT=${3:-500}

if ! command -v etcd >/dev/null 2>&1; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq etcd-server >/dev/null
fi
cargo build --release --locked -p atoll-cli -p atoll-bench 2>&1 | tail -1
BIN=$PWD/target/release
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_ready() {
  for _ in $(seq 1 300); do
    if curl -fsS "$1" >/dev/null 2>&1; then return 0; fi
    sleep 0.05
  done
  echo "not ready: $1" >&2; exit 1
}
start_control() { # $1 = label, rest = store flags
  local label=$1; shift
  local port; port=$(free_port)
  "$BIN/atoll" control --no-discovery --listen "127.0.0.1:$port" "$@" >"$work/control-$label.log" 2>&1 &
  pids+=($!)
  CONTROL="http://127.0.0.1:$port"
  wait_ready "$CONTROL/readyz"
}
stop_control() { kill "${pids[-1]}"; wait "${pids[-1]}" 2>/dev/null || true; unset 'pids[-1]'; }

etcd_client=$(free_port); etcd_peer=$(free_port)
etcd --name bench --data-dir "$work/etcd" \
  --listen-client-urls "http://127.0.0.1:$etcd_client" --advertise-client-urls "http://127.0.0.1:$etcd_client" \
  --listen-peer-urls "http://127.0.0.1:$etcd_peer" --initial-advertise-peer-urls "http://127.0.0.1:$etcd_peer" \
  --initial-cluster "bench=http://127.0.0.1:$etcd_peer" --max-txn-ops 10000 --log-level error --logger zap \
  >"$work/etcd.log" 2>&1 &
pids+=($!)
ETCD="http://127.0.0.1:$etcd_client"
wait_ready "$ETCD/health"

results="$work/results"
echo "== machine: $(nproc) cores, $(uname -r); etcd $(etcd --version | head -1 | awk '{print $3}')"

echo "== propagation: $NODES nodes, $CHANGES changes (embedded store)"
start_control propagation --data-dir "$work/propagation"
"$BIN/propagation" --preload examples/topology --control "$CONTROL" --nodes "$NODES" --changes "$CHANGES" | tee -a "$results"
stop_control

for concurrency in 1 8; do
  echo "== apply throughput, concurrency $concurrency: embedded"
  start_control embedded-$concurrency --data-dir "$work/embedded-$concurrency"
  "$BIN/apply-throughput" api --preload examples/topology --control "$CONTROL" --count "$COUNT" --concurrency "$concurrency" | sed 's/^RESULT api/RESULT api-embedded/' | tee -a "$results"
  stop_control
  "$BIN/apply-throughput" embedded --count "$COUNT" --concurrency "$concurrency" | tee -a "$results"

  echo "== apply throughput, concurrency $concurrency: etcd"
  start_control etcd-$concurrency --store etcd --etcd-endpoints "$ETCD" --etcd-prefix "/atoll-$concurrency/"
  "$BIN/apply-throughput" api --preload examples/topology --control "$CONTROL" --count "$COUNT" --concurrency "$concurrency" | sed 's/^RESULT api/RESULT api-etcd/' | tee -a "$results"
  stop_control
  "$BIN/apply-throughput" etcd --endpoint "$ETCD" --count "$COUNT" --concurrency "$concurrency" | tee -a "$results"
done

echo "== ratios (Atoll apply / raw store, same concurrency)"
awk '
  /^RESULT (api-embedded|raw-embedded|api-etcd|raw-etcd)/ {
    split($3, c, "="); split($4, r, "="); rate[$2 "/" c[2]] = r[2]
  }
  END {
    for (conc = 1; conc <= 8; conc += 7) {
      printf "concurrency %d: embedded %.2fx (%s vs %s/s), etcd %.2fx (%s vs %s/s)\n", conc,
        rate["api-embedded/" conc] / rate["raw-embedded/" conc], rate["api-embedded/" conc], rate["raw-embedded/" conc],
        rate["api-etcd/" conc] / rate["raw-etcd/" conc], rate["api-etcd/" conc], rate["raw-etcd/" conc]
    }
  }' "$results"
