#!/usr/bin/env bash
# Gateway benchmark, measured in one run on loopback, every target against the
# same backend and with the same load:
#  1. the backend direct (nginx, 1 worker, `return 200 "ok\n"`);
#  2. nginx as a plain reverse proxy (1 worker, upstream keepalive, no access log);
#  3. haproxy as a plain reverse proxy (nbthread 1, http-reuse always, no logging);
#  4. `atoll gateway --workers 1` with unit routing: a 10,000-shard map over 100
#     cells, key in the `x-user-id` header, one endpoint per cell
#     (127.0.1.1 ... 127.0.1.100, same port: all the same backend).
# HTTP/1.1 with wrk (-t1 -c64), HTTP/2 cleartext with prior knowledge (h2c) with
# h2load (-c16 -m8). Prints req/s, p50 and p99 per target, the ratios of the
# gateway to haproxy and nginx, and a RESULT block.
#
# Usage: [DURATION=10] [ROUNDS=3] [BUILD=1] [WARMUP=1] [LOADGEN_CPU=0] [SERVER_CPU=1] [KEEP_WORK=0] bench/gateway.sh
#   DURATION     seconds of each measured run (integer)
#   ROUNDS       measure every target this many times, in turn (round robin, each
#                round starting one target later), and report the median of each
#                figure: on a shared machine, slow phases then hit every target alike
#                instead of whichever ran at the wrong time
#   BUILD=1      build target/release/atoll first (a failed build is reported and the
#                existing binary, if any, is used); BUILD=0 uses the binary as it is
#   WARMUP       seconds of an unmeasured run before each measured one (0: none)
#   LOADGEN_CPU  CPU for wrk/h2load; SERVER_CPU: CPU for the backend, the proxies, the
#                gateway (PIN=0 turns pinning off; it is off on machines with < 2 CPUs)
#   KEEP_WORK=1  keep the temporary directory (configs, logs, raw outputs)
# Installs Debian's nginx, haproxy, wrk and nghttp2-client when missing, without
# starting their services; runs the binaries directly with its own config files.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

DURATION=${DURATION:-10}
BUILD=${BUILD:-1}
WARMUP=${WARMUP:-1}
ROUNDS=${ROUNDS:-3}
PIN=${PIN:-1}
LOADGEN_CPU=${LOADGEN_CPU:-0}
SERVER_CPU=${SERVER_CPU:-1}
KEEP_WORK=${KEEP_WORK:-0}
ATOLL=${ATOLL_BIN:-$ROOT/target/release/atoll}
[[ $DURATION =~ ^[1-9][0-9]*$ ]] || { echo "DURATION must be a whole number of seconds, got '$DURATION'" >&2; exit 2; }
[[ $WARMUP =~ ^[0-9]+$ ]] || { echo "WARMUP must be a whole number of seconds, got '$WARMUP'" >&2; exit 2; }
[[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || { echo "ROUNDS must be a positive whole number, got '$ROUNDS'" >&2; exit 2; }
COMMAND_LINE="DURATION=$DURATION ROUNDS=$ROUNDS BUILD=$BUILD WARMUP=$WARMUP PIN=$PIN LOADGEN_CPU=$LOADGEN_CPU SERVER_CPU=$SERVER_CPU bench/gateway.sh"

WRK_ARGS=(-t1 -c64 "-d${DURATION}s" --latency)
H2_ARGS=(-t1 -c16 -m8 -D "$DURATION")
RUN_BOUND=$((DURATION + 60))  # hard bound of one load run, seconds
SHARDS=10000
CELLS=100
H2_USER_ID=4815162342001234   # h2load sends one fixed header set: shard 1234, cell c012

# --- processes, cleanup ------------------------------------------------------
work=$(mktemp -d /tmp/atoll-gateway-bench.XXXXXX)
pids=()
created_policy_rc=0
stop_pid() { # $1 = pid: TERM, wait up to 5 s, then KILL it and its children
  local pid=$1
  kill -TERM "$pid" 2>/dev/null || return 0
  for _ in $(seq 1 50); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$pid" 2>/dev/null; then
    pkill -KILL -P "$pid" 2>/dev/null || true
    kill -KILL "$pid" 2>/dev/null || true
  fi
  wait "$pid" 2>/dev/null || true
}
forget_pid() { # $1 = pid: drop it from the cleanup list
  local keep=() p
  for p in "${pids[@]}"; do [[ $p == "$1" ]] || keep+=("$p"); done
  pids=("${keep[@]}")
}
cleanup() {
  local i
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do stop_pid "${pids[i]}"; done
  if [[ $created_policy_rc == 1 ]]; then rm -f /usr/sbin/policy-rc.d; fi
  if [[ $KEEP_WORK == 1 ]]; then echo "(kept $work)" >&2; else rm -rf "$work"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# File descriptors: as many as the hard limit allows, up to 65536.
nofile=$(ulimit -Hn)
[[ $nofile == unlimited || $nofile -gt 65536 ]] && nofile=65536
ulimit -n "$nofile"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_url() { # $1 = url, $2 = seconds; returns 1 when not ready in time
  local deadline=$((SECONDS + $2))
  while ((SECONDS < deadline)); do
    if curl -fsS -m 2 -o /dev/null "$1" 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  return 1
}
owns_port() { # $1 = pid, $2 = port: the listening socket on 127.0.0.1:port is held by pid
  local listeners
  listeners=$(ss -Hltnp "src 127.0.0.1 and sport = :$2" 2>/dev/null) || return 1
  [[ $listeners == *"pid=$1,"* ]]
}
server_cmd=()
loadgen_cmd=()
if [[ $PIN == 1 ]] && (($(nproc) >= 2)) && command -v taskset >/dev/null; then
  server_cmd=(taskset -c "$SERVER_CPU")
  loadgen_cmd=(taskset -c "$LOADGEN_CPU")
  PINNING="load generator on CPU $LOADGEN_CPU; backend, proxies, control plane and gateway on CPU $SERVER_CPU (taskset)"
else
  PINNING="none"
fi

# --- tools ---------------------------------------------------------------------
missing=()
command -v nginx >/dev/null 2>&1 || [[ -x /usr/sbin/nginx ]] || missing+=(nginx)
command -v haproxy >/dev/null 2>&1 || [[ -x /usr/sbin/haproxy ]] || missing+=(haproxy)
command -v wrk >/dev/null 2>&1 || missing+=(wrk)
command -v h2load >/dev/null 2>&1 || missing+=(nghttp2-client)
if ((${#missing[@]})); then
  echo "== installing ${missing[*]} (services are not started)"
  # policy-rc.d exit 101 stops the packages' maintainer scripts from starting the
  # distro services (invoke-rc.d and deb-systemd-invoke both honour it).
  if [[ ! -e /usr/sbin/policy-rc.d ]]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
    created_policy_rc=1
  fi
  timeout 600 apt-get update -qq
  DEBIAN_FRONTEND=noninteractive timeout 900 apt-get install -y -qq --no-install-recommends "${missing[@]}" >"$work/apt.log" 2>&1 ||
    { tail -20 "$work/apt.log" >&2; exit 1; }
  if [[ $created_policy_rc == 1 ]]; then rm -f /usr/sbin/policy-rc.d; created_policy_rc=0; fi
fi
export PATH=$PATH:/usr/sbin:/sbin
NGINX=$(command -v nginx)
HAPROXY=$(command -v haproxy)
# Distro services (or anything else) busy on the same machine would skew every row;
# they are not ours to stop, so only say so.
others=$(pgrep -x 'nginx|haproxy' || true)
if [[ -n $others ]]; then
  echo "warning: nginx/haproxy processes not started by this script are running (pids: $(tr '\n' ' ' <<<"$others")); they are not measured, but they share the CPUs" >&2
fi

# --- atoll ---------------------------------------------------------------------
if [[ $BUILD == 1 ]] && command -v cargo >/dev/null 2>&1; then
  echo "== building atoll (cargo build --release --locked -p atoll-cli)"
  if ! timeout 3600 cargo build --release --locked -p atoll-cli >"$work/build.log" 2>&1; then
    echo "warning: the build failed; using the existing $ATOLL if there is one. Last lines:" >&2
    tail -15 "$work/build.log" >&2
  fi
fi
gateway_state="absent"
if [[ ! -x $ATOLL ]]; then
  gateway_state="not built yet"
elif ! timeout 10 "$ATOLL" gateway --help >/dev/null 2>&1; then
  gateway_state="not built yet"
else
  gateway_state="present"
fi

# --- machine -------------------------------------------------------------------
# Anything else busy on these CPUs (a build, a test suite) shows up as noise in every
# row: say so up front. The 1-minute load average, before any server of ours starts.
LOAD_BEFORE=$(cut -d' ' -f1 /proc/loadavg)
if awk -v l="$LOAD_BEFORE" 'BEGIN { exit !(l > 0.5) }'; then
  echo "warning: the machine is busy (load average $LOAD_BEFORE before the benchmark starts); expect noisy numbers" >&2
fi
pkg_version() { dpkg-query -W -f='${Version}' "$1" 2>/dev/null || echo "?"; }
NGINX_VERSION=$("$NGINX" -v 2>&1 | sed -n 's|.*nginx/\([0-9.]*\).*|\1|p')
MACHINE="$(nproc) CPUs ($(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)), kernel $(uname -r); nginx $(pkg_version nginx), haproxy $(pkg_version haproxy), wrk $(pkg_version wrk), h2load $(pkg_version nghttp2-client) (nghttp2-client); load average at start $LOAD_BEFORE"

# --- the wrk request script ----------------------------------------------------
# 1000 pre-built requests with random 16-digit user ids (fixed seed: every target
# gets exactly the same requests), cycled through; done() prints exact numbers
# from the same latency histogram that --latency prints.
cat >"$work/requests.lua" <<'EOF'
local requests = {}
local count = 1000
local next_index = 0

function init(args)
  math.randomseed(20261126)
  for i = 1, count do
    local digits = { tostring(math.random(1, 9)) }
    for d = 2, 16 do digits[d] = tostring(math.random(0, 9)) end
    -- "low": shards 0-4999 only, "high": 5000-9999 (the forwarding targets)
    if args[1] == "low" then digits[13] = tostring(tonumber(digits[13]) % 5) end
    if args[1] == "high" then digits[13] = tostring(tonumber(digits[13]) % 5 + 5) end
    requests[i] = wrk.format("GET", "/api/balance",
      { ["Host"] = "bank.example", ["x-user-id"] = table.concat(digits) })
  end
end

function request()
  next_index = next_index % count + 1
  return requests[next_index]
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "WRKRESULT requests=%d duration_us=%d p50_us=%d p99_us=%d status_errors=%d connect_errors=%d read_errors=%d write_errors=%d timeouts=%d\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.status, e.connect, e.read, e.write, e.timeout))
end
EOF

# --- nginx configs -------------------------------------------------------------
version_ge() { [[ "$(printf '%s\n%s\n' "$2" "$1" | sort -V | head -1)" == "$2" ]]; }
nginx_h2_listen() { # $1 = address:port -> the directives for an h2c (prior knowledge) listener
  if version_ge "$NGINX_VERSION" 1.25.1; then
    printf 'listen %s;\n    http2 on;\n' "$1"
  else
    printf 'listen %s http2;\n' "$1"
  fi
}
nginx_main() { # $1 = dir: the common top of an nginx config
  mkdir -p "$1/tmp"
  cat <<EOF
daemon off;
master_process on;
worker_processes 1;
worker_rlimit_nofile $nofile;
user root;
pid $1/nginx.pid;
error_log $1/error.log warn;
events { worker_connections $((nofile / 2)); }
http {
  access_log off;
  server_tokens off;
  default_type text/plain;
  keepalive_timeout 300s;
  keepalive_requests 100000000;
  client_body_temp_path $1/tmp/body;
  proxy_temp_path $1/tmp/proxy;
  fastcgi_temp_path $1/tmp/fastcgi;
  uwsgi_temp_path $1/tmp/uwsgi;
  scgi_temp_path $1/tmp/scgi;
EOF
}
start_nginx() { # $1 = dir (holds nginx.conf); sets STARTED_PID
  "${server_cmd[@]}" "$NGINX" -p "$1" -e "$1/error.log" -c "$1/nginx.conf" >"$1/stdout.log" 2>&1 &
  STARTED_PID=$!
  pids+=("$STARTED_PID")
}

BACKEND_PORT=$(free_port)
BACKEND_H2_PORT=$(free_port)
backend_dir=$work/backend
mkdir -p "$backend_dir"
{
  nginx_main "$backend_dir"
  echo "  server {"
  echo "    listen 127.0.0.1:$BACKEND_PORT;"
  for ((n = 1; n <= CELLS; n++)); do echo "    listen 127.0.1.$n:$BACKEND_PORT;"; done
  printf '%s\n' '    location / { return 200 "ok\n"; }'
  echo "  }"
  echo "  server {"
  echo "    $(nginx_h2_listen "127.0.0.1:$BACKEND_H2_PORT")"
  printf '%s\n' '    location / { return 200 "ok\n"; }'
  echo "  }"
  echo "}"
} >"$backend_dir/nginx.conf"

NGINX_PORT=$(free_port)
NGINX_H2_PORT=$(free_port)
nginx_dir=$work/nginx
mkdir -p "$nginx_dir"
nginx_proxy_location() {
  cat <<EOF
    location / {
      proxy_pass http://backend;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host \$http_host;
    }
EOF
}
{
  nginx_main "$nginx_dir"
  cat <<EOF
  upstream backend {
    server 127.0.0.1:$BACKEND_PORT;
    keepalive 64;
    keepalive_requests 100000000;
    keepalive_timeout 300s;
  }
  server {
    listen 127.0.0.1:$NGINX_PORT;
$(nginx_proxy_location)
  }
  server {
    $(nginx_h2_listen "127.0.0.1:$NGINX_H2_PORT")
$(nginx_proxy_location)
  }
}
EOF
} >"$nginx_dir/nginx.conf"

HAPROXY_PORT=$(free_port)
HAPROXY_H2_PORT=$(free_port)
haproxy_dir=$work/haproxy
mkdir -p "$haproxy_dir"
# No `log` line anywhere: haproxy logs nothing.
cat >"$haproxy_dir/haproxy.cfg" <<EOF
global
  nbthread 1
  maxconn $(((nofile - 1000) / 2))
  pidfile $haproxy_dir/haproxy.pid

defaults
  mode http
  option http-keep-alive
  http-reuse always
  timeout connect 5s
  timeout client 60s
  timeout server 60s
  timeout http-keep-alive 60s

frontend h1
  bind 127.0.0.1:$HAPROXY_PORT
  default_backend backend

frontend h2c
  bind 127.0.0.1:$HAPROXY_H2_PORT proto h2
  default_backend backend

backend backend
  server b1 127.0.0.1:$BACKEND_PORT
EOF

GATEWAY_PORT=$(free_port)
gen_topology() { # $1 = gateway port
  cat <<EOF
apiVersion: atoll/v1
kind: Region
metadata: {name: bench}
---
apiVersion: atoll/v1
kind: Zone
metadata: {name: bench-a}
spec: {region: bench}
EOF
  for ((c = 0; c < CELLS; c++)); do
    printf -- '---\napiVersion: atoll/v1\nkind: Cell\nmetadata: {name: c%03d}\nspec: {zone: bench-a, type: rzone}\n' "$c"
  done
  cat <<EOF
---
apiVersion: atoll/v1
kind: ShardRule
metadata: {name: users}
spec:
  shards: $SHARDS
  key:
    sources:
      - header: x-user-id
    transform: {decimalSuffix: 4}
---
apiVersion: atoll/v1
kind: ShardMap
metadata: {name: users}
spec:
  rule: users
  assignments:
EOF
  local per=$((SHARDS / CELLS))
  for ((c = 0; c < CELLS; c++)); do
    printf '    - {shards: "%d-%d", cell: c%03d}\n' $((c * per)) $((c * per + per - 1)) "$c"
  done
  cat <<EOF
---
apiVersion: atoll/v1
kind: Service
metadata: {name: bank}
spec:
  kind: unitized
  shardRule: users
  endpoints:
EOF
  for ((c = 0; c < CELLS; c++)); do
    printf '    - {cell: c%03d, address: "127.0.1.%d:%d"}\n' "$c" $((c + 1)) "$BACKEND_PORT"
  done
  cat <<EOF
---
apiVersion: atoll/v1
kind: Route
metadata: {name: bank}
spec:
  hosts: [bank.example]
  match: [{pathPrefix: /api/}]
  service: bank
---
apiVersion: atoll/v1
kind: Gateway
metadata: {name: gw-bench}
spec:
  zone: bench-a
  listeners: [{port: $1, protocol: http, address: 127.0.0.1}]
EOF
}
gen_topology "$GATEWAY_PORT" >"$work/topology.yaml"

# --- load runs -------------------------------------------------------------------
rows="$work/rows" # target, proto, round, rps, p50_ms, p99_ms, errors, note (tab-separated)
: >"$rows"
add_row() { printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$@" >>"$rows"; }

declare -A wrk_script_args # label -> the request script's argument (low, high)
run_wrk() { # $1 = target label, $2 = url, $3 = round
  local label=$1 url=$2 round=$3 out="$work/wrk-$1-$3.txt" extra=()
  if [[ -n ${wrk_script_args[$label]:-} ]]; then extra=(-- "${wrk_script_args[$label]}"); fi
  if ((WARMUP > 0)); then
    timeout -k 5 "$RUN_BOUND" "${loadgen_cmd[@]}" wrk -t1 -c64 "-d${WARMUP}s" -s "$work/requests.lua" "$url" "${extra[@]}" >/dev/null 2>&1 || true
  fi
  echo "  -- $label, HTTP/1.1, round $round/$ROUNDS"
  if ! timeout -k 5 "$RUN_BOUND" "${loadgen_cmd[@]}" wrk "${WRK_ARGS[@]}" -s "$work/requests.lua" "$url" "${extra[@]}" >"$out" 2>&1; then
    add_row "$label" http1.1 "$round" NA NA NA NA "wrk failed or timed out: $(tail -1 "$out")"
    return
  fi
  grep -v WRKRESULT "$out" | sed 's/^/    /' || true
  local r
  r=$(grep '^WRKRESULT' "$out") || { add_row "$label" http1.1 "$round" NA NA NA NA "no result from wrk"; return; }
  awk -v label="$label" -v round="$round" '{
      for (i = 2; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
      errors = v["status_errors"] + v["connect_errors"] + v["read_errors"] + v["write_errors"] + v["timeouts"]
      note = errors > 0 ? sprintf("errors: status %d connect %d read %d write %d timeout %d", v["status_errors"], v["connect_errors"], v["read_errors"], v["write_errors"], v["timeouts"]) : "-"
      printf "%s\thttp1.1\t%s\t%.0f\t%.3f\t%.3f\t%d\t%s\n", label, round, v["requests"] / v["duration_us"] * 1e6, v["p50_us"] / 1000, v["p99_us"] / 1000, errors, note
    }' <<<"$r" >>"$rows"
}

H2_HEADERS=(-H ':authority: bank.example' -H "x-user-id: $H2_USER_ID")
h2_probe() { # $1 = url: h2c with prior knowledge works there (20 requests answered 2xx)
  timeout 10 h2load -n 20 -c 1 -m 1 "${H2_HEADERS[@]}" "$1" >"$work/h2probe.txt" 2>&1 &&
    grep -q '^status codes: 20 2xx' "$work/h2probe.txt"
}
run_h2load() { # $1 = target label, $2 = url, $3 = round
  local label=$1 url=$2 round=$3 out="$work/h2load-$1-$3.txt" log="$work/h2load-$1-$3.log"
  if ((WARMUP > 0)); then
    timeout -k 5 "$RUN_BOUND" "${loadgen_cmd[@]}" h2load -t1 -c16 -m8 -D "$WARMUP" "${H2_HEADERS[@]}" "$url" >/dev/null 2>&1 || true
  fi
  echo "  -- $label, h2c, round $round/$ROUNDS"
  if ! timeout -k 5 "$RUN_BOUND" "${loadgen_cmd[@]}" h2load "${H2_ARGS[@]}" "${H2_HEADERS[@]}" --log-file="$log" "$url" >"$out" 2>&1; then
    add_row "$label" h2c "$round" NA NA NA NA "h2load failed or timed out: $(tail -1 "$out")"
    return
  fi
  grep -E '^(finished in|requests:|status codes:|time for request:)' "$out" | sed 's/^/    /' || true
  local rps completed failed not2xx p50 p99
  rps=$(sed -n 's/^finished in [^,]*, \([0-9.]*\) req\/s.*/\1/p' "$out")
  completed=$(sed -n 's/^requests: .* \([0-9]*\) done,.*/\1/p' "$out")
  failed=$(sed -n 's/^requests: .* \([0-9]*\) failed,.*/\1/p' "$out")
  not2xx=$(awk '/^status codes:/ { print $5 + $7 + $9 }' "$out")
  if [[ -z $completed || $completed == 0 || ! -s $log ]]; then
    add_row "$label" h2c "$round" NA NA NA NA "h2load completed no request"
    return
  fi
  # Column 3 of the log: microseconds from a request's start to its response's end.
  read -r p50 p99 < <(cut -f3 "$log" | sort -n | awk '{ v[NR] = $1 } END {
      i50 = int(NR * 0.50); if (i50 < NR * 0.50) i50++; if (i50 < 1) i50 = 1
      i99 = int(NR * 0.99); if (i99 < NR * 0.99) i99++; if (i99 < 1) i99 = 1
      printf "%.3f %.3f\n", v[i50] / 1000, v[i99] / 1000 }')
  rm -f "$log"
  local errors=$((${failed:-0} + ${not2xx:-0})) note="-"
  if ((errors > 0)); then note="errors: ${failed:-0} failed, ${not2xx:-0} not 2xx, of $completed"; fi
  add_row "$label" h2c "$round" "$(printf '%.0f' "$rps")" "$p50" "$p99" "$errors" "$note"
}

target_failed() { # $1 = target label, $2 = why: both of its rows say so
  add_row "$1" http1.1 - NA NA NA NA "$2"
  add_row "$1" h2c - NA NA NA NA "$2"
}

CHECK_ERR=""
check_target() { # $1 = base url: GET /api/balance with the bench headers answers 200 "ok"
  local body deadline=$((SECONDS + 10))
  while ((SECONDS < deadline)); do
    if body=$(curl -fsS -m 2 -H 'Host: bank.example' -H 'x-user-id: 1000000000000042' "$1/api/balance" 2>/dev/null) && [[ $body == ok ]]; then
      return 0
    fi
    sleep 0.1
  done
  CHECK_ERR=$(curl -sS -m 2 -o /dev/null -w 'HTTP %{http_code}' -H 'Host: bank.example' -H 'x-user-id: 1000000000000042' "$1/api/balance" 2>&1 || true)
  return 1
}

# --- start every server ------------------------------------------------------------
echo "== machine: $MACHINE"
echo "== pinning: $PINNING"
echo "== command: $COMMAND_LINE"
echo "== HTTP/1.1: ${loadgen_cmd[*]} wrk ${WRK_ARGS[*]} -s requests.lua URL   (1000 pre-built GET /api/balance, Host bank.example, random 16-digit x-user-id, the same for every target)"
echo "== HTTP/2:   ${loadgen_cmd[*]} h2load ${H2_ARGS[*]} -H ':authority: bank.example' -H 'x-user-id: $H2_USER_ID' --log-file=LOG URL   (h2c with prior knowledge; p50/p99 from the per-request log)"

# targets: label, HTTP/1.1 base url, h2c base url ("" when the target has no h2c listener)
labels=()
declare -A h1_url h2_url

echo "== backend: nginx, 1 worker, 127.0.0.1 and 127.0.1.1-$CELLS :$BACKEND_PORT (HTTP/1.1), 127.0.0.1:$BACKEND_H2_PORT (h2c)"
start_nginx "$backend_dir"
BACKEND_PID=$STARTED_PID
if ! wait_url "http://127.0.0.1:$BACKEND_PORT/" 15 || ! wait_url "http://127.0.1.$CELLS:$BACKEND_PORT/" 5 ||
  ! owns_port "$BACKEND_PID" "$BACKEND_PORT"; then
  echo "the backend did not start:" >&2
  cat "$backend_dir/error.log" "$backend_dir/stdout.log" >&2
  exit 1
fi
labels+=(backend)
h1_url[backend]=http://127.0.0.1:$BACKEND_PORT
h2_url[backend]=http://127.0.0.1:$BACKEND_H2_PORT

echo "== nginx reverse proxy: 1 worker, upstream keepalive 64, access log off; :$NGINX_PORT (HTTP/1.1), :$NGINX_H2_PORT (h2c)"
start_nginx "$nginx_dir"
pid=$STARTED_PID
labels+=(nginx)
if wait_url "http://127.0.0.1:$NGINX_PORT/" 15 && owns_port "$pid" "$NGINX_PORT" && check_target "http://127.0.0.1:$NGINX_PORT"; then
  h1_url[nginx]=http://127.0.0.1:$NGINX_PORT
  h2_url[nginx]=http://127.0.0.1:$NGINX_H2_PORT
else
  target_failed nginx "nginx did not start: $(tail -1 "$nginx_dir/error.log" 2>/dev/null) $CHECK_ERR"
fi

echo "== haproxy reverse proxy: nbthread 1, http-reuse always, no logging; :$HAPROXY_PORT (HTTP/1.1), :$HAPROXY_H2_PORT (h2c, proto h2)"
"${server_cmd[@]}" "$HAPROXY" -db -f "$haproxy_dir/haproxy.cfg" >"$haproxy_dir/haproxy.log" 2>&1 &
pid=$!
pids+=("$pid")
labels+=(haproxy)
if wait_url "http://127.0.0.1:$HAPROXY_PORT/" 15 && owns_port "$pid" "$HAPROXY_PORT" && check_target "http://127.0.0.1:$HAPROXY_PORT"; then
  h1_url[haproxy]=http://127.0.0.1:$HAPROXY_PORT
  h2_url[haproxy]=http://127.0.0.1:$HAPROXY_H2_PORT
else
  target_failed haproxy "haproxy did not start: $(tail -1 "$haproxy_dir/haproxy.log" 2>/dev/null) $CHECK_ERR"
fi

echo "== atoll gateway: --workers 1, unit routing ($SHARDS shards over $CELLS cells, key in x-user-id); :$GATEWAY_PORT (HTTP/1.1 and h2c)"
labels+=(atoll-gateway)
if [[ $gateway_state != present ]]; then
  echo "atoll gateway: $gateway_state"
  target_failed atoll-gateway "atoll gateway: $gateway_state"
else
  CPORT=$(free_port)
  APORT=$(free_port)
  CONTROL=http://127.0.0.1:$CPORT
  "${server_cmd[@]}" "$ATOLL" control --insecure --no-discovery --listen "127.0.0.1:$CPORT" --data-dir "$work/control" >"$work/control.log" 2>&1 &
  pids+=($!)
  if ! wait_url "$CONTROL/readyz" 30; then
    tail -20 "$work/control.log" >&2
    target_failed atoll-gateway "atoll control did not become ready"
  elif ! timeout 60 "$ATOLL" apply --control "$CONTROL" -f "$work/topology.yaml" >"$work/apply.log" 2>&1; then
    cat "$work/apply.log" >&2
    target_failed atoll-gateway "atoll apply refused the generated topology"
  else
    "${server_cmd[@]}" "$ATOLL" gateway --control "$CONTROL" --name gw-bench --workers 1 \
      --admin "127.0.0.1:$APORT" --state-dir "$work/gateway" >"$work/gateway.log" 2>&1 &
    gateway_pid=$!
    pids+=("$gateway_pid")
    if ! wait_url "http://127.0.0.1:$APORT/readyz" 30; then
      tail -20 "$work/gateway.log" >&2
      target_failed atoll-gateway "atoll gateway did not become ready on its admin port"
    elif ! check_target "http://127.0.0.1:$GATEWAY_PORT" || ! owns_port "$gateway_pid" "$GATEWAY_PORT"; then
      tail -20 "$work/gateway.log" >&2
      target_failed atoll-gateway "atoll gateway does not answer 200 \"ok\" on its own 127.0.0.1:$GATEWAY_PORT ($CHECK_ERR)"
    else
      h1_url[atoll-gateway]=http://127.0.0.1:$GATEWAY_PORT
      h2_url[atoll-gateway]=http://127.0.0.1:$GATEWAY_PORT
    fi
  fi
fi

# Forwarding between gateways: an entry gateway (zone bench-e, no cells of its own)
# forwards every request to the gateway of the owning cell's zone: cells c000-c049
# are in bench-p, whose gateway takes forwarded requests on its public listener
# (plain HTTP), c050-c099 in bench-t, whose gateway takes them on its peer listener
# (mutual TLS, certificates of Atoll's CA checked both ways). The same requests, for
# their shard half (low/high); every gateway --workers 1 on the server CPU. A control
# plane of its own, serving TLS: gateways with certificates need one.
fwd_topology() { # $1 entry port, $2 plain owner port, $3 tls owner public port, $4 tls owner peer port
  printf 'apiVersion: atoll/v1\nkind: Region\nmetadata: {name: bench}\n'
  local zone c
  for zone in bench-e bench-p bench-t; do
    printf -- '---\napiVersion: atoll/v1\nkind: Zone\nmetadata: {name: %s}\nspec: {region: bench}\n' "$zone"
  done
  for ((c = 0; c < CELLS; c++)); do
    zone=bench-p; ((c >= CELLS / 2)) && zone=bench-t
    printf -- '---\napiVersion: atoll/v1\nkind: Cell\nmetadata: {name: c%03d}\nspec: {zone: %s, type: rzone}\n' "$c" "$zone"
  done
  # The shard rule, map, service and route of the main topology, as they are.
  gen_topology 1 | awk '/^kind: ShardRule/ { on = 1 } /^kind: Gateway/ { on = 0 } on { print }' |
    awk 'BEGIN { print "---"; print "apiVersion: atoll/v1" } { print }' | sed '$d' | sed '$d'
  printf -- '---\napiVersion: atoll/v1\nkind: Gateway\nmetadata: {name: gw-entry}\nspec:\n  zone: bench-e\n  listeners: [{port: %s, protocol: http, address: 127.0.0.1}]\n' "$1"
  printf -- '---\napiVersion: atoll/v1\nkind: Gateway\nmetadata: {name: gw-plain}\nspec:\n  zone: bench-p\n  listeners: [{port: %s, protocol: http, address: 127.0.0.1}]\n  advertise: "127.0.0.1:%s"\n' "$2" "$2"
  printf -- '---\napiVersion: atoll/v1\nkind: Gateway\nmetadata: {name: gw-tls}\nspec:\n  zone: bench-t\n  listeners: [{port: %s, protocol: http, address: 127.0.0.1}]\n  peer: {port: %s, address: 127.0.0.1}\n  advertise: "127.0.0.1:%s"\n' "$3" "$4" "$4"
}
if [[ $gateway_state == present ]]; then
  echo "== forwarding between gateways: gw-entry -> gw-plain (plain HTTP) or gw-tls (mutual TLS on its peer listener), each --workers 1"
  FWD_ENTRY=$(free_port); FWD_PLAIN=$(free_port); FWD_TLS=$(free_port); FWD_PEER=$(free_port); FWD_CPORT=$(free_port)
  fwd_topology "$FWD_ENTRY" "$FWD_PLAIN" "$FWD_TLS" "$FWD_PEER" >"$work/fwd-topology.yaml"
  ca="$work/fwd-ca"
  fwd_failed=""
  {
    "$ATOLL" ca init --dir "$ca" &&
      "$ATOLL" ca issue --dir "$ca" --id atoll://default/control/-/bench --host 127.0.0.1 --out "$ca/control" &&
      "$ATOLL" ca issue --dir "$ca" --id atoll://default/gateway/bench-e/gw-entry --out "$ca/gw-entry" &&
      "$ATOLL" ca issue --dir "$ca" --id atoll://default/gateway/bench-p/gw-plain --out "$ca/gw-plain" &&
      "$ATOLL" ca issue --dir "$ca" --id atoll://default/gateway/bench-t/gw-tls --out "$ca/gw-tls"
  } >"$work/fwd-ca.log" 2>&1 || fwd_failed="atoll ca failed: $(tail -1 "$work/fwd-ca.log")"
  FWD_CONTROL=https://127.0.0.1:$FWD_CPORT
  if [[ -z $fwd_failed ]]; then
    "${server_cmd[@]}" "$ATOLL" --ca "$ca/root.pem" --cert "$ca/control.pem" --key "$ca/control.key" control --no-discovery \
      --listen "127.0.0.1:$FWD_CPORT" --data-dir "$work/fwd-control" --admin-token-file "$work/fwd-admin.token" >"$work/fwd-control.log" 2>&1 &
    pids+=($!)
    deadline=$((SECONDS + 30))
    until curl -fsS -m 2 --cacert "$ca/root.pem" -o /dev/null "$FWD_CONTROL/readyz" 2>/dev/null; do
      if ((SECONDS > deadline)); then fwd_failed="the TLS control plane did not become ready: $(tail -1 "$work/fwd-control.log")"; break; fi
      sleep 0.1
    done
  fi
  if [[ -z $fwd_failed ]] && ! ATOLL_TOKEN=$(cat "$work/fwd-admin.token") timeout 60 "$ATOLL" --ca "$ca/root.pem" --control "$FWD_CONTROL" apply -f "$work/fwd-topology.yaml" >"$work/fwd-apply.log" 2>&1; then
    fwd_failed="atoll apply refused the forwarding topology: $(tail -3 "$work/fwd-apply.log" | tr '\n' ' ')"
  fi
  if [[ -z $fwd_failed ]]; then
    for gw in gw-entry gw-plain gw-tls; do
      admin=$(free_port)
      "${server_cmd[@]}" "$ATOLL" --ca "$ca/root.pem" --cert "$ca/$gw.pem" --key "$ca/$gw.key" --control "$FWD_CONTROL" gateway \
        --name "$gw" --workers 1 --admin "127.0.0.1:$admin" --state-dir "$work/$gw" >"$work/$gw.log" 2>&1 &
      pids+=($!)
      if ! wait_url "http://127.0.0.1:$admin/readyz" 30; then fwd_failed="$gw did not become ready: $(tail -1 "$work/$gw.log")"; break; fi
    done
  fi
  labels+=(fwd-plain fwd-mtls)
  wrk_script_args[fwd-plain]=low
  wrk_script_args[fwd-mtls]=high
  if [[ -n $fwd_failed ]]; then
    echo "forwarding: $fwd_failed"
    target_failed fwd-plain "$fwd_failed"
    target_failed fwd-mtls "$fwd_failed"
  elif check_target "http://127.0.0.1:$FWD_ENTRY" &&
    curl -fsS -m 5 -H 'Host: bank.example' -H 'x-user-id: 1000000000009042' "http://127.0.0.1:$FWD_ENTRY/api/balance" >/dev/null; then
    # Both halves answer through the entry gateway (shards 42 and 9042).
    h1_url[fwd-plain]=http://127.0.0.1:$FWD_ENTRY
    h1_url[fwd-mtls]=http://127.0.0.1:$FWD_ENTRY
    h2_url[fwd-plain]=""
    h2_url[fwd-mtls]=""
    add_row fwd-plain h2c - NA NA NA NA "forwarding is measured over HTTP/1.1 only"
    add_row fwd-mtls h2c - NA NA NA NA "forwarding is measured over HTTP/1.1 only"
  else
    why="the entry gateway does not answer both shard halves: $CHECK_ERR $(tail -2 "$work/gw-entry.log" | tr '\n' ' ')"
    echo "forwarding: $why"
    target_failed fwd-plain "$why"
    target_failed fwd-mtls "$why"
  fi
fi

# h2c with prior knowledge: probed once per target; where it does not work the row
# says so (nothing is measured in its place).
for label in "${labels[@]}"; do
  [[ -n ${h1_url[$label]:-} ]] || continue
  [[ $label == fwd-* ]] && continue
  if ! h2_probe "${h2_url[$label]}/api/balance"; then
    add_row "$label" h2c - NA NA NA NA "h2c with prior knowledge does not work: $(grep -m1 -iE 'error|fail|refused|status codes' "$work/h2probe.txt" || tail -1 "$work/h2probe.txt")"
    h2_url[$label]=""
  fi
done

# --- measure -----------------------------------------------------------------------
for ((round = 1; round <= ROUNDS; round++)); do
  for ((i = 0; i < ${#labels[@]}; i++)); do
    label=${labels[(i + round - 1) % ${#labels[@]}]}
    [[ -n ${h1_url[$label]:-} ]] || continue
    echo "== $label (round $round/$ROUNDS)"
    run_wrk "$label" "${h1_url[$label]}/api/balance" "$round"
    if [[ -n ${h2_url[$label]:-} ]]; then run_h2load "$label" "${h2_url[$label]}/api/balance" "$round"; fi
  done
done

# The gateway's own count, as a check that unit routing spread the load: responses
# per cell (2xx and others), requests it refused, failed upstream tries.
GATEWAY_CHECK=""
if [[ -n ${h1_url[atoll-gateway]:-} ]] &&
  curl -fsS -m 5 "http://127.0.0.1:$APORT/metrics" >"$work/gateway-metrics.txt" 2>/dev/null; then
  GATEWAY_CHECK=$(awk '
    /^#/ { next }
    /^atoll_gateway_responses_total\{/ {
      cell = $0; sub(/.*cell="/, "", cell); sub(/".*/, "", cell)
      code = $0; sub(/.*code="/, "", code); sub(/".*/, "", code)
      if ($NF + 0 > 0) { cells[cell] = 1; if (code ~ /^2/) ok += $NF; else other += $NF }
    }
    /^atoll_gateway_refused_total/ { refused += $NF }
    /^atoll_gateway_upstream_errors_total/ { upstream += $NF }
    END { n = 0; for (c in cells) n++
      printf "atoll gateway metrics: %d 2xx and %d other responses from %d cells; %d refused; %d failed upstream tries", ok, other, n, refused, upstream }
  ' "$work/gateway-metrics.txt")
fi

# --- report ------------------------------------------------------------------------
# One line per target and protocol: the median of each figure over the rounds, the
# sum of the errors; failures (round "-") as they are.
summary="$work/summary"
awk -F'\t' -v labels="${labels[*]}" '
  function extreme(list, want_max,    n, a, i, m) {
    n = split(list, a, " "); m = a[1]
    for (i = 2; i <= n; i++) if (want_max ? a[i] + 0 > m + 0 : a[i] + 0 < m + 0) m = a[i]
    return m
  }
  function median(list,    n, a, i, j, t) {
    n = split(list, a, " ")
    for (i = 2; i <= n; i++) { t = a[i]; for (j = i - 1; j >= 1 && a[j] + 0 > t + 0; j--) a[j + 1] = a[j]; a[j + 1] = t }
    return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
  }
  {
    k = $1 SUBSEP $2
    if ($4 == "NA") { if (!(k in note)) note[k] = $8; next }
    rps[k] = rps[k] " " $4; p50[k] = p50[k] " " $5; p99[k] = p99[k] " " $6
    runs[k]++; errors[k] += $7; if ($8 != "-" && !(k in note)) note[k] = $8
  }
  END {
    n = split(labels, t, " ")
    for (i = 1; i <= n; i++) for (p = 1; p <= 2; p++) {
      proto = p == 1 ? "http1.1" : "h2c"; k = t[i] SUBSEP proto
      if (k in rps)
        printf "%s\t%s\t%.0f\t%.3f\t%.3f\t%d\t%s\t%d\t%s\t%s\n", t[i], proto, median(rps[k]), median(p50[k]), median(p99[k]), errors[k], (k in note) ? note[k] : "-", runs[k], extreme(rps[k], 0), extreme(rps[k], 1)
      else
        printf "%s\t%s\tNA\tNA\tNA\tNA\t%s\t0\tNA\tNA\n", t[i], proto, (k in note) ? note[k] : "not measured"
    }
  }' "$rows" >"$summary"

echo
if ((ROUNDS > 1)); then
  echo "== results: median of $ROUNDS rounds of $DURATION s (latency in ms)"
else
  echo "== results: $DURATION s per run (latency in ms)"
fi
awk -F'\t' '
  BEGIN { printf "%-15s %-8s %10s %17s %9s %9s %7s  %s\n", "target", "proto", "req/s", "(min-max)", "p50", "p99", "errors", "note" }
  { range = $9 == "NA" ? "" : "(" $9 "-" $10 ")"
    printf "%-15s %-8s %10s %17s %9s %9s %7s  %s\n", $1, $2, $3, range, $4, $5, $6, ($7 == "-" ? "" : $7) }' "$summary"
if [[ -n $GATEWAY_CHECK ]]; then echo "$GATEWAY_CHECK"; fi
echo
echo "== ratios: atoll gateway / proxy (req/s: above 1 is faster; p99: below 1 is better)"
awk -F'\t' '
  { rps[$1 "/" $2] = $3; p99[$1 "/" $2] = $5 }
  function ratio(a, b) { return (a == "NA" || b == "NA" || b + 0 == 0) ? "n/a" : sprintf("%.2fx", a / b) }
  END {
    split("http1.1 h2c", protos, " "); split("haproxy nginx", others, " ")
    for (p = 1; p <= 2; p++) for (o = 1; o <= 2; o++) {
      g = "atoll-gateway/" protos[p]; x = others[o] "/" protos[p]
      printf "gateway/%-8s %-8s req/s %-7s p99 %s\n", others[o], protos[p], ratio(rps[g], rps[x]), ratio(p99[g], p99[x])
    }
    printf "forwarding mtls/plain http1.1  req/s %-7s p99 %s\n", ratio(rps["fwd-mtls/http1.1"], rps["fwd-plain/http1.1"]), ratio(p99["fwd-mtls/http1.1"], p99["fwd-plain/http1.1"])
  }' "$summary"
echo
echo "== command: $COMMAND_LINE"
echo "== machine: $MACHINE; pinning: $PINNING"
echo
awk -F'\t' '{
    line = sprintf("RESULT target=%s proto=%s rps=%s p50_ms=%s p99_ms=%s errors=%s runs=%s rps_min=%s rps_max=%s", $1, $2, $3, $4, $5, $6, $8, $9, $10)
    if ($7 != "-") { note = $7; gsub(/"/, "\047", note); line = line " note=\"" note "\"" }
    print line
  }' "$summary"
