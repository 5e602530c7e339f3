#!/usr/bin/env bash
# Coverage-guided fuzzing of the parsers and decoders (fuzz/, see fuzz/README.md):
# builds every cargo-fuzz target (libFuzzer + AddressSanitizer, debug assertions on)
# with the stable toolchain, then runs each one, one at a time, from a scratch copy of
# its committed seeds (fuzz/seeds/<target>/; never written to).
#
# Usage: tests/fuzz-smoke.sh [--long] [TARGET...]
#   (default)  smoke: each target for FUZZ_SECONDS (20) seconds
#   --long     the documented long run: each target to FUZZ_RUNS (10,000,000)
#              executions, under `nice -n 10`; FUZZ_MAX_TIME (seconds, 0 = none) caps
#              each target's wall time
# FUZZ_SANITIZER: address (default; AddressSanitizer, which includes LeakSanitizer)
#   or leak (LeakSanitizer only: about twice the executions per second, for the long
#   runs; panics, debug assertions, leaks, timeouts and OOMs are caught the same way).
#   Each sanitizer builds into its own directory (fuzz/target, fuzz/target-leak).
# Fails on any crash, panic, leak, per-input timeout (FUZZ_TIMEOUT, 10 s) or
# out-of-memory (FUZZ_RSS_MB, 2048); the input that did it is left in
# target/fuzz/artifacts/<target>/. Prints executions, exec/s, peak RSS, corpus size
# and wall time per target. Corpora and logs: target/fuzz/{corpus,logs}/<target>/.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

long=0
if [ "${1:-}" = "--long" ]; then
  long=1
  shift
fi
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  targets=(route sigv4 xks_request kms_request kms_blob config)
fi

# cargo-fuzz, pinned and cached under target/ (gitignored, survives between runs).
tools="$root/target/tools"
export PATH="$tools/bin:$PATH"
if ! cargo fuzz --version 2>/dev/null | grep -q '^cargo-fuzz 0\.13\.2$'; then
  echo "==> installing cargo-fuzz 0.13.2 into $tools"
  cargo install --locked --quiet --root "$tools" cargo-fuzz@0.13.2
fi
# libfuzzer-sys compiles libFuzzer (C++); AddressSanitizer's runtime ships with rustc.
command -v c++ >/dev/null || tests/apt-install.sh g++

# cargo-fuzz passes nightly-only flags (-Zsanitizer=address, -Cpasses=sancov-module);
# RUSTC_BOOTSTRAP=1 lets the stable compiler accept them. 16 codegen units instead of
# cargo-fuzz's default 1: the cold build is about twice as fast, the runs barely slower.
export RUSTC_BOOTSTRAP=1
sanitizer=${FUZZ_SANITIZER:-address}
target_dir="$root/fuzz/target"
[ "$sanitizer" = address ] || target_dir="$root/fuzz/target-$sanitizer"
started=$SECONDS
echo "==> building the fuzz targets (sanitizer: $sanitizer)"
cargo fuzz build --fuzz-dir fuzz --debug-assertions --codegen-units 16 \
  --sanitizer "$sanitizer" --target-dir "$target_dir"
echo "==> built in $((SECONDS - started)) s"

bin_dir="$target_dir/x86_64-unknown-linux-gnu/release"
work="$root/target/fuzz"
failed=()
summary=()
stat() { sed -n "s/^stat::$1: *//p" "$log" | tail -1; }
for t in "${targets[@]}"; do
  corpus="$work/corpus/$t" artifacts="$work/artifacts/$t/" log="$work/logs/$t.log"
  rm -rf "$corpus" "$artifacts"
  mkdir -p "$corpus" "$artifacts" "$(dirname "$log")"
  cp fuzz/seeds/"$t"/* "$corpus"/
  args=(-timeout="${FUZZ_TIMEOUT:-10}" -rss_limit_mb="${FUZZ_RSS_MB:-2048}"
    -artifact_prefix="$artifacts" -print_final_stats=1)
  runner=()
  if [ "$long" = 1 ]; then
    args+=(-runs="${FUZZ_RUNS:-10000000}" -max_total_time="${FUZZ_MAX_TIME:-0}")
    runner=(nice -n 10)
  else
    args+=(-max_total_time="${FUZZ_SECONDS:-20}")
  fi
  echo "==> fuzzing $t"
  t0=$SECONDS rc=0
  "${runner[@]}" "$bin_dir/$t" "${args[@]}" "$corpus" >"$log" 2>&1 || rc=$?
  wall=$((SECONDS - t0))
  line=$(printf '%-12s %12s execs %8s exec/s  peak RSS %5s MB  corpus %5s  %5s s' \
    "$t" "$(stat number_of_executed_units)" "$(stat average_exec_per_sec)" \
    "$(stat peak_rss_mb)" "$(find "$corpus" -type f | wc -l)" "$wall")
  if [ "$rc" -ne 0 ]; then
    line+="  FAILED (exit $rc, log $log)"
    failed+=("$t")
    grep -E -m 20 'panicked|ERROR: libFuzzer|SUMMARY|Test unit written' "$log" || true
  fi
  echo "$line"
  summary+=("$line")
done

echo "==> fuzz summary ($((SECONDS - started)) s in all)"
printf '  %s\n' "${summary[@]}"
if [ ${#failed[@]} -gt 0 ]; then
  echo "FAILED fuzz targets: ${failed[*]}" >&2
  exit 1
fi
