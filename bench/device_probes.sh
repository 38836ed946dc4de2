#!/usr/bin/env bash
# On the device machine: the plan probes of docs/perf-notes.md ("The NCHW backward's channel
# after the slice's loads, and three plan probes"), each through bench/plan_probe.sh (variant 1
# the planner's own plan), logs in $OUT/probe-<name>/probe.txt. About 3 minutes in all.
# Usage: bash bench/device_probes.sh <bench> [runs]
set -u
bin=$1 runs=${2:-3}
out=${OUT:-/tmp/out}
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$out"
probe() {  # name, shapes, variants...
  local name=$1 shapes=$2
  shift 2
  OUT="$out/probe-$name" bash "$here/plan_probe.sh" "$bin" "$runs" "$shapes" "$@" \
    > "$out/probe-$name.log" 2>&1
  cat "$out/probe-$name/probe.txt"
}
# 32-thread split blocks: 16 planes in flight per SM where 64-thread ones keep 8.
probe bwd-small "--shape=8x512x64x64:bf16:bwd --shape=8x512x64x64:bf16:adain:bwd \
  --shape=4x512x64x64:bwd --shape=32x256x32x32:bwd" "" "--plan=2,32,5,1" "--plan=2,64,5,1"
# Split backward: four blocks per SM (G 2) and half the blocks per plane (512 threads).
probe bwd-split "--shape=16x64x128x128:affine:bwd --shape=112x64x512x512:bwd \
  --shape=1x64x1024x1024:bwd --shape=16x64x256x256:bwd" "" "--plan=2,512,5,0" "--plan=2,128,5,0"
# Forward of 4096-element planes: block plans of 64 and 128 threads, a 64-thread sub-warp block.
probe fwd-small "--shape=8x512x64x64:bf16 --shape=4x512x64x64 --shape=32x256x32x32" \
  "" "--plan=1,64,8,0" "--plan=0,64,16,0" "--plan=1,128,4,0"
