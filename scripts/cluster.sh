#!/usr/bin/env bash
# Starts a local walkv cluster: one frontend and three storage nodes (s1..s3) on
# 127.0.0.1, data under ./data, logs under ./data/logs. Ctrl-C (or SIGTERM) stops all four
# gracefully. Run from the repo root after `make all` (`make cluster` does both).
set -euo pipefail
cd "$(dirname "$0")/.."
for b in frontend storage client; do
  [ -x "./$b" ] || { echo "missing ./$b: run 'make all' first" >&2; exit 2; }
done
mkdir -p data/logs
pids=()
stop() {
  echo "stopping cluster..."
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  wait || true
}
trap stop INT TERM EXIT

./frontend --config config/frontend.toml >>data/logs/frontend.log 2>&1 &
pids+=($!)
for i in 1 2 3; do
  ./storage --config config/storage.toml --id "s$i" --listen "127.0.0.1:710$i" \
    --data-dir "data/s$i" >>"data/logs/s$i.log" 2>&1 &
  pids+=($!)
done

# Wait (bounded) until every node is in sync.
for _ in $(seq 1 100); do
  if ./client --id cluster-script --timeout-ms 200 --json status 2>/dev/null | grep -q '"role":"in_sync".*"role":"in_sync".*"role":"in_sync"'; then
    break
  fi
  sleep 0.1
done
./client --id cluster-script status || true
cat <<TXT

walkv is running: frontend 127.0.0.1:7000 (clients), storage nodes s1..s3 on 127.0.0.1:7101-7103.
Logs: data/logs/*.log   Data: data/
Doors: HTTP + status page http://127.0.0.1:7080/  Redis protocol 127.0.0.1:6380  metrics http://127.0.0.1:7080/metrics
Try:  ./client --id alice put greeting hello && ./client --id alice get greeting
      curl http://127.0.0.1:7080/v1/kv/greeting ; redis-cli -p 6380 GET greeting
Press Ctrl-C to stop the cluster.
TXT
wait
