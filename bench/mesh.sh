#!/usr/bin/env bash
# East-west benchmarks (issue 12), measured in one run on loopback:
#  - registry push: SUBSCRIBERS (1000) watchers of one service, each on its
#    own HTTP/2 connection, the service holding INSTANCES (10,000) instances;
#    CHANGES (50) times one instance is registered, and every watcher's time
#    to hold it is recorded from the registration sent (p50, p99, max; goal
#    p99 under 100 ms); bytes each change cost one subscriber next to one
#    instance's encoded size (the anchor: a delta must cost one instance,
#    not the service); the control plane's RSS with all of it.
# The sidecar hop latency, CPU and RSS against a direct call and haproxy
# come with the sidecar (docs/design/east-west.md).
# Usage: bench/mesh.sh [SUBSCRIBERS] [INSTANCES] [CHANGES]
set -euo pipefail
cd "$(dirname "$0")/.."
SUBSCRIBERS=${1:-1000}
INSTANCES=${2:-10000}
CHANGES=${3:-50}

cargo build --release --locked -p atoll-cli -p atoll-bench 2>&1 | tail -1
BIN=$PWD/target/release
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
# 1000 subscribers hold 1000 connections, the control plane as many.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
port=$(free_port)
"$BIN/atoll" control --insecure --no-discovery --listen "127.0.0.1:$port" --data-dir "$work/control" >"$work/control.log" 2>&1 &
control_pid=$!
pids+=($control_pid)
CONTROL="http://127.0.0.1:$port"
for _ in $(seq 1 300); do curl -fsS "$CONTROL/readyz" >/dev/null 2>&1 && break; sleep 0.05; done
"$BIN/atoll" --control "$CONTROL" apply -f examples/topology >/dev/null

echo "== machine: $(nproc) cores, $(uname -r)"
echo "== registry push: $SUBSCRIBERS subscribers, $INSTANCES instances, $CHANGES changes (embedded keyspace)"
"$BIN/registry-push" --control "$CONTROL" --subscribers "$SUBSCRIBERS" --instances "$INSTANCES" --changes "$CHANGES" &
bench_pid=$!
rss_max=0
while kill -0 "$bench_pid" 2>/dev/null; do
  rss=$(awk '/VmRSS/ {print $2}' "/proc/$control_pid/status" 2>/dev/null || echo 0)
  [ "${rss:-0}" -gt "$rss_max" ] && rss_max=$rss
  sleep 0.2
done
wait "$bench_pid"
echo "control plane RSS, peak while serving them: $((rss_max / 1024)) MB"
curl -fsS "$CONTROL/metrics" | grep -E '^atoll_control_registry_(update_bytes_sent_total|updates_sent_total|instances) '
