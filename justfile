# torchwire recipes. Run them through ./just (it installs the toolchain on
# first use), or with your own `just` after `source scripts/env.sh`.

set shell := ["bash", "-euo", "pipefail", "-c"]

model := "models/torchwire-tiny"
env := "source scripts/env.sh"

# List the recipes.
default:
    @just --list

# Build every binary (release).
build:
    {{env}} && cargo build --release --workspace --bins

# Build and start the server on the bundled model (extra flags are passed on).
serve *ARGS: build
    {{env}} && exec target/release/torchwire-server --model {{model}} {{ARGS}}

# Run the whole test suite: unit, parity with Hugging Face transformers, and
# end-to-end tests against the real binaries and a real nats-server.
test:
    {{env}} && export CARGO_INCREMENTAL=0 && cargo build --workspace --bins && cargo test --workspace --no-fail-fast -- --test-threads 4

# Format and lint as CI expects.
lint:
    {{env}} && cargo fmt --all -- --check && cargo clippy --workspace --all-targets -- -D warnings

# Validate deploy/ offline: kustomize overlays against the Kubernetes and KEDA schemas, hadolint.
validate-deploy *ARGS:
    {{env}} && python scripts/validate_deploy.py {{ARGS}}

# Retrain the bundled model from its corpus (about 20 minutes on 2 cores).
train-model:
    {{env}} && bash models/train/fetch_corpus.sh && python models/train/train.py

# Compare torchwire with HF transformers here (see BENCHMARKS.md; flags go to scripts/bench_compare.py).
bench-compare *ARGS: build
    {{env}} && python scripts/bench_compare.py --model {{model}} {{ARGS}}

# torchwire next to llama.cpp's llama-server on the bundled model and a SmolLM-135M-shaped one (see BENCHMARKS.md; flags go to scripts/bench_llamacpp.py).
bench-llamacpp *ARGS: build
    {{env}} && python scripts/bench_llamacpp.py {{ARGS}}

# Prefix reuse on a multi-turn agent workload, reuse on against off (see BENCHMARKS.md; flags go to scripts/prefix_reuse_bench.py).
bench-prefix *ARGS: build
    {{env}} && python scripts/prefix_reuse_bench.py {{ARGS}}

# A chat turn through a session against the same turn inline, with a real nats-server (see BENCHMARKS.md; flags go to scripts/session_bench.py).
bench-sessions *ARGS: build
    {{env}} && python scripts/session_bench.py {{ARGS}}

# Server thread settings alone and beside a busy process on the same cores (see BENCHMARKS.md; flags go to scripts/contention_bench.py).
bench-contention *ARGS: build
    {{env}} && python scripts/contention_bench.py --model {{model}} {{ARGS}}

# Soak: 10 minutes of mixed load (streams, cancellations, deadlines, bad input, sessions, NATS) with RSS sampled (see RELIABILITY.md; flags go to scripts/soak.py).
soak *ARGS: build
    {{env}} && python scripts/soak.py {{ARGS}}
