#!/usr/bin/env bash
# torchwire vs Hugging Face transformers on one NVIDIA GPU (H100 / H200), with a
# Llama-3.2-1B-shaped checkpoint (random weights, bf16, vocab 128256).
#
# Runs on a machine that has python3 with torch (CUDA build), transformers and
# tokenizers, but no Rust toolchain and no network: build the binaries
# elsewhere and carry them over, e.g.
#
#   cargo build --release --bins
#   mkdir -p bin && cp target/release/torchwire target/release/torchwire-server bin/
#   strip bin/*
#   # copy the repository (with bin/) to the GPU machine, then there:
#   bash scripts/gpu_bench.sh
#
# One run: creates the checkpoint (kept in $WORK for later runs), measures HF
# generate at batch 1 and 64 and torchwire bench at concurrency 1 and 64
# (128 prompt tokens, 128 output tokens, greedy, EOS ignored), and prints
# tokens/s, time per output token and the fraction of the memory-bandwidth
# bound (0.58 ms per decode step on an H200: 2.47 GB of weights at about
# 4.25 TB/s). Results land in bench-results/. About 5 minutes on an H200.
#
# Environment:
#   BIN_DIR   where torchwire and torchwire-server are (default: ./bin)
#   WORK      scratch directory for the checkpoint (default: /tmp/torchwire-gpu-bench)
#   BATCH     HF batch = torchwire concurrency (default: 64)
#   BOUND_MS  decode-step lower bound in ms for the fraction column (default: 0.58)
#   THREADS   torch intra-op threads on both sides (default: 8)
set -euo pipefail

cd "$(dirname "$0")/.."
BIN_DIR="${BIN_DIR:-$PWD/bin}"
WORK="${WORK:-/tmp/torchwire-gpu-bench}"
BATCH="${BATCH:-64}"
BOUND_MS="${BOUND_MS:-0.58}"
THREADS="${THREADS:-8}"
PYTHON="${PYTHON:-python3}"
MODEL="$WORK/llama-3.2-1b-random"

log() { echo "[gpu-bench $(date +%H:%M:%S)] $*" >&2; }

for b in torchwire torchwire-server; do
  [ -x "$BIN_DIR/$b" ] || { echo "error: $BIN_DIR/$b not found (see the top of this script)" >&2; exit 2; }
done

# The binaries link libtorch from the Python torch package (same 2.11 ABI).
TORCH_LIB="$("$PYTHON" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')"
export LD_LIBRARY_PATH="$TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
"$PYTHON" -c 'import torch; assert torch.cuda.is_available(), "no CUDA device"; print(torch.__version__, torch.cuda.get_device_name(0))' >&2
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >&2 || true

if [ ! -f "$MODEL/model.safetensors" ]; then
  log "creating the checkpoint in $MODEL"
  "$PYTHON" scripts/make_random_checkpoint.py --preset llama-3.2-1b --device cuda --out "$MODEL"
else
  log "reusing $MODEL"
fi

log "HF generate at batch 1 and $BATCH, then torchwire bench at concurrency 1 and $BATCH"
"$PYTHON" scripts/bench_compare.py \
  --model "$MODEL" \
  --device cuda \
  --dtype bfloat16 \
  --threads "$THREADS" \
  --prompt-tokens 128 \
  --output-tokens 128 \
  --batch "$BATCH" \
  --trials 2 \
  --rounds 2 \
  --bin-dir "$BIN_DIR" \
  --bandwidth-bound-ms "$BOUND_MS" \
  --ratio-targets none \
  --tok-s-targets "1=300,$BATCH=10000" \
  --label "llama-3.2-1b-shaped bf16 $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 || echo gpu)"
log "done"
