#!/usr/bin/env bash
# On the device machine: the same rows under several sets of planner flags (--plan=...,
# --split-smem=..., --arch=...), one binary, alternating variant 1, 2, ..., K, 1, 2, ... `runs`
# times; prints each row's median over runs of its median call time (the `ms` counter) per
# variant, and its ratio to the first variant, into $OUT/probe.txt.
# Usage: bash bench/plan_probe.sh <bench> <runs> "<shape args>" "<variant 1 flags>" "<variant 2>" ...
# An empty string is the planner's own plan. A variant the planner refuses shows as n/a.
set -u
bin=$1 runs=$2 shapes=$3
shift 3
out=${OUT:-/tmp/out}
tmp=$(mktemp -d)
mkdir -p "$out"
source bench/device_env.sh > /dev/null
k=0
for i in $(seq 1 "$runs"); do
  k=0
  for v in "$@"; do
    k=$((k + 1))
    # shellcheck disable=SC2086  # the shape and variant strings are word lists
    timeout 120 "$bin" --benchmark_filter='^instnorm/' --benchmark_format=json $shapes $v \
      > "$tmp/$k.$i.json" 2> "$tmp/$k.$i.err" || echo "variant $k run $i failed" >&2
  done
done
printf '%s\n' "$@" > "$tmp/variants.txt"
python3 - "$tmp" "$runs" "$k" "$(cd "$(dirname "$0")" && pwd)" << 'PY' | tee "$out/probe.txt"
import statistics, sys
tmp, runs, k = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
sys.path.insert(0, sys.argv[4])
from bench_runs import benchmarks, call_ms
variants = open(f"{tmp}/variants.txt").read().split("\n")[:k]
times, plans = {}, {}
for tag, _, bm in benchmarks(tmp):
    t = call_ms(bm)
    if t is None:
        continue
    v = int(tag)
    times.setdefault(bm["name"], {}).setdefault(v, []).append(t)
    plans[(bm["name"], v)] = bm.get("label", "")
for v, flags in enumerate(variants, 1):
    print(f"variant {v}: {flags or '(planner)'}")
for name, t in times.items():
    base = statistics.median(t[1]) if 1 in t else None
    print(name)
    for v in range(1, k + 1):
        if v not in t:
            print(f"  {v}: n/a")
            continue
        m = statistics.median(t[v])
        ratio = f"{m / base:6.3f}" if base else "   n/a"
        print(f"  {v}: {m * 1e3:9.2f} us  x{ratio}  {plans.get((name, v), '')}")
PY
