#!/usr/bin/env bash
# Runs every fuzz target (fuzz/fuzz_targets) for FUZZ_SECONDS (30) each,
# starting from the committed corpus. Needs the nightly toolchain; without
# it, says so and does nothing. A crash, a failed assertion, a leak or a
# timeout fails the run; the input is left in fuzz/artifacts/TARGET/.
# Usage: bash tests/fuzz.sh [TARGET...]
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${FUZZ_SECONDS:-30}

if ! command -v rustup >/dev/null || ! rustup toolchain list | grep -q nightly; then
  echo "fuzz: skipped, no nightly toolchain (rustup toolchain install nightly)"
  exit 0
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
  echo "fuzz: installing cargo-fuzz"
  cargo +stable install cargo-fuzz --locked
fi

if [ $# -gt 0 ]; then
  targets=("$@")
else
  mapfile -t targets < <(cd fuzz && cargo +nightly fuzz list)
fi

# The instrumented build is slow from cold (the whole dependency tree, for
# nightly with sanitizers): it is kept outside the clone, so that a later
# run on the same machine rebuilds only what changed.
export CARGO_TARGET_DIR=${FUZZ_TARGET_DIR:-/var/cache/outpost-test/fuzz-target}
mkdir -p "$CARGO_TARGET_DIR"

# Runs grow their corpus: work on a copy, never on the committed one.
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

cd fuzz
echo "fuzz: building the targets in $CARGO_TARGET_DIR"
build_start=$(date +%s)
if ! cargo +nightly fuzz build >"$work/build.log" 2>&1; then
  tail -n 40 "$work/build.log"
  echo "fuzz: the targets do not build"
  exit 1
fi
echo "fuzz: built ($(($(date +%s) - build_start))s)"
for t in "${targets[@]}"; do
  mkdir -p "$work/$t"
  if [ -d "corpus/$t" ]; then
    cp -R "corpus/$t/." "$work/$t/"
  fi
  echo "fuzz: $t for ${seconds}s"
  start=$(date +%s)
  if ! cargo +nightly fuzz run "$t" "$work/$t" -- \
    -max_total_time="$seconds" -rss_limit_mb=2048 -max_len=65536 -timeout=10 \
    -print_final_stats=1 >"$work/$t.log" 2>&1; then
    tail -n 60 "$work/$t.log"
    echo "fuzz: $t FAILED; the input is in fuzz/artifacts/$t/ (reproduce: cd fuzz && cargo +nightly fuzz run $t ARTIFACT)"
    exit 1
  fi
  grep -E '^stat::number_of_executed_units|^Done' "$work/$t.log" | tr '\n' ' ' || true
  echo "($(($(date +%s) - start))s)"
done
echo "fuzz: ${#targets[@]} targets passed"
