#!/usr/bin/env bash
# Runs the README's benchmark set against a running cluster, each case RUNS times (default
# 3), and prints every run's JSON plus the median ops/s, p50 and p99 per case.
#
#   CLIENT=target/release/client FRONTEND=127.0.0.1:27000 scripts/bench-suite.sh
#
# The bench runs with THREADS (default 1) threads of its own, leaving the rest of a machine
# it shares with the cluster to the servers. On a VM, each run also reports the CPU time
# the hypervisor stole (`steal` in /proc/stat, as % of all CPUs): runs with a high steal
# measured the neighbours as much as walkv.
set -euo pipefail
CLIENT=${CLIENT:-./client}
FRONTEND=${FRONTEND:-127.0.0.1:7000}
RUNS=${RUNS:-3}
SECS=${SECS:-8}
THREADS=${THREADS:-1}
steal() { awk '/^cpu /{print $9}' /proc/stat; }
cpus=$(getconf _NPROCESSORS_ONLN)
hz=$(getconf CLK_TCK)
cases=(
  "put-1|--clients 1"
  "put-64|--clients 64"
  "get-64|--clients 64 --read-ratio 1 --preload 10000"
)
for c in "${cases[@]}"; do
  name=${c%%|*}
  flags=${c#*|}
  for r in $(seq 1 "$RUNS"); do
    s0=$(steal) t0=$(date +%s%N)
    # shellcheck disable=SC2086
    out=$("$CLIENT" --id "bench-$name" --frontend "$FRONTEND" --json bench $flags \
      --threads "$THREADS" --duration "$SECS" --value-size 100 --keys 10000 2>/dev/null)
    s1=$(steal) t1=$(date +%s%N)
    echo "$name $(( (s1 - s0) * 100 * 1000000000 / (hz * cpus * (t1 - t0)) )) $out"
  done
done | tee /dev/stderr | python3 -c '
import sys, json, statistics, collections
runs = collections.defaultdict(list)
for line in sys.stdin:
    name, steal, js = line.split(" ", 2)
    r = json.loads(js)
    r["steal_pct"] = int(steal)
    runs[name].append(r)
for name, rs in runs.items():
    m = {k: statistics.median(r[k] for r in rs) for k in ("ops_per_sec", "p50_us", "p99_us", "p999_us", "steal_pct")}
    errs = sum(r["errors"] for r in rs)
    print("%-8s median of %d: %8.0f ops/s  p50 %6.0f us  p99 %7.0f us  p99.9 %7.0f us  errors %d  steal %d%%"
          % (name, len(rs), m["ops_per_sec"], m["p50_us"], m["p99_us"], m["p999_us"], errs, m["steal_pct"]))
'
