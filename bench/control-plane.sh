#!/usr/bin/env bash
# Control-plane benchmarks, measured in one run on loopback:
#  - propagation: 200 nodes on the config stream; time from an apply returning
#    to every node holding the change (p50, p99, max); then the same over
#    mutual TLS (a control plane serving TLS with Atoll's CA, a certificate per
#    node, applies with the admin token), with the ratio to the plain run;
#  - replicated: 3 etcd members and 3 control-plane replicas: propagation to
#    the nodes spread over the replicas, and leader failover (SIGKILL of the
#    leader to a new leader committing a change), over KILLS (10) kills;
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
  "$BIN/atoll" control --insecure --no-discovery --listen "127.0.0.1:$port" "$@" >"$work/control-$label.log" 2>&1 &
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

echo "== propagation over mutual TLS: $NODES nodes, each with its own certificate, $CHANGES changes (embedded store)"
ca="$work/ca"
"$BIN/atoll" ca init --dir "$ca" >/dev/null
"$BIN/atoll" ca issue --dir "$ca" --id atoll://default/control/-/bench --host 127.0.0.1 --out "$ca/control" >/dev/null
tls_port=$(free_port)
"$BIN/atoll" --ca "$ca/root.pem" --cert "$ca/control.pem" --key "$ca/control.key" control --no-discovery \
  --listen "127.0.0.1:$tls_port" --data-dir "$work/propagation-tls" --admin-token-file "$work/admin.token" >"$work/control-tls.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 300); do
  curl -fsS --cacert "$ca/root.pem" "https://127.0.0.1:$tls_port/readyz" >/dev/null 2>&1 && break
  sleep 0.05
done
curl -fsS --cacert "$ca/root.pem" "https://127.0.0.1:$tls_port/readyz" >/dev/null ||
  { echo "the TLS control plane did not become ready:" >&2; tail -5 "$work/control-tls.log" >&2; exit 1; }
"$BIN/propagation" --preload examples/topology --control "https://127.0.0.1:$tls_port" --ca-dir "$ca" --token-file "$work/admin.token" \
  --nodes "$NODES" --changes "$CHANGES" | sed 's/^RESULT propagation/RESULT propagation-mtls/' | tee -a "$results"
stop_control
awk '/^RESULT propagation(-mtls)? / { for (i = 3; i <= NF; i++) { split($i, kv, "="); v[$2 "/" kv[1]] = kv[2] } }
  function ratio(a, b) { return b + 0 == 0 ? "n/a" : sprintf("%.2fx", a / b) }
  END { printf "propagation mtls/plain: p50 %s (%s vs %s ms), p99 %s (%s vs %s ms)\n",
    ratio(v["propagation-mtls/p50_ms"], v["propagation/p50_ms"]), v["propagation-mtls/p50_ms"], v["propagation/p50_ms"],
    ratio(v["propagation-mtls/p99_ms"], v["propagation/p99_ms"]), v["propagation-mtls/p99_ms"], v["propagation/p99_ms"] }' "$results"

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

echo "== replicated: 3 etcd members, 3 control-plane replicas (--election-ttl 2s)"
peers=(); clients=(); cluster=""
for i in 1 2 3; do clients+=("$(free_port)"); peers+=("$(free_port)"); done
for i in 0 1 2; do cluster+="${cluster:+,}ha$i=http://127.0.0.1:${peers[$i]}"; done
for i in 0 1 2; do
  etcd --name "ha$i" --data-dir "$work/etcd-ha$i" \
    --listen-client-urls "http://127.0.0.1:${clients[$i]}" --advertise-client-urls "http://127.0.0.1:${clients[$i]}" \
    --listen-peer-urls "http://127.0.0.1:${peers[$i]}" --initial-advertise-peer-urls "http://127.0.0.1:${peers[$i]}" \
    --initial-cluster "$cluster" --initial-cluster-token "atoll-bench-$$" --log-level error --logger zap \
    >"$work/etcd-ha$i.log" 2>&1 &
  pids+=($!)
done
HA_ETCD=$(printf 'http://127.0.0.1:%s,' "${clients[@]}"); HA_ETCD=${HA_ETCD%,}
for i in 0 1 2; do wait_ready "http://127.0.0.1:${clients[$i]}/health"; done
ports=(); replica_pid=()
start_replica() { # $1 = index
  "$BIN/atoll" control --insecure --no-discovery --listen "127.0.0.1:${ports[$1]}" --store etcd --etcd-endpoints "$HA_ETCD" \
    --etcd-prefix /atoll-ha/ --election-ttl 2s --data-dir "$work/ha-$1" >>"$work/replica-$1.log" 2>&1 &
  replica_pid[$1]=$!
  wait_ready "http://127.0.0.1:${ports[$1]}/readyz"
}
for i in 0 1 2; do ports+=("$(free_port)"); done
for i in 0 1 2; do start_replica "$i"; done
REPLICAS="http://127.0.0.1:${ports[0]},http://127.0.0.1:${ports[1]},http://127.0.0.1:${ports[2]}"
echo "-- propagation: $NODES nodes spread over the 3 replicas, applies through replica 1"
"$BIN/propagation" --preload examples/topology --control "http://127.0.0.1:${ports[0]}" --spread "$REPLICAS" \
  --nodes "$NODES" --changes "$CHANGES" | sed 's/^RESULT propagation/RESULT propagation-replicated/' | tee -a "$results"
KILLS=${KILLS:-10}
echo "-- leader failover: $KILLS kills of the leader (SIGKILL), time to a new leader committing a change"
failovers="$work/failovers"
for k in $(seq 1 "$KILLS"); do
  leader=$(curl -fsS "http://127.0.0.1:${ports[0]}/v1/leader" | python3 -c 'import json,sys; print(json.load(sys.stdin)["leader"])')
  for i in 0 1 2; do [ "http://127.0.0.1:${ports[$i]}" = "$leader" ] && victim=$i; done
  other=$(( (victim + 1) % 3 ))
  t0=$(date +%s%N)
  kill -9 "${replica_pid[$victim]}"; wait "${replica_pid[$victim]}" 2>/dev/null || true
  body="{\"manifests\":[{\"source\":\"bench\",\"content\":\"apiVersion: atoll/v1\\nkind: Region\\nmetadata: {name: failover-$k}\\n\"}]}"
  until curl -fsS -m 2 -o /dev/null -X POST -H 'content-type: application/json' -d "$body" "http://127.0.0.1:${ports[$other]}/v1/apply"; do sleep 0.01; done
  t1=$(date +%s%N)
  echo $(( (t1 - t0) / 1000000 )) | tee -a "$failovers" | sed "s/^/kill $k: new leader committing after /; s/$/ ms/"
  start_replica "$victim"
done
sort -n "$failovers" | awk '{ v[NR] = $1 } END {
  p50 = v[int((NR + 1) * 0.50)]; p99 = v[NR]; if (int(NR * 0.99) >= 1 && NR >= 100) p99 = v[int(NR * 0.99)];
  printf "leader failover over %d kills: p50 %d ms, p99 %d ms (max), min %d ms\n", NR, p50, p99, v[1]
  printf "RESULT leader-failover kills=%d p50_ms=%d p99_ms=%d\n", NR, p50, p99 }' | tee -a "$results"
for i in 0 1 2; do kill "${replica_pid[$i]}" 2>/dev/null || true; done

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
