#!/usr/bin/env bash
# Builds the host-API fuzz target with clang (libFuzzer + ASan + UBSan) and runs it for a bounded
# time over the corpus in tests/fuzz/corpus (new inputs go to a scratch folder, so the run never
# changes the tree). Usage: bash tests/fuzz/run_fuzz.sh [seconds=60] [build dir=build-fuzz]
set -euo pipefail
cd "$(dirname "$0")/../.."
seconds=${1:-60}
out=${2:-build-fuzz}
cxx=${CLANGXX:-clang++}
mkdir -p "$out/new"
"$cxx" -std=c++17 -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all \
  -Iinclude tests/fuzz/fuzz_host_api.cc -o "$out/fuzz_host_api"
UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
  "$out/fuzz_host_api" -max_total_time="$seconds" -print_final_stats=1 -timeout=10 \
  -rss_limit_mb=4096 -artifact_prefix="$out/" "$out/new" tests/fuzz/corpus 2>&1 | tail -n 25
echo "fuzz: ${seconds}s without a crash, leak, undefined behaviour or violated property"
