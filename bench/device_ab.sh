#!/usr/bin/env bash
# On the device machine: same-run A/B of two instnorm_bench binaries over the standard rows (or
# the --shape arguments given after the two binaries), alternating A, B, A, B, ... `runs` times
# each; prints each row's median over runs of its median call time, A and B, and B/A, and
# writes them to $OUT/ab.txt, with each binary's spread over its runs and whether its runs
# and A's overlap (a ratio of medians over overlapping runs decides little).
# Usage: bash bench/device_ab.sh <bench A> <bench B> [runs] [bench args...]
# AB_BUDGET (seconds, default 400): no new A/B round starts after it; the summary then covers
# the rounds that ran. AB_C (a third binary, optional) joins the rotation (A, B, C, A, ...) and
# gets a C/A column: a candidate and the current version against one baseline in one call.
# AB_B_ARGS: flags for B's runs only, so that one binary can be A and B (a knob's A/B:
# AB_B_ARGS=--nhwc-bwd-on-chip=1 bash bench/device_ab.sh bench bench 5 --shape=...).
# Every binary first runs once untimed (AB_WARMUP=0 skips it): on a machine
# that just came up, the first A/B of a call timed the same binary up to 30% slower on some rows
# than one a minute later (docs/perf-notes.md, 2026-12-05).
set -u
a=$1 b=$2 c=${AB_C:-} runs=${3:-5}
shift 3 2> /dev/null || shift $#
out=${OUT:-/tmp/out}
tmp=$(mktemp -d)
mkdir -p "$out"
if [ "${AB_WARMUP:-1}" != 0 ]; then
  for bin in "$a" "$b" $c; do
    timeout 200 "$bin" --benchmark_filter='^instnorm/' "$@" > /dev/null 2>&1
  done
  # B's own flags warmed too, where A and B are one binary.
  if [ -n "${AB_B_ARGS:-}" ]; then
    read -r -a warm <<< "$AB_B_ARGS"
    timeout 200 "$b" --benchmark_filter='^instnorm/' "$@" "${warm[@]}" > /dev/null 2>&1
  fi
fi
start=$SECONDS
done_runs=0
for i in $(seq 1 "$runs"); do
  [ $((SECONDS - start)) -lt "${AB_BUDGET:-400}" ] || break
  done_runs=$i
  for side in A B ${c:+C}; do
    bin=$a
    [ "$side" = B ] && bin=$b
    [ "$side" = C ] && bin=$c
    extra=()
    [ "$side" = B ] && [ -n "${AB_B_ARGS:-}" ] && read -r -a extra <<< "$AB_B_ARGS"
    timeout 200 "$bin" --benchmark_filter='^instnorm/' --benchmark_format=json "$@" \
      ${extra[@]+"${extra[@]}"} > "$tmp/$side.$i.json" 2> /dev/null || echo "run $side $i failed" >&2
  done
done
echo "A/B: $done_runs rounds in $((SECONDS - start)) s"
mkdir -p "$out/ab" && cp "$tmp"/*.json "$out/ab/" 2> /dev/null  # each run's JSON, A.i and B.i
python3 - "$tmp" "$done_runs" "$(cd "$(dirname "$0")" && pwd)" << 'PY' | tee "$out/ab.txt"
import statistics, sys
tmp, runs = sys.argv[1], int(sys.argv[2])
sys.path.insert(0, sys.argv[3])
from bench_runs import benchmarks, call_ms
times = {}
for side, _, bm in benchmarks(tmp):
    t = call_ms(bm)
    if t is not None:
        times.setdefault(bm["name"], {}).setdefault(side, []).append(t)
has_c = any("C" in t for t in times.values())
def sep(x, a):
    """'>' where every run of x was slower than every run of A, '<' faster, '~' where they
    overlap (then the ratio of medians alone decides nothing: channels-last rows flip between
    modes from run to run)."""
    return ">" if min(x) > max(a) else "<" if max(x) < min(a) else "~"
def spread(x):
    return f"{(max(x) / min(x) - 1) * 100:5.1f}%"
head = f"{'row':58s} {'A ms':>9s} {'B ms':>9s} {'B/A':>7s}   {'A sprd':>6s} {'B sprd':>6s}"
print(head + (f" {'C ms':>9s} {'C/A':>7s}   {'C sprd':>6s}" if has_c else ""))
worst, worst_c = 0.0, 0.0
for name, t in times.items():
    if "A" not in t or "B" not in t:
        continue
    ma, mb = statistics.median(t["A"]), statistics.median(t["B"])
    worst = max(worst, mb / ma)
    line = (f"{name[:58]:58s} {ma:9.4f} {mb:9.4f} {mb / ma:7.3f} {sep(t['B'], t['A'])} "
            f"{spread(t['A']):>6s} {spread(t['B']):>6s}")
    if "C" in t:
        mc = statistics.median(t["C"])
        worst_c = max(worst_c, mc / ma)
        line += f" {mc:9.4f} {mc / ma:7.3f} {sep(t['C'], t['A'])} {spread(t['C']):>6s}"
    print(line)
print(f"slowest row B/A: {worst:.3f} (medians of {runs} alternating runs each)")
if has_c:
    print(f"slowest row C/A: {worst_c:.3f}")
print("after a ratio: > every run slower than every run of A, < every run faster, ~ the runs "
      "overlap; sprd: (slowest / fastest run) - 1 of each binary")
PY
