#!/usr/bin/env bash
# Compares two builds on a noisy machine: alternates A and B, each round on a fresh cluster
# (scripts/bench-cluster.sh), runs every case for SECS seconds, and records ops/s, p50, the
# CPU time per operation of every process (frontend, storage nodes, bench client), the share
# of all CPU time that idle polling used (`idle_poll_us`; its threads run only where a CPU
# would otherwise idle, so they are not counted per operation) and the share of CPU time the
# hypervisor stole meanwhile. The summary counts only runs whose steal
# is at most MAX_STEAL percent: on a shared VM the others measured the neighbours.
#
#   A=/tmp/build-before B=target/release ROUNDS=6 scripts/bench-ab.sh
#
# A and B are directories holding frontend, storage and client. The cases (CASES) are
# put-1, put-64 and get-64, with --keys 10000 and a one-thread bench (--threads 1).
# A_FLAGS and B_FLAGS add bench flags to one side, to compare two settings of one build:
#
#   A=target/release B=target/release A_FLAGS="--connections 16" scripts/bench-ab.sh
#
# A_CONFIG and B_CONFIG give one side another frontend config file, A_STORAGE_CONFIG and
# B_STORAGE_CONFIG another storage config file, to compare two settings of one build:
#
#   A=target/release B=target/release A_CONFIG=/tmp/depth1.toml scripts/bench-ab.sh
set -euo pipefail
cd "$(dirname "$0")/.."
: "${A:?A=dir of the first build}" "${B:?B=dir of the second build}"
ROUNDS=${ROUNDS:-4}
SECS=${SECS:-3}
CASES=${CASES:-put-1 put-64 get-64}
MAX_STEAL=${MAX_STEAL:-5}
BASE=${BASE:-27000}
OUT=${OUT:-$(mktemp /tmp/walkv-ab.XXXXXX)}
hz=$(getconf CLK_TCK)
cpus=$(getconf _NPROCESSORS_ONLN)
steal() { awk '/^cpu /{print $9}' /proc/stat; }
# utime + stime of a pid, in clock ticks; poll_ticks: the part its idle-poll threads
# (idle_poll_us) used, counted apart: they run only on CPUs that would otherwise be idle.
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
poll_ticks() {
  local t n=0
  for t in /proc/"$1"/task/*; do
    [ "$(cat "$t/comm" 2>/dev/null)" = idle-poll ] && n=$((n + $(awk '{print $14 + $15}' "$t/stat")))
  done
  echo "$n"
}
cluster=
stop_cluster() {
  if [ -n "$cluster" ]; then
    kill -TERM "$cluster" 2>/dev/null || true
    wait "$cluster" 2>/dev/null || true
    cluster=
  fi
}
trap stop_cluster EXIT INT TERM

for round in $(seq 1 "$ROUNDS"); do
  for side in A B; do
    bin=${!side}
    side_flags_var=${side}_FLAGS
    side_flags=${!side_flags_var:-}
    side_config_var=${side}_CONFIG
    side_config=${!side_config_var:-config/frontend.toml}
    side_storage_config_var=${side}_STORAGE_CONFIG
    side_storage_config=${!side_storage_config_var:-config/storage.toml}
    log=$(mktemp /tmp/walkv-ab-cluster.XXXXXX)
    BIN=$bin BASE=$BASE FRONTEND_CONFIG=$side_config STORAGE_CONFIG=$side_storage_config \
      scripts/bench-cluster.sh >"$log" 2>&1 &
    cluster=$!
    for _ in $(seq 1 100); do grep -q "cluster up" "$log" && break; sleep 0.1; done
    grep -q "cluster up" "$log" || { echo "cluster of $side did not start:" >&2; cat "$log" >&2; exit 1; }
    pids=$(sed -n 's/.*pids //p' "$log")
    for case in $CASES; do
      case $case in
        put-1) flags="--clients 1" ;;
        put-64) flags="--clients 64" ;;
        get-64)
          flags="--clients 64 --read-ratio 1"
          "$bin/client" --id ab-preload --frontend "127.0.0.1:$BASE" bench --clients 64 \
            --ops 10000 --keys 10000 >/dev/null 2>&1
          ;;
        *) echo "unknown case $case" >&2; exit 2 ;;
      esac
      servers0=0; poll0=0
      for p in $pids; do
        polled=$(poll_ticks "$p")
        servers0=$((servers0 + $(ticks "$p") - polled)); poll0=$((poll0 + polled))
      done
      s0=$(steal) t0=$(date +%s%N)
      # shellcheck disable=SC2086
      json=$( { /usr/bin/time -f "bench-cpu %U %S" "$bin/client" --id ab --frontend "127.0.0.1:$BASE" \
        --json bench $flags $side_flags --threads 1 --duration "$SECS" --keys 10000 2>&1 >&3 | grep '^bench-cpu'; } 3>&1 )
      s1=$(steal) t1=$(date +%s%N)
      servers1=0; poll1=0
      for p in $pids; do
        polled=$(poll_ticks "$p")
        servers1=$((servers1 + $(ticks "$p") - polled)); poll1=$((poll1 + polled))
      done
      echo "$json" | python3 -c '
import json, sys
side, case, round_, hz, cpus, dsteal, dns, dservers, dpoll = sys.argv[1:10]
lines = sys.stdin.read().splitlines()
d = json.loads(next(l for l in lines if l.startswith("{")))
u, s = next(l for l in lines if l.startswith("bench-cpu")).split()[1:3]
ops = max(d["ops"], 1)
cpu_us = (int(dservers) / int(hz) + float(u) + float(s)) / ops * 1e6
wall_cpu = int(cpus) * int(dns) / 1e9
steal = int(dsteal) / int(hz) / wall_cpu * 100
poll = int(dpoll) / int(hz) / wall_cpu * 100
print(json.dumps({"side": side, "case": case, "round": int(round_), "ops_per_sec": d["ops_per_sec"],
                  "p50_us": d["p50_us"], "errors": d["errors"], "cpu_us_per_op": round(cpu_us, 1),
                  "steal_pct": round(steal, 1), "idle_poll_pct": round(poll, 1)}))
' "$side" "$case" "$round" "$hz" "$cpus" $((s1 - s0)) $((t1 - t0)) $((servers1 - servers0)) \
        $((poll1 - poll0)) | tee -a "$OUT"
    done
    stop_cluster
    rm -f "$log"
  done
done

python3 - "$OUT" "$MAX_STEAL" <<'EOF'
import json, statistics, sys
runs = [json.loads(l) for l in open(sys.argv[1])]
limit = float(sys.argv[2])
print(f"\nsummary (runs with steal <= {limit:g}%; all runs in {sys.argv[1]}):")
for case in dict.fromkeys(r["case"] for r in runs):
    for side in ("A", "B"):
        rs = [r for r in runs if r["case"] == case and r["side"] == side]
        quiet = [r for r in rs if r["steal_pct"] <= limit]
        if not quiet:
            print(f"{case:7} {side}: no quiet runs of {len(rs)}")
            continue
        med = lambda k: statistics.median(r.get(k, 0) for r in quiet)
        print(f"{case:7} {side}: {len(quiet)}/{len(rs)} runs  ops/s median {med('ops_per_sec'):8.0f} "
              f"[{min(r['ops_per_sec'] for r in quiet):.0f}-{max(r['ops_per_sec'] for r in quiet):.0f}]  "
              f"p50 median {med('p50_us'):6.0f} us  CPU/op median {med('cpu_us_per_op'):5.1f} us  "
              f"polling {med('idle_poll_pct'):4.1f}%  "
              f"errors {sum(r['errors'] for r in rs)}")
EOF
