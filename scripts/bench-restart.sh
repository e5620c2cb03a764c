#!/usr/bin/env bash
# Restart and catch-up of a storage node with a lot of state (the issue-5 targets).
#
#   1. restart: KEYS distinct keys (100-byte values) are written, node s3 is SIGKILLed and
#      started again; prints the seconds until it is back in the in-sync set.
#   2. catch-up: s3 is SIGKILLed again, MISSED more writes are made while it is down, then
#      it is started while a background bench keeps writing; prints the seconds until it is
#      in sync again (and the background bench's result, to show writes kept flowing).
#
#   BIN=target/release KEYS=1000000 MISSED=1000000 scripts/bench-restart.sh
#
# Starts its own cluster with scripts/bench-cluster.sh (ports from BASE, default 27200) in
# a temp dir, and stops it at the end; KEEP=1 keeps the dir (logs of every process).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.}
BASE=${BASE:-27200}
KEYS=${KEYS:-1000000}
MISSED=${MISSED:-1000000}
DIR=$(mktemp -d /tmp/walkv-restart.XXXXXX)
FE=127.0.0.1:$BASE
client() { "$BIN/client" --id "restart-bench-$1" --frontend "$FE" "${@:2}"; }

BIN=$BIN BASE=$BASE DIR=$DIR scripts/bench-cluster.sh >"$DIR/cluster.out" 2>&1 &
cluster=$!
trap 'kill -TERM $cluster 2>/dev/null; pkill -f "storage.*--data-dir $DIR/s3" 2>/dev/null; wait 2>/dev/null; [ -n "${KEEP:-}" ] || rm -rf "$DIR"' EXIT
until grep -q "cluster up" "$DIR/cluster.out" 2>/dev/null; do sleep 0.2; done

s3_start() {
  "$BIN/storage" --config config/storage.toml --id s3 --listen "127.0.0.1:$((BASE + 103))" \
    --frontend "127.0.0.1:$((BASE + 1))" --data-dir "$DIR/s3" >>"$DIR/logs/s3.log" 2>&1 &
  disown
}
# Kills s3 and waits until the frontend has noticed (so "in sync" later means the new process).
s3_kill() {
  pkill -KILL -f "storage.*--data-dir $DIR/s3" || true
  while s3_in_sync; do sleep 0.05; done
}
s3_in_sync() { client probe --timeout-ms 500 --json status 2>/dev/null | grep -q '"id":"s3"[^}]*"role":"in_sync"'; }
wait_in_sync() {
  local t0=$1
  until s3_in_sync; do sleep 0.05; done
  awk -v t0="$t0" -v t1="$(date +%s.%N)" 'BEGIN { printf "%.2f", t1 - t0 }'
}
rss_kib() { grep VmRSS "/proc/$(pgrep -f "storage.*--data-dir $DIR/s3")/status" | awk '{print $2}'; }

echo "writing $KEYS distinct keys..." >&2
client load bench --clients 64 --keys "$KEYS" --preload "$KEYS" --ops 1 >/dev/null 2>&1
echo "s3 RSS with $KEYS keys: $(rss_kib) KiB ($(( $(rss_kib) * 1024 / KEYS )) B/key)"
s3_kill
t0=$(date +%s.%N)
s3_start
echo "restart with $KEYS keys: back in sync after $(wait_in_sync "$t0") s"
grep -E "recover" "$DIR/logs/s3.log" | tail -2

s3_kill
echo "writing $MISSED records while s3 is down..." >&2
client missed --json bench --clients 64 --keys "$KEYS" --ops "$MISSED" >/dev/null 2>&1
client background --json bench --clients 16 --keys "$KEYS" --duration 30 >"$DIR/background.json" 2>/dev/null &
bg=$!
sleep 2
t0=$(date +%s.%N)
s3_start
echo "catch-up of $MISSED missed writes under load: in sync after $(wait_in_sync "$t0") s"
wait $bg
echo "background writes during catch-up: $(cat "$DIR/background.json")"
grep -E "catch" "$DIR/logs/frontend.log" | tail -4
[ -z "${KEEP:-}" ] || echo "logs kept in $DIR/logs"
