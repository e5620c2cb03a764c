#!/usr/bin/env bash
# Starts a throwaway cluster for `client bench`: one frontend and three storage nodes on
# 127.0.0.1 with the repo's config files, data and logs under $DIR (default: a new temp
# dir), ports from $BASE (default 27000: frontend 27000/27001, storage 27101-27103).
# Prints the frontend address and the pids, then waits; Ctrl-C or SIGTERM stops all four.
# FRONTEND_CONFIG and STORAGE_CONFIG name other config files (defaults: config/frontend.toml
# and config/storage.toml).
#
#   BIN=target/release scripts/bench-cluster.sh &
#   ./target/release/client --id b --frontend 127.0.0.1:27000 bench --clients 64 --duration 10
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.}
BASE=${BASE:-27000}
FRONTEND_CONFIG=${FRONTEND_CONFIG:-config/frontend.toml}
STORAGE_CONFIG=${STORAGE_CONFIG:-config/storage.toml}
DIR=${DIR:-$(mktemp -d /tmp/walkv-bench.XXXXXX)}
# Refuse to start on a busy port: a storage node of someone else's cluster would otherwise
# register with this frontend (or ours with theirs).
for p in "$BASE" $((BASE + 1)) $((BASE + 79)) $((BASE + 80)) $((BASE + 101)) $((BASE + 102)) $((BASE + 103)); do
  if (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
    echo "port $p is in use; pick another BASE" >&2
    exit 2
  fi
done
mkdir -p "$DIR/logs"
pids=()
stop() {
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  wait || true
}
trap stop INT TERM EXIT
"$BIN/frontend" --config "$FRONTEND_CONFIG" --client-listen "127.0.0.1:$BASE" \
  --storage-listen "127.0.0.1:$((BASE + 1))" --http-listen "127.0.0.1:$((BASE + 80))" \
  --resp-listen "127.0.0.1:$((BASE + 79))" --data-dir "$DIR/frontend" \
  >>"$DIR/logs/frontend.log" 2>&1 &
pids+=($!)
for i in 1 2 3; do
  "$BIN/storage" --config "$STORAGE_CONFIG" --id "s$i" --listen "127.0.0.1:$((BASE + 100 + i))" \
    --frontend "127.0.0.1:$((BASE + 1))" --data-dir "$DIR/s$i" >>"$DIR/logs/s$i.log" 2>&1 &
  pids+=($!)
done
for _ in $(seq 1 100); do
  if "$BIN/client" --id bench-script --frontend "127.0.0.1:$BASE" --timeout-ms 200 --json status 2>/dev/null |
    grep -q '"role":"in_sync".*"role":"in_sync".*"role":"in_sync"'; then
    break
  fi
  sleep 0.1
done
echo "cluster up: frontend 127.0.0.1:$BASE, data $DIR, pids ${pids[*]}"
wait
