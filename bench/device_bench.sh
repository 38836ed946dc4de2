#!/usr/bin/env bash
# On the device machine: the benchmark twice back to back (JSON), the sm_89 table forced on the
# same GPU, and the peers (../shared/peers copied to .peers) in the same call. Uses the bench
# binary carried in .dev/ (or build-dev/ when built there; BENCH=path names another). Logs and JSON go to $OUT.
# BWD=1 adds a backward stage after that one, BWD=only runs the backward stage alone (it fits a
# device call on its own): instnorm_bench --bwd-standard (the :bwd and :train rows; bench_bwd.json
# and .log) and the peers on the same shapes ($OUT/peers_bwd/peers.json and peers.log; the
# peers' :bwd always computes dweight/dbias too, ours only for :affine and GroupNorm rows).
# SWEEP=K (or K:seed; default 0, none) adds instnorm_bench --sweep=K after those: K random
# shapes, each timed against its interleaved copy, into sweep.json and sweep.log (the summary,
# min / median / max of of_copy and the minimum over shapes of >= 64 MiB, ends the log; for
# BENCHMARKS.md: report.py --sweep sweep.json). FWD=0 leaves out the forward stage (the two bench
# runs, sm_89 and peers), so that `FWD=0 SWEEP=64 bash bench/device_bench.sh` runs the sweep alone.
# MOD=1 adds the modulation stage (MOD=only runs it alone): instnorm_bench
# --mod-standard (the :ss / :adain rows, each after the same shape without modulation, forward and
# :bwd, 5 rounds of the list; bench_mod.json and .log), then bench/peers_modulated.py (PyTorch
# eager and torch.compile of the unfused expressions, from the checkout) on the same shapes
# (peers_mod.json and .log), and bench/report.py's modulation table of the two (mod.md). The two
# timeouts (180 s, 360 s) keep MOD=only within one 600 s device call; peers_mod.json is rewritten
# after every row, so a timeout keeps the rows done.
set -u
out=${OUT:-/tmp/out}
mkdir -p "$out"
source bench/device_env.sh > "$out/gpu.txt"
cat "$out/gpu.txt"
bench=${BENCH:-.dev/instnorm_bench}
[ -x "$bench" ] || bench=build-dev/bench/instnorm_bench
bwd=${BWD:-0}
fwd=${FWD:-1}
mod=${MOD:-0}
[ "$bwd" = only ] && fwd=0
[ "$mod" = only ] && fwd=0 && bwd=0
sweep=${SWEEP:-0}
if [ "$fwd" != 0 ]; then
timeout 150 "$bench" --benchmark_out="$out/bench.json" --benchmark_out_format=json > "$out/bench.log" 2>&1
timeout 150 "$bench" --benchmark_out="$out/bench2.json" --benchmark_out_format=json > "$out/bench2.log" 2>&1
timeout 60 "$bench" --arch=sm_89 --shape=112x64x512x512 --shape=112x64x512x512:bf16 \
  --benchmark_filter='^instnorm/' > "$out/sm89.log" 2>&1
grep -E "^instnorm" "$out/sm89.log" | grep -oE "^instnorm/[^/]+|of_copy=[0-9.]+" | paste - -
if [ -f .peers/peers.py ]; then
  (cd "$out" && timeout 400 python3 "$OLDPWD/.peers/peers.py" \
      112x64x512x512 16x64x256x256 1x64x1024x1024 8x256x128x128 4x512x64x64 32x256x32x32 \
      128x512x7x7 112x64x512x512:fp16 112x64x512x512:bf16 8x512x64x64:bf16 \
      2x320x64x64:fp16:gn32:silu 2x640x32x32:fp16:gn32:silu 2x1280x16x16:fp16:gn32:silu \
      8x512x64x64:bf16:gn32:silu 1x128x20x256x256:bf16:gn32:silu \
      112x64x512x512:cl 16x64x256x256:cl 8x256x128x128:cl 32x256x32x32:cl 128x512x7x7:cl \
      112x64x512x512:bf16:cl 8x512x64x64:bf16:cl > peers.log 2>&1)
  tail -24 "$out/peers.log"
fi
fi
if [ "$bwd" != 0 ]; then
  timeout 200 "$bench" --bwd-standard --benchmark_out="$out/bench_bwd.json" \
    --benchmark_out_format=json > "$out/bench_bwd.log" 2>&1
  echo "bench --bwd-standard: exit $?"
  # One line per row: its name and fraction of the copy floor (ERROR: see the log).
  grep -E "^instnorm/" "$out/bench_bwd.log" | awk '{ n = $1; sub("/iterations.*", "", n); f = "ERROR";
    for (i = 2; i <= NF; ++i) if ($i ~ /^of_copy=/) f = $i; print n, f }'
  grep -E "^warning" "$out/bench_bwd.log"
  if [ -f .peers/peers.py ]; then
    # The same shapes as the rows (the binary lists them without touching the GPU).
    shapes=$("$bench" --bwd-standard --benchmark_list_tests | sed -n 's#^instnorm/\([^/]*\)/.*#\1#p')
    mkdir -p "$out/peers_bwd"
    (cd "$out/peers_bwd" && OUT="$out/peers_bwd" timeout 360 python3 "$OLDPWD/.peers/peers.py" \
        $shapes > peers.log 2>&1)
    tail -20 "$out/peers_bwd/peers.log"
  fi
fi
if [ "$mod" != 0 ]; then
  timeout 180 "$bench" --mod-standard --benchmark_out="$out/bench_mod.json" \
    --benchmark_out_format=json > "$out/bench_mod.log" 2>&1
  echo "bench --mod-standard: exit $?"
  grep -E "^warning" "$out/bench_mod.log"
  # Each shape once (the list runs in rounds), as the binary lists them without the GPU.
  shapes=$("$bench" --mod-standard --mod-rounds=1 --benchmark_list_tests |
           sed -n 's#^instnorm/\([^/]*\)/.*#\1#p')
  timeout 360 python3 bench/peers_modulated.py --out "$out/peers_mod.json" $shapes \
    > "$out/peers_mod.log" 2>&1
  echo "peers_modulated.py: exit $?"
  tail -4 "$out/peers_mod.log"
  peers_arg=()
  [ -f "$out/peers_mod.json" ] && peers_arg=(--mod-peers "$out/peers_mod.json")
  python3 bench/report.py --mod "$out/bench_mod.json" ${peers_arg[@]+"${peers_arg[@]}"} \
    --out-md "$out/mod.md" && cat "$out/mod.md"
fi
if [ "$sweep" != 0 ]; then
  timeout 420 "$bench" --sweep="$sweep" --benchmark_out="$out/sweep.json" \
    --benchmark_out_format=json > "$out/sweep.log" 2>&1
  echo "bench --sweep=$sweep: exit $?"
  sed -n '/^sweep of /,$p' "$out/sweep.log"
fi
