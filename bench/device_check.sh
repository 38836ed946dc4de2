#!/usr/bin/env bash
# On the device machine: build with the machine's own GoogleTest and run the whole ctest suite
# (step "test"), then compute-sanitizer (memcheck, racecheck, synccheck, initcheck) over every
# strategy, type and feature and ncu's DRAM bytes for the headline shape (step "sanitize").
# Logs go to $OUT. Usage: bash bench/device_check.sh [test|sanitize|all|carried|package]
# "package": JIT-build python/instnorm_torch and run its pytest in four parallel processes
# (~120 s build, ~170 s tests), one log per file group in $OUT.
# "carried": run the ctest suite of a release build made on another machine and carried in
# build-carry/ (its absolute paths are rewritten to this checkout): ~80 s of device time instead
# of a build here. Make it with
#   cmake -S . -B build-carry -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90 &&
#   cmake --build build-carry -j && find build-carry -name '*.o' -delete
# and pass carry=["build-carry", ".dev"] (.dev/lib: libbenchmark.so.1*, libcudart.so.13), or
# run bench/make_carry.sh, which also strips and gzips the largest binaries (unzipped here).
# "carried-all": the carried build's ctest suite, then the sanitize step on its binaries.
# NCU=0 leaves out the sanitize step's ncu DRAM-bytes check.
set -u
step=${1:-all}
out=${OUT:-/tmp/out}
mkdir -p "$out"
source bench/device_env.sh
run_ctest() {  # build dir: the whole suite, its log in $OUT, its summary printed; ctest's status
  (cd "$1" && timeout 420 ctest -j 4 --output-on-failure > "$out/ctest.log" 2>&1)
  local rc=$?
  grep -E "tests passed|tests failed|Failed|\*\*\*|Timeout" "$out/ctest.log" | tail -12
  return $rc
}
bdir=build-dev
if [ "$step" = carried ] || [ "$step" = carried-all ]; then
  bdir=build-carry
  find build-carry -name '*.gz' -exec gunzip -f {} +  # bench/make_carry.sh zips the largest
  here=$(pwd)
  src=$(sed -n 's/^CMAKE_HOME_DIRECTORY:INTERNAL=//p' build-carry/CMakeCache.txt)
  cm=$(sed -n 's/^CMAKE_COMMAND:INTERNAL=//p' build-carry/CMakeCache.txt)
  [ "$src" = "$here" ] || grep -rlI "$src" build-carry | xargs sed -i "s#$src#$here#g"
  [ "$cm" = "$(command -v cmake)" ] || grep -rlI "$cm" build-carry | xargs sed -i "s#$cm#$(command -v cmake)#g"
  run_ctest build-carry
  [ "$step" = carried ] && exit
  step=sanitize
fi
if [ "$step" = package ]; then
  (cd python && MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0 timeout 240 python3 -c \
    "import sys; sys.path.insert(0, '.'); import instnorm_torch as it; it._build.load()" \
    > "$out/package-build.log" 2>&1) || { tail -30 "$out/package-build.log"; exit 1; }
  pids=()
  for group in test_fuzz_args test_modulation test_backward "test_instnorm_torch test_package_edges"; do
    log="$out/pytest-${group%% *}.log"
    files=$(for f in $group; do printf 'tests/%s.py ' "$f"; done)
    (cd python && timeout 330 python3 -m pytest -q -p no:cacheprovider $files > "$log" 2>&1) &
    pids+=($!)
  done
  rc=0
  for p in "${pids[@]}"; do wait "$p" || rc=1; done
  for log in "$out"/pytest-*.log; do echo "$(basename "$log"): $(tail -1 "$log")"; done
  exit $rc
fi
if [ "$step" = test ] || [ "$step" = all ]; then
  cmake -S . -B build-dev -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90 \
    > "$out/configure.log" 2>&1 || { tail -20 "$out/configure.log"; exit 1; }
  cmake --build build-dev -j 16 > "$out/build.log" 2>&1 || { grep -m 20 error "$out/build.log"; exit 1; }
  run_ctest build-dev
fi
[ "$step" = sanitize ] || [ "$step" = all ] || exit 0
dev=$bdir/tests/test_device
rel=$bdir/tests/test_reliability
sizes='S/GpuSizes.*/1:S/GpuSizes.*/49:S/GpuSizes.*/1024:S/GpuSizes.*/1025:S/GpuSizes.*/4096:S/GpuSizes.*/16385:S/GpuSizes.*/65536:S/GpuSizes.*/65537'
features='Gpu.ManyTinyPlanes:Gpu.CallerWorkspaceMatchesSimpleCall:GpuOptions.*:GpuNhwc.*'
hostile='Alignment.*:Aliasing.*:Extreme.NanOrInf*:Extreme.Nhwc*:Extreme.EpsZero*:Graph.*'
san() {  # tool, log name, binary, filter
  timeout 200 compute-sanitizer --tool "$1" --print-limit 5 "$3" --gtest_brief=1 \
    --gtest_filter="$4" > "$out/$2.log" 2>&1
  echo "$2: $(grep -hE "ERROR SUMMARY|RACECHECK SUMMARY" "$out/$2.log" | tail -1) \
$(grep -hE "PASSED|FAILED" "$out/$2.log" | tr '\n' ' ')"
}
san memcheck memcheck "$dev" "$sizes:$features"
san memcheck memcheck-hostile "$rel" "$hostile"
san memcheck memcheck-backward $bdir/tests/test_backward 'BackwardDevice.EveryStrategyFp32:BackwardDevice.ChannelsLastBf16'
san memcheck memcheck-modulation $bdir/tests/test_modulation 'ModulationDevice.EveryStrategyFp16'
san racecheck racecheck-backward $bdir/tests/test_backward 'BackwardDevice.EveryStrategyBf16:BackwardDevice.ChannelsLastFp32'
san initcheck initcheck-backward $bdir/tests/test_backward 'BackwardDevice.EveryStrategyFp32:BackwardDevice.ChannelsLastFp16' 
# The on-chip channels-last backward (forced by these tests): its shared-memory table, arrays and
# rows, and its exchange.
san memcheck memcheck-bwd-on-chip $bdir/tests/test_backward 'BackwardDevice.ChannelsLastOnChipFp16'
san racecheck racecheck-bwd-on-chip $bdir/tests/test_backward 'BackwardDevice.ChannelsLastOnChipFp32'
san synccheck synccheck-bwd-on-chip $bdir/tests/test_backward 'BackwardDevice.ChannelsLastOnChipBf16' 
san racecheck racecheck "$dev" 'S/GpuSizes.*/49:S/GpuSizes.*/4096:S/GpuSizes.*/65536:S/GpuSizes.*/65537:GpuOptions.GroupNormAffineSilu:GpuNhwc.OnChipSlicesAndExchange'
san synccheck synccheck "$dev" "S/GpuSizes.*/49:S/GpuSizes.*/4096:S/GpuSizes.*/65537:$features"
san initcheck initcheck "$dev" "S/GpuSizes.*/49:S/GpuSizes.*/4096:S/GpuSizes.*/65537:$features"
[ "${NCU:-1}" = 0 ] && exit 0  # NCU=0: the sanitizers only
timeout 120 ncu --clock-control none --metrics dram__bytes_read.sum,dram__bytes_write.sum,gpu__time_duration.sum \
  -k regex:forward_kernel --launch-skip 3 --launch-count 1 \
  $bdir/bench/instnorm_bench --shape=112x64x512x512 --benchmark_filter=instnorm > "$out/ncu.log" 2>&1
grep -E "dram__bytes|gpu__time" "$out/ncu.log"
timeout 120 ncu --clock-control none --metrics dram__bytes_read.sum,dram__bytes_write.sum,gpu__time_duration.sum \
  -k regex:nhwc_on_chip --launch-skip 3 --launch-count 1 \
  $bdir/bench/instnorm_bench --shape=112x64x512x512:cl --benchmark_filter=instnorm > "$out/ncu-nhwc.log" 2>&1
grep -E "dram__bytes|gpu__time" "$out/ncu-nhwc.log"
