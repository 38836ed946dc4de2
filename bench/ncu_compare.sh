#!/usr/bin/env bash
# On the device machine: one launch of a kernel under ncu (the 4th, after three warm-ups; the
# card's clocks left alone) for each bench binary and shape, side by side: time, instructions,
# DRAM bytes, registers, occupancy and the warp stall breakdown. For a change whose A/B moved a
# row: where the time went. Logs in $OUT/ncu-<binary>-<n>.log, the summary on stdout.
# Usage: bash bench/ncu_compare.sh <kernel regex> "<shape> [<shape> ...]" <bench> [<bench> ...]
#   e.g. bash bench/ncu_compare.sh nhwc_on_chip \
#          "2x320x64x64:fp16:gn32:silu:cl 2x320x64x64:fp16:gn32:ss:silu:cl" /tmp/bench_old /tmp/bench_new
set -u
kernel=$1 shapes=$2
shift 2
out=${OUT:-/tmp/out}
mkdir -p "$out"
source bench/device_env.sh > /dev/null
for bin in "$@"; do
  n=0
  for s in $shapes; do
    n=$((n + 1))
    log="$out/ncu-$(basename "$bin")-$n.log"
    timeout 60 ncu --clock-control none --section LaunchStats --section Occupancy \
      --section WarpStateStats \
      --metrics gpu__time_duration.sum,smsp__inst_executed.sum,dram__bytes_read.sum,dram__bytes_write.sum \
      -k "regex:$kernel" --launch-skip 3 --launch-count 1 "$bin" --shape="$s" \
      --benchmark_filter=instnorm > "$log" 2>&1
    echo "== $(basename "$bin") $s"
    grep -E "^ *[a-z_]+__[a-z_.]+ |Registers Per Thread|Achieved Occupancy|Theoretical Occupancy|Warp Cycles Per Issued|Stall" "$log" |
      sed 's/^ *//' | head -20
  done
done
