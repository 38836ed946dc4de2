#!/usr/bin/env bash
# Here (no GPU): everything a device call carries, in one command, so that the call spends its
# time measuring. Builds
#   build-carry/     a release build (sm_90) of the working tree: tests and benches, the object
#                    files deleted, binaries stripped and the largest gzipped (a carry is at most
#                    64 MiB; `bench/device_check.sh carried` unzips them there);
#   .dev/bench_<name>.gz  instnorm_bench of each NAME=REV given (a detached worktree per
#                    revision, built for sm_90 and stripped), for bench/device_ab.sh and
#                    bench/device_mod_ab.sh; unzip there with gunzip -c;
#   .dev/lib/        Google Benchmark's and the CUDA runtime's shared libraries of this machine,
#                    which the carried binaries link (bench/device_env.sh puts them on the path).
# Usage: bash bench/make_carry.sh [--no-tree] [NAME=REV ...]
#   e.g. bash bench/make_carry.sh base=a0a6a37 main=HEAD
# then run(carry=["build-carry", ".dev"]). On 2 cores: ~10 min for the tree, ~1-2.5 min per
# bench (all run side by side where they can). Prints the carry's size.
set -euo pipefail
cd "$(dirname "$0")/.."
tree=1
if [ "${1:-}" = --no-tree ]; then tree=0; shift; fi
mkdir -p .dev/lib
cp -a /usr/lib/x86_64-linux-gnu/libbenchmark.so.1* .dev/lib/
cudart=$(ldconfig -p | sed -n 's/.*libcudart.so.13 .*=> //p' | head -1)
[ -n "$cudart" ] || cudart=$(ls /usr/local/cuda/lib64/libcudart.so.13 2> /dev/null || true)
[ -n "$cudart" ] && cp -L "$cudart" .dev/lib/
pids=()
for spec in "$@"; do
  name=${spec%%=*} rev=${spec#*=}
  wt=$(mktemp -d "/tmp/carry-$name.XXXX")
  git worktree add -f --detach "$wt" "$rev" -q
  (cmake -S "$wt" -B "$wt/build" -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90 \
     > "$wt/configure.log" 2>&1 &&
   cmake --build "$wt/build" --target instnorm_bench > "$wt/build.log" 2>&1 &&
   strip -o ".dev/bench_$name" "$wt/build/bench/instnorm_bench" && gzip -f ".dev/bench_$name" &&
   git worktree remove --force "$wt" && echo "bench_$name.gz: $(git rev-parse --short "$rev")") ||
    { echo "bench $name ($rev) failed: see $wt" >&2; exit 1; } &
  pids+=($!)
done
if [ "$tree" = 1 ]; then
  cmake -S . -B build-carry -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90 > /dev/null
  cmake --build build-carry -j "$(nproc)" > build-carry.log 2>&1 ||
    { tail -20 build-carry.log; exit 1; }
  find build-carry -name '*.o' -delete
  rm -rf build-carry/CMakeFiles/*/CompilerIdCUDA/tmp
  find build-carry -type f -perm -u+x -size +500k | while read -r f; do
    if file "$f" | grep -q ELF; then strip "$f" && gzip -f "$f"; fi
  done
  echo "build-carry: $(git rev-parse --short HEAD)$(git diff --quiet || echo ' + uncommitted changes')"
fi
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=1; done
du -sh --apparent-size build-carry .dev 2> /dev/null || true
exit $rc
