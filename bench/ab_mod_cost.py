#!/usr/bin/env python3
"""The modulation's cost per binary from the JSON runs of bench/device_ab.sh (its $OUT/ab/).

    python3 bench/ab_mod_cost.py <dir of A.1.json, B.1.json, ...>

For each modulated row (:ss or :adain) and each binary (A, B, C): per run, the row's median call
over that of the same shape without modulation in the same run, then the median over runs, as
a percentage. Rows whose plain shape was not run are left out.
"""
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_runs import benchmarks, call_ms  # noqa: E402


def load(directory):
    """{(side, run): {row name without the 'instnorm/' prefix: median call in ms}}."""
    runs = {}
    for side, run, bm in benchmarks(directory):
        rows = runs.setdefault((side, run), {})
        t = call_ms(bm)
        if t is not None:
            rows[bm["name"].split("/", 1)[1]] = t
    return runs


def plain_of(name):
    return name.replace(":ss", "").replace(":adain", "")


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    runs = load(sys.argv[1])
    sides = sorted({side for side, _ in runs})
    modulated = sorted({n for rows in runs.values() for n in rows if n != plain_of(n)})
    print(f"{'modulated row (cost: median over runs of modulated / plain)':62s} "
          + " ".join(f"{s:>8s}" for s in sides))
    for name in modulated:
        cells = []
        for side in sides:
            ratios = [rows[name] / rows[plain_of(name)] for (s, _), rows in runs.items()
                      if s == side and name in rows and plain_of(name) in rows]
            cells.append(f"{(statistics.median(ratios) - 1) * 100:+7.1f}%" if ratios
                         else "     n/a")
        print(f"{name.split('/')[0]:62s} " + " ".join(cells))


if __name__ == "__main__":
    main()
