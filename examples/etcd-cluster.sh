#!/usr/bin/env bash
# Starts a 3-member etcd cluster on loopback for trying bootsync on etcd (or measuring B6).
# Prints the --store URL, then waits; Ctrl-C (or SIGTERM) stops every member it started.
set -euo pipefail
base=${ETCD_BASE_PORT:-23790}
dir=$(mktemp -d)
cluster=""
for i in 0 1 2; do
  cluster+="m$i=http://127.0.0.1:$((base + 10 + i)),"
done
cluster=${cluster%,}
pids=()
trap 'kill "${pids[@]}" 2>/dev/null; wait; rm -rf "$dir"' EXIT
for i in 0 1 2; do
  client=$((base + i)); peer=$((base + 10 + i))
  etcd --name "m$i" --data-dir "$dir/m$i" \
    --listen-client-urls "http://127.0.0.1:$client" --advertise-client-urls "http://127.0.0.1:$client" \
    --listen-peer-urls "http://127.0.0.1:$peer" --initial-advertise-peer-urls "http://127.0.0.1:$peer" \
    --initial-cluster "$cluster" --initial-cluster-state new --initial-cluster-token bootsync-demo \
    --max-txn-ops 2048 > "$dir/m$i.log" 2>&1 &
  pids+=($!)
done
echo "--store etcd:http://127.0.0.1:$base,http://127.0.0.1:$((base + 1)),http://127.0.0.1:$((base + 2))"
wait
