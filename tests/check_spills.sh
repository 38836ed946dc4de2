#!/usr/bin/env bash
# Compiles every kernel instantiation (tests/header_check_instantiate.cu) for one architecture
# with ptxas -v and fails if any kernel spills registers to local memory.
# Usage: check_spills.sh <nvcc> <include dir> <sm_XX> <source>
set -euo pipefail
nvcc=$1 inc=$2 arch=$3 src=$4
log=$("$nvcc" -std=c++17 --expt-relaxed-constexpr -I"$inc" -arch="$arch" -Xptxas -v -c "$src" \
      -o /dev/null 2>&1)
kernels=$(grep -c "Compiling entry function" <<< "$log" || true)
spills=$(grep -E "[1-9][0-9]* bytes spill (stores|loads)" <<< "$log" || true)
echo "$arch: $kernels kernels compiled"
if [ "$kernels" -eq 0 ]; then echo "no kernel compiled"; exit 1; fi
if [ -n "$spills" ]; then
  grep -E "Compiling entry function|bytes spill" <<< "$log" | grep -B1 -E "[1-9][0-9]* bytes spill"
  exit 1
fi
echo "$arch: 0 bytes of spill in every kernel"
