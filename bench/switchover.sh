#!/usr/bin/env bash
# Switchover and failover benchmark: RTO, RPO, fence window and switchover
# time in the local sandbox (release build), under a recorded bank workload
# checked for lost and doubled writes (atoll drill; docs/drills.md):
#  1. a planned switchover of half the shards (--shards 0-49), ROUNDS times,
#     alternating direction;
#  2. the same with the control plane SIGKILLed right after the start;
#  3. a cell frozen (SIGSTOP: alive but silent, as behind a partition) and
#     failed over by the sandbox's emergency plan (lostAfter 5s);
#  4. a cell killed (SIGKILL) and failed over.
# Prints one line per drill and a RESULT block with the medians.
# There is no runnable anchor for a switchover: the context numbers (the
# seed's and the issue's) are printed beside the results instead.
#
# Usage: [RATE=250] [DURATION=15] [ROUNDS=3] [BUILD=1] [PORT_BASE=7700] bench/switchover.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
RATE=${RATE:-250}
DURATION=${DURATION:-15}
ROUNDS=${ROUNDS:-3}
BUILD=${BUILD:-1}
PORT_BASE=${PORT_BASE:-7700}
ATOLL=$ROOT/target/release/atoll
BANK=$ROOT/target/release/atoll-bank

if [ "$BUILD" = 1 ]; then
  cargo build --release --locked --bin atoll --bin atoll-bank >/dev/null
fi
for tool in python3; do
  command -v "$tool" >/dev/null || { echo "needs $tool" >&2; exit 1; }
done

WORK=$(mktemp -d /tmp/atoll-switchover-bench.XXXXXX)
UP_PID=
cleanup() {
  if [ -n "$UP_PID" ]; then
    kill -INT "$UP_PID" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$UP_PID" 2>/dev/null || break; sleep 0.2; done
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT

"$ATOLL" up --port-base "$PORT_BASE" --state-dir "$WORK/state" --bank "$BANK" >"$WORK/up.log" 2>&1 &
UP_PID=$!
for _ in $(seq 1 300); do
  [ -f "$WORK/state/up.json" ] && break
  kill -0 "$UP_PID" 2>/dev/null || { cat "$WORK/up.log"; exit 1; }
  sleep 0.2
done
CONTROL="http://127.0.0.1:$PORT_BASE"
echo "sandbox up (release) at $CONTROL; workload ${RATE} req/s for ${DURATION}s per drill"

drill() {
  local label=$1; shift
  local out="$WORK/$(echo "$label" | tr ' /' '__').json"
  "$ATOLL" --control "$CONTROL" drill "$@" --rate "$RATE" --duration "${DURATION}s" \
    --start-after 4s --state-dir "$WORK/state" -o json >"$out" || true
  python3 - "$label" "$out" <<'EOF'
import json, sys
label, path = sys.argv[1], sys.argv[2]
try:
    r = json.load(open(path))
except Exception as e:
    print(f"{label:<28} no report ({e})"); sys.exit(0)
w = r.get("workload") or {}
def v(k):
    x = r.get(k)
    return "-" if x is None else str(x)
req = w.get("requests", 0); secs = w.get("seconds", 1) or 1
print(f"{label:<28} {r.get('outcome','?')[:10]:<10} rto {v('rtoMs'):>5} ms  detect {v('detectedMs'):>5} ms  "
      f"failover {v('failoverMs'):>5} ms  fence {v('fenceWindowMs'):>5} ms  switchover {v('switchoverMs'):>5} ms  "
      f"rpo {r.get('rpoPositions',0)} pos/{r.get('lostAcknowledgedWrites',0)} acked lost  "
      f"load {req/secs:.0f} req/s, {w.get('failed','?')} failed  checker {'clean' if r.get('clean') else 'NOT CLEAN'}")
EOF
}

for round in $(seq 1 "$ROUNDS"); do
  drill "planned 0-49 #$round" switchover --shards 0-49
done
drill "planned, control killed" switchover --shards 0-49 --kill-control-plane
drill "failover rz03 (freeze)" fault --cell rz03 --fault freeze
drill "failover rz02 (kill)" fault --cell rz02 --fault kill

python3 - "$WORK" <<'EOF'
import glob, json, statistics, sys
rows = []
for path in sorted(glob.glob(sys.argv[1] + "/*.json")):
    try:
        rows.append((path.rsplit("/", 1)[1], json.load(open(path))))
    except Exception:
        pass
def med(prefix, key):
    xs = [r[key] for n, r in rows if n.startswith(prefix) and r.get(key) is not None]
    return f"{statistics.median(xs):.0f} ms" if xs else "-"
print("RESULT")
print(f"  planned switchover of 50 shards: switchover {med('planned_0-49', 'switchoverMs')}, "
      f"fence window {med('planned_0-49', 'fenceWindowMs')}, RTO {med('planned_0-49', 'rtoMs')} (medians)")
print(f"  failover: detection {med('failover', 'detectedMs')}, detection to completion {med('failover', 'failoverMs')}, "
      f"RTO {med('failover', 'rtoMs')}")
lost = sum(r.get("lostAcknowledgedWrites", 0) for _, r in rows)
clean = all(r.get("clean") for _, r in rows)
print(f"  acknowledged writes lost in all drills: {lost}; checker clean in all: {clean}")
print("  context: AppActive switches after a fixed `sleep 3` with no replication check; "
      "OceanBase promises RPO 0, RTO < 8 s; Slack drains an AZ in < 5 min")
EOF
