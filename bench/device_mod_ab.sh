#!/usr/bin/env bash
# On the device machine: same-run A/B of two instnorm_bench binaries over the modulation rows
# (the shapes of --mod-standard: each :ss / :adain row and its plain shape, forward and :bwd)
# plus any further --shape arguments, through bench/device_ab.sh (alternating A, B, A, B, ...),
# then each binary's cost of the modulation: per round, a modulated row's median call over its
# plain shape's, and the median of that over rounds (bench/ab_mod_cost.py). A change aimed at
# the modulation's cost is judged by that column, and by B/A on the plain rows (device_ab's
# table), in one call. Logs in $OUT: ab.txt (device_ab's table), ab/ (each run's JSON),
# mod_cost.txt (an earlier $OUT/ab is replaced).
# Usage: bash bench/device_mod_ab.sh <bench A> <bench B> [runs] [--shape=... ...]
#   e.g. bash bench/device_mod_ab.sh .dev/bench_A .dev/bench_B 7 \
#          --shape=16x64x128x128:affine --shape=8x128x64x64:bf16:cl:affine:bwd
# AB_BUDGET (seconds) as in device_ab.sh.
set -u
a=$1 b=$2 runs=${3:-7}
shift 3 2> /dev/null || shift $#
out=${OUT:-/tmp/out}
here=$(cd "$(dirname "$0")" && pwd)
# The binary lists the shapes without touching the GPU.
shapes=$("$a" --mod-standard --mod-rounds=1 --benchmark_list_tests |
  sed -n 's#^instnorm/\([^/]*\)/.*#--shape=\1#p')
[ -n "$shapes" ] || { echo "no --mod-standard shapes from $a" >&2; exit 1; }
# $OUT/ab must hold this A/B's runs only: the cost reads every JSON file there.
rm -rf "$out/ab"
# shellcheck disable=SC2086  # one word per shape
bash "$here/device_ab.sh" "$a" "$b" "$runs" $shapes "$@"
python3 "$here/ab_mod_cost.py" "$out/ab" | tee "$out/mod_cost.txt"
