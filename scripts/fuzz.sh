#!/usr/bin/env bash
# Runs the property-based fuzz tests (every test in a `fuzz` module: the
# decoders of outside input) with many more cases than the test suite's
# default of 256. Any failure prints the minimal input that broke it;
# proptest saves it under proptest-regressions/ so that the normal suite
# replays it from then on.
#
#   scripts/fuzz.sh                   # 20000 cases per property
#   PROPTEST_CASES=200000 scripts/fuzz.sh
#   FUZZ_PACKAGES="torchwire-nats" scripts/fuzz.sh
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=/dev/null
source scripts/env.sh

export PROPTEST_CASES="${PROPTEST_CASES:-20000}"
# Crates whose unit tests have `fuzz` modules.
packages=(${FUZZ_PACKAGES:-torchwire-nats torchwire-config torchwire-scaler})
args=()
for p in "${packages[@]}"; do args+=(-p "$p"); done

echo "fuzz: $PROPTEST_CASES cases per property in ${packages[*]}" >&2
start=$(date +%s)
cargo test "${args[@]}" --lib -- fuzz --test-threads "$(nproc)"
echo "fuzz: done in $(( $(date +%s) - start )) s" >&2
