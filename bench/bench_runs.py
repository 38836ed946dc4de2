"""The JSON runs of instnorm_bench as the device scripts read them (device_ab.sh, plan_probe.sh,
ab_mod_cost.py): files <tag>.<run>.json in one folder, one per binary or variant and run.

A row's time is its median call (the bench's `ms` counter), not real_time (the mean, which a
few slow calls move on rows of tens of microseconds); real_time, converted by its time_unit,
only where a row has no counter. Rows that report an error have no time.
"""
import glob
import json
import os

_MS_PER = {"ns": 1e-6, "us": 1e-3, "ms": 1.0, "s": 1e3}


def call_ms(bm):
    """The row's median call in ms, or None for a row that reports an error."""
    if bm.get("error_occurred"):
        return None
    if "ms" in bm:
        return bm["ms"]
    return bm["real_time"] * _MS_PER[bm.get("time_unit", "ns")]


def benchmarks(directory):
    """(tag, run, benchmark) for every row of every readable <tag>.<run>.json, in file order."""
    for path in sorted(glob.glob(os.path.join(directory, "*.json"))):
        parts = os.path.basename(path).split(".")
        if len(parts) != 3:
            continue
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, ValueError):
            continue  # a run that failed or was cut off
        for bm in data.get("benchmarks", []):
            yield parts[0], parts[1], bm
