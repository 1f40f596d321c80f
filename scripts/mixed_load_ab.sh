#!/usr/bin/env bash
# Inter-token latency of running streams while long prompts keep arriving:
# one prefill per long prompt (max_prefill_tokens 4096) against chunks of 64.
# `torchwire bench` runs 8 concurrent streams (32 + 128 tokens) while a loop
# sends a ~450-token prompt for one output token every 50 ms. Alternates the
# two settings ROUNDS times (default 2). Run after `./just build`:
#
#   source scripts/env.sh && bash scripts/mixed_load_ab.sh
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=target/release
MODEL="${MODEL:-models/torchwire-tiny}"
ROUNDS="${ROUNDS:-2}"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
LONG="$(python3 -c 'print("The quick brown fox jumps over the lazy dog. " * 45)')"

run() {
  local name=$1 budget=$2
  "$BIN/torchwire-server" --listen 127.0.0.1:0 --admin-listen off --model "$MODEL" --threads 2 \
    --max-prefill-tokens "$budget" > "$TMP/out" 2> "$TMP/err" &
  local pid=$!
  for _ in $(seq 80); do grep -q listening "$TMP/out" && break; sleep 0.25; done
  local addr="http://$(awk '{print $NF}' "$TMP/out")"
  "$BIN/torchwire" --addr "$addr" health --wait 60 > /dev/null
  rm -f "$TMP/stop"
  ( for _ in $(seq 1000); do
      [ -f "$TMP/stop" ] && break
      "$BIN/torchwire" --addr "$addr" generate --max-new-tokens 1 "$LONG" > /dev/null 2>&1 || true
      sleep 0.05
    done ) &
  local loader=$!
  sleep 0.5
  "$BIN/torchwire" --addr "$addr" bench --concurrency 8 --rounds 4 --warmup 0 \
    --prompt-tokens 32 --output-tokens 128 --no-progress 2>&1 | grep "^c=" | sed "s/^/$name /"
  touch "$TMP/stop"
  wait "$loader"
  kill -TERM "$pid"
  wait "$pid" || true
}

echo "setting      load  ok  failed  out tok/s  req/s  TTFT ms p50/p90/p99  TPOT ms p50/p90/p99  ITL ms p50/p90/p99"
for _ in $(seq "$ROUNDS"); do
  run "one-prefill" 4096
  run "chunks-64  " 64
done
