#!/usr/bin/env bash
# East-west benchmarks (issue 12), measured in one run on loopback:
#  - registry push: SUBSCRIBERS (1000) watchers of one service, each on its
#    own HTTP/2 connection, the service holding INSTANCES (10,000) instances;
#    CHANGES (50) times one instance is registered, and every watcher's time
#    to hold it is recorded from the registration sent (p50, p99, max; goal
#    p99 under 100 ms); bytes each change cost one subscriber next to one
#    instance's encoded size (the anchor: a delta must cost one instance,
#    not the service); the control plane's RSS with all of it.
#  - sidecar hop: an open-loop load of RATE (1000) requests a second for
#    SECONDS (10) over keep-alive connections, latency from each request's
#    due time, with nginx as the app: direct; through haproxy (the anchor:
#    one proxy hop, nbthread 1); through the provider's sidecar (one hop,
#    with the inbound re-check); through the caller's and the provider's
#    sidecars (two hops, routed by the user's shard). Added per hop = p99
#    through it - p99 direct (goal: under 0.25 ms). CPU per request of the
#    sidecar and of haproxy, from /proc.
#  - sidecar RSS at rest and with 10,000 endpoints of a service it calls
#    (goal: under 20 MB).
# Usage: bench/mesh.sh [SUBSCRIBERS] [INSTANCES] [CHANGES] [RATE] [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
SUBSCRIBERS=${1:-1000}
INSTANCES=${2:-10000}
CHANGES=${3:-50}
RATE=${4:-1000}
SECONDS_RUN=${5:-10}

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

# ---------------------------------------------------------------- sidecar hop
# On a control plane of its own: the first one still sends the push
# benchmark's sessions away for a while, and that would be measured too.
kill "$control_pid" 2>/dev/null || true
wait "$control_pid" 2>/dev/null || true
port=$(free_port)
"$BIN/atoll" control --insecure --no-discovery --listen "127.0.0.1:$port" --data-dir "$work/control2" >"$work/control2.log" 2>&1 &
control_pid=$!
pids+=($control_pid)
CONTROL="http://127.0.0.1:$port"
for _ in $(seq 1 300); do curl -fsS "$CONTROL/readyz" >/dev/null 2>&1 && break; sleep 0.05; done
"$BIN/atoll" --control "$CONTROL" apply -f examples/topology >/dev/null
ROUNDS=${ROUNDS:-3}
command -v nginx >/dev/null 2>&1 || [[ -x /usr/sbin/nginx ]] || { echo "nginx is needed (apt-get install nginx-light)"; exit 1; }
command -v haproxy >/dev/null 2>&1 || [[ -x /usr/sbin/haproxy ]] || { echo "haproxy is needed (apt-get install haproxy)"; exit 1; }
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
HAPROXY=$(command -v haproxy || echo /usr/sbin/haproxy)
cat >"$work/apps.yaml" <<'APPS'
apiVersion: atoll/v1
kind: App
metadata: {name: bank}
spec: {service: bank, cells: [rz01], replicas: 1, command: [bank]}
---
apiVersion: atoll/v1
kind: App
metadata: {name: web}
spec: {service: web, cells: [rz01], replicas: 1, command: [web]}
APPS
"$BIN/atoll" --control "$CONTROL" apply -f "$work/apps.yaml" >/dev/null
APP_PORT=$(free_port)
mkdir -p "$work/nginx"
cat >"$work/nginx/nginx.conf" <<NGINX
worker_processes 1;
daemon off;
pid $work/nginx/nginx.pid;
error_log $work/nginx/error.log;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  server { listen 127.0.0.1:$APP_PORT; location / { return 200 "ok\n"; } }
}
NGINX
"$NGINX" -c "$work/nginx/nginx.conf" -p "$work/nginx" &
pids+=($!)
HAPROXY_PORT=$(free_port)
cat >"$work/haproxy.cfg" <<HAPROXY
global
  nbthread 1
defaults
  mode http
  option http-keep-alive
  http-reuse always
  timeout connect 5s
  timeout client 60s
  timeout server 60s
frontend f
  bind 127.0.0.1:$HAPROXY_PORT
  default_backend b
backend b
  server s1 127.0.0.1:$APP_PORT
HAPROXY
"$HAPROXY" -db -f "$work/haproxy.cfg" >"$work/haproxy.log" 2>&1 &
haproxy_pid=$!
pids+=($haproxy_pid)
sidecar() { # instance service cell inbound outbound admin
  RUST_LOG=warn "$BIN/atoll" --control "$CONTROL" sidecar --instance "$1" --service "$2" --cell "$3" --zone hz-a \
    --app "127.0.0.1:$APP_PORT" --inbound "127.0.0.1:$4" --outbound "127.0.0.1:$5" --admin "127.0.0.1:$6" \
    >"$work/$1.log" 2>&1 &
  pids+=($!)
  echo $! >"$work/$1.pid"
}
P_IN=$(free_port); P_OUT=$(free_port); P_ADMIN=$(free_port)
C_IN=$(free_port); C_OUT=$(free_port); C_ADMIN=$(free_port)
sidecar bank-rz01-0 bank rz01 "$P_IN" "$P_OUT" "$P_ADMIN"
sidecar web-rz01-0 web rz01 "$C_IN" "$C_OUT" "$C_ADMIN"
provider_pid=$(cat "$work/bank-rz01-0.pid"); caller_pid=$(cat "$work/web-rz01-0.pid")
for _ in $(seq 1 300); do
  curl -fsS "http://127.0.0.1:$P_ADMIN/healthz" >/dev/null 2>&1 && curl -fsS "http://127.0.0.1:$C_ADMIN/healthz" >/dev/null 2>&1 && break
  sleep 0.05
done
for _ in $(seq 1 200); do
  curl -fsS -H 'Host: bank' -H 'x-user-id: 7' "http://127.0.0.1:$C_OUT/api/balance" >/dev/null 2>&1 && break
  sleep 0.05
done
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
TICK=$(getconf CLK_TCK)
run() { # label url pid-of-the-proxy-or-empty [headers...]
  local label=$1 url=$2 pid=$3; shift 3
  local before=0
  [ -n "$pid" ] && before=$(cpu_ticks "$pid")
  local args=()
  for h in "$@"; do args+=(--header "$h"); done
  "$BIN/mesh-hop" --url "$url" --rate "$RATE" --seconds "$SECONDS_RUN" --label "$label" "${args[@]}" | tee "$work/$label.out" | grep -v '^RESULT'
  if [ -n "$pid" ]; then
    local after; after=$(cpu_ticks "$pid")
    local ok; ok=$(sed -n 's/.* ok=\([0-9]*\).*/\1/p' "$work/$label.out")
    awk -v t=$((after - before)) -v hz="$TICK" -v n="$ok" -v l="$label" 'BEGIN { printf "%s: CPU %.1f µs per request (the proxy process)\n", l, (t / hz) * 1e6 / n }'
  fi
}
echo "== sidecar hop: $RATE requests/s for $SECONDS_RUN s, open loop, nginx as the app; $ROUNDS rounds, each target in turn"
for round in $(seq 1 "$ROUNDS"); do
  echo "-- round $round"
  run "direct-$round" "http://127.0.0.1:$APP_PORT/api/balance" ""
  run "haproxy-$round" "http://127.0.0.1:$HAPROXY_PORT/api/balance" "$haproxy_pid"
  run "one-sidecar-$round" "http://127.0.0.1:$P_IN/api/balance" "$provider_pid" "x-user-id:7"
  run "two-sidecars-$round" "http://127.0.0.1:$C_OUT/api/balance" "$caller_pid" "x-user-id:7"
done
# The median over the rounds of each figure.
median() { # target field
  for round in $(seq 1 "$ROUNDS"); do sed -n "s/.* $2=\([0-9]*\).*/\1/p" "$work/$1-$round.out"; done | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'
}
echo "median of $ROUNDS rounds (µs):"
for target in direct haproxy one-sidecar two-sidecars; do
  printf "  %-13s p50 %6s  p90 %6s  p99 %6s  p99.9 %6s\n" "$target" "$(median $target p50_us)" "$(median $target p90_us)" "$(median $target p99_us)" "$(median $target p999_us)"
done
awk -v d50="$(median direct p50_us)" -v d="$(median direct p99_us)" -v h50="$(median haproxy p50_us)" -v h="$(median haproxy p99_us)" \
    -v s50="$(median one-sidecar p50_us)" -v s="$(median one-sidecar p99_us)" -v t50="$(median two-sidecars p50_us)" -v t="$(median two-sidecars p99_us)" 'BEGIN {
  printf "added per hop (medians), p50 / p99: haproxy %.3f / %.3f ms; sidecar (inbound, re-check) %.3f / %.3f ms; two sidecars %.3f / %.3f ms, so %.3f / %.3f ms per hop; goal p99 < 0.25 ms per hop\n",
    (h50-d50)/1000, (h-d)/1000, (s50-d50)/1000, (s-d)/1000, (t50-d50)/1000, (t-d)/1000, (t50-d50)/2000, (t-d)/2000
}'

echo "== sidecar RSS"
rss() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }
echo "caller sidecar at rest (knows 1 service): $(( $(rss "$caller_pid") / 1024 )) MB"
"$BIN/mesh-hop" --register 10000 --control "$CONTROL" --service web >"$work/register.log" 2>&1 &
reg_pid=$!
pids+=($reg_pid)
for _ in $(seq 1 600); do grep -q registered "$work/register.log" && break; sleep 0.1; done
# The caller's first call to `web` makes it watch the service: 10,001
# instances in its cell (their addresses are not reachable: the call fails).
curl -s -m 3 -H 'Host: web' "http://127.0.0.1:$C_OUT/" >/dev/null 2>&1 || true
known=0
for _ in $(seq 1 100); do
  known=$(curl -fsS "http://127.0.0.1:$C_ADMIN/metrics" | sed -n 's/^atoll_sidecar_endpoints \([0-9]*\).*/\1/p')
  [ "${known:-0}" -ge 10000 ] && break
  sleep 0.1
done
sleep 1
echo "caller sidecar with $known endpoints known: $(( $(rss "$caller_pid") / 1024 )) MB (goal: under 20 MB; linkerd2-proxy publishes 26 MB)"
