"""Argument fuzz of instnorm_torch against PyTorch (needs a GPU; skips without one).

Each generated call (devices, dtypes, shapes, layouts, None/wrong parameters, eps, momentum,
groups, activations) must do one of:
  - refuse, when the package documents a refusal (activation, eps, momentum, a tensor argument
    on another device, of a non-floating dtype or not 1-D with C elements, only one running
    statistic);
  - raise, when PyTorch's op raises on the same arguments;
  - otherwise run: output shape and dtype as PyTorch's op, values (and updated running
    statistics) within the bounds of the float64 reference, F.instance_norm / F.group_norm on
    float64 copies plus the activation (float32: 1e-5 + 1e-6 |ref|; float16/bfloat16: one ulp
    of the dtype at |ref| + 2^-20), or within the same bounds of PyTorch's own result.
A raising call leaves the running statistics as they were; x is never written; after every
call the CUDA context still works (a synchronize and a small op).

Examples run in child processes, a batch each (hypothesis, seeded with the batch number, no
shrinking), so that a crash fails its batch only and names the example it was running:

    INSTNORM_FUZZ_EXAMPLES=2000 python3 -m pytest python/tests/test_fuzz_args.py -s
    python3 python/tests/test_fuzz_args.py --batch 7 --examples 150     # one batch again

INSTNORM_FUZZ_EXAMPLES (default 300), INSTNORM_FUZZ_BATCH (examples per child, 150),
INSTNORM_FUZZ_JOBS (children at once, 4); INSTNORM_FUZZ_SUMMARY names a file for the summary.
"""
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "float64": torch.float64, "int32": torch.int32, "int64": torch.int64,
          "bool": torch.bool, "complex64": torch.complex64}
FLT_MAX = 3.4028234663852886e38
ACTIVATIONS = (None, "none", "relu", "silu")
# (scale, offset) of x's values per dtype, or "constant".
VALUES = {
    "float32": [(1.0, 0.0)] * 4 + [(1e-3, 0.0), (1e3, 0.0), (1.0, 100.0), (1e-2, 10.0),
                                   (1.0, 1e4), "constant"],
    "float16": [(1.0, 0.0)] * 4 + [(1e-2, 0.0), (30.0, 0.0), (1.0, 100.0), (0.1, 1000.0),
                                   "constant"],
    "bfloat16": [(1.0, 0.0)] * 4 + [(1e-2, 0.0), (1e3, 0.0), (1.0, 100.0), (10.0, 1e4),
                                    "constant"],
}
VALUES["float64"] = VALUES["float32"]
VALUES["int32"] = [(3.0, 0.0)]


# ---- the cases (hypothesis) ------------------------------------------------------------------

def cases():
    """Half of the cases draw every knob from its valid values, a third put one knob (any) at
    an invalid value too, the rest let every knob take any value."""
    from hypothesis import strategies as st

    nan, inf = float("nan"), float("inf")
    knobs = {  # name: (valid values, further values), repeats weigh a value up
        "op": (["instance", "group"], []),
        "xdev": (["cuda"] * 6 + ["cpu"], []),
        "xdtype": (["float32"] * 3 + ["float16"] * 2 + ["bfloat16"] * 2 + ["float64"], ["int32"]),
        "rank": ([0, 1, 1, 2, 2, 2, 3, 3], ["1d"]),
        "layout": (["contiguous"] * 4 + ["channels_last", "sliced", "transposed", "offset",
                                         "expanded", "nc_swapped"], []),
        "pdev": (["x"], ["cpu", "cuda"]),
        "pdtype": (["same"] * 4 + ["float32"] * 3 + ["float16", "bfloat16", "float64"],
                   ["int64", "int32", "bool", "complex64"]),
        "pshape": (["ok"], ["short", "long", "2d", "0d"]),
        "playout": (["contiguous"] * 4 + ["strided", "offset"], []),
        "stats": (["none", "both", "both"], ["mean", "var"]),
        "use_input_stats": ([True, True, False], []),
        "momentum": ([0.1, 0.1, 0.0, 1.0, 0.5], [-0.1, 1.5, nan, inf]),
        "groups": (["valid"], [0, -1, "C+1", "2C", 3, 7]),
        "eps": ([1e-5] * 4 + [1e-3, 0.1, 1.0, 0.0, 1e-12, 1e-50], [-1e-5, -1.0, nan, inf, -inf,
                                                                   1e39]),
        "activation": ([None, None, "none", "relu", "silu", "silu"], ["gelu", "Relu", ""]),
    }
    faulty = [k for k, (_, more) in knobs.items() if more]

    @st.composite
    def case(draw):
        mode = draw(st.sampled_from(["valid"] * 3 + ["one"] * 2 + ["any"]))
        bad = draw(st.sampled_from(faulty)) if mode == "one" else None

        def knob(name):
            valid, more = knobs[name]
            wide = mode == "any" or name == bad
            return draw(st.sampled_from(valid + more if wide and more else valid))

        c = {"op": knob("op"), "xdev": knob("xdev"), "xdtype": knob("xdtype")}
        rank = knob("rank")
        n = draw(st.sampled_from([0, 1, 1, 2, 2, 3, 4, 7]))
        ch = draw(st.sampled_from([0, 1, 1, 2, 3, 4, 5, 6, 8, 12, 16, 31, 32, 33, 64, 96, 128,
                                   320, 512, 1024, 4096]))
        if rank == "1d":
            shape = draw(st.sampled_from([[], [ch]]))
        else:
            dims = [draw(st.sampled_from([0, 1, 1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33,
                                          64, 65, 100, 128, 255, 256, 1000, 1024, 4096]))
                    for _ in range(rank)]
            limit = draw(st.sampled_from([1 << 10, 1 << 12, 1 << 12, 1 << 14, 1 << 16, 1 << 18]))
            while n * ch * math.prod(dims) > limit:  # halve the largest spatial size, then N
                big = max(range(len(dims)), key=lambda i: dims[i]) if dims else None
                if big is not None and dims[big] > 1:
                    dims[big] //= 2
                elif n > 1:
                    n //= 2
                else:
                    break
            shape = [n, ch] + dims
        c["shape"] = shape
        c["layout"] = knob("layout")
        c["values"] = draw(st.sampled_from(VALUES[c["xdtype"]]))

        def param():
            return {"dev": knob("pdev"), "dtype": knob("pdtype"), "shape": knob("pshape"),
                    "layout": knob("playout")}

        c["weight"] = param() if draw(st.booleans()) else None
        c["bias"] = param() if draw(st.booleans()) else None
        if c["op"] == "instance":
            stats = knob("stats")
            c["running_mean"] = param() if stats in ("both", "mean") else None
            c["running_var"] = param() if stats in ("both", "var") else None
            c["use_input_stats"] = knob("use_input_stats")
            c["momentum"] = knob("momentum")
        else:
            g = knob("groups")
            valid = [d for d in range(1, ch + 1) if ch % d == 0] or [1]
            c["groups"] = (draw(st.sampled_from(valid)) if g == "valid" else
                           ch + 1 if g == "C+1" else 2 * ch if g == "2C" else g)
        c["eps"] = knob("eps")
        c["activation"] = knob("activation")
        c["seed"] = draw(st.integers(0, 2 ** 31 - 1))
        return c

    return case()


# ---- building the tensors --------------------------------------------------------------------

def lay_out(v, layout, dtype, dev):
    """v (float64, CPU, logical values) as a tensor of dtype on dev in the given layout."""
    exact = v.dtype == torch.bool or dtype.is_floating_point or dtype.is_complex
    t = (v if exact else v.round()).to(dtype).to(dev)
    d = t.dim()
    if layout == "channels_last" and d in (4, 5):
        return t.contiguous(memory_format=torch.channels_last if d == 4 else torch.channels_last_3d)
    if layout in ("sliced", "strided") and d >= 1:
        big = torch.zeros(t.shape[:-1] + (2 * t.shape[-1],), dtype=dtype, device=dev)
        big[..., ::2] = t
        return big[..., ::2]
    if layout == "transposed" and d >= 4:
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "offset":  # storage one element off (misaligned for vector loads)
        buf = torch.zeros(t.numel() + 1, dtype=dtype, device=dev)
        buf[1:] = t.reshape(-1)
        return buf[1:].view(t.shape)
    if layout == "expanded" and d >= 2 and t.shape[0] > 0:
        return t[:1].expand(t.shape)
    if layout == "nc_swapped" and d >= 2:
        return t.transpose(0, 1).contiguous().transpose(0, 1)
    return t


def build(c):
    g = torch.Generator().manual_seed(c["seed"])
    shape = c["shape"]
    if c["values"] == "constant":
        v = torch.full(shape, 1.5, dtype=torch.float64)
    else:
        scale, offset = c["values"]
        v = torch.randn(shape, generator=g, dtype=torch.float64) * scale + offset
    xdtype = DTYPES[c["xdtype"]]
    x = lay_out(v, c["layout"], xdtype, c["xdev"])
    ch = shape[1] if len(shape) >= 2 else 1
    tensors = {}
    names = ["weight", "bias"] + (["running_mean", "running_var"] if c["op"] == "instance" else [])
    for name in names:
        p = c[name]
        if p is None:
            tensors[name] = None
            continue
        pshape = {"ok": [ch], "short": [ch - 1 if ch > 0 else 1], "long": [ch + 1],
                  "2d": [ch, 1], "0d": []}[p["shape"]]
        pv = torch.randn(pshape, generator=g, dtype=torch.float64)
        if name == "running_var":
            pv = torch.rand(pshape, generator=g, dtype=torch.float64) + 0.5
        dtype = xdtype if p["dtype"] == "same" else DTYPES[p["dtype"]]
        if dtype == torch.bool:
            pv = pv > 0
        dev = c["xdev"] if p["dev"] == "x" else p["dev"]
        tensors[name] = lay_out(pv, p["layout"], dtype, dev)
    return x, tensors


# ---- the oracle ------------------------------------------------------------------------------

def documented_refusal(c, x, tensors):
    """The package's own refusals (README, PyTorch section), written out again here."""
    if c["activation"] not in ACTIVATIONS:
        return "activation"
    if not 0.0 <= c["eps"] <= FLT_MAX:
        return "eps"
    if c["op"] == "instance" and not 0.0 <= c["momentum"] <= 1.0:
        return "momentum"
    if x.dim() >= 2:
        for name, t in tensors.items():
            if t is None:
                continue
            if t.device != x.device:
                return f"{name} device"
            if not t.is_floating_point():
                return f"{name} dtype"
            if t.dim() != 1 or t.shape[0] != x.shape[1]:
                return f"{name} shape"
    if c["op"] == "instance" and ((tensors["running_mean"] is None)
                                  != (tensors["running_var"] is None)):
        return "running statistics pair"
    if (c["op"] == "instance" and x.dim() >= 2 and tensors["running_mean"] is not None
            and tensors["running_mean"].dtype != tensors["running_var"].dtype):
        return "running statistics dtypes"
    return None


def act(y, name):
    return F.relu(y) if name == "relu" else F.silu(y) if name == "silu" else y


def torch_call(c, x, t):
    if c["op"] == "instance":
        y = F.instance_norm(x, t["running_mean"], t["running_var"], t["weight"], t["bias"],
                            c["use_input_stats"], c["momentum"], c["eps"])
    else:
        y = F.group_norm(x, c["groups"], t["weight"], t["bias"], c["eps"])
    return act(y, c["activation"])


def package_call(it, c, x, t):
    if c["op"] == "instance":
        return it.instance_norm(x, t["weight"], t["bias"], t["running_mean"], t["running_var"],
                                c["use_input_stats"], c["momentum"], c["eps"], c["activation"])
    return it.group_norm(x, c["groups"], t["weight"], t["bias"], c["eps"], c["activation"])


def clone_stats(t):
    """Fresh running statistics for one call, with the strides of the originals (clone() would
    make a strided slice contiguous)."""
    def fresh(v):
        return torch.empty_strided(v.size(), v.stride(), dtype=v.dtype, device=v.device).copy_(v)
    return {k: (fresh(v) if v is not None and k.startswith("running") else v) for k, v in t.items()}


def ulp(a, dtype):
    bits, emin = (10, -14) if dtype == torch.float16 else (7, -126)
    _, e = torch.frexp(a)
    e = torch.where(a > 0, e - 1, torch.full_like(e, emin)).clamp_min(emin)
    return torch.pow(2.0, (e - bits).double())


def within(y, ref, dtype):
    """None when |y - ref| is within the bounds everywhere (NaN matching NaN, an infinity the
    same infinity), else a description of the worst element."""
    y, ref = y.detach().double().cpu(), ref.detach().double().cpu()
    if y.shape != ref.shape:
        return f"shape {tuple(y.shape)} vs {tuple(ref.shape)}"
    if y.numel() == 0:
        return None
    if dtype in (torch.float16, torch.bfloat16):
        bound = ulp(ref.abs(), dtype) + 2.0 ** -20
    else:
        bound = 1e-5 + 1e-6 * ref.abs()
    err = (y - ref).abs()
    same = (torch.isnan(y) & torch.isnan(ref)) | (torch.isinf(y) & (y == ref))
    bad = ~same & ~(err <= bound)
    if not bad.any():
        return None
    i = int(torch.where(bad.reshape(-1), err.reshape(-1).nan_to_num(float("inf")),
                        torch.zeros(())).argmax())
    idx = tuple(int(k) for k in torch.unravel_index(torch.tensor(i), y.shape))
    return (f"{int(bad.sum())} elements off, worst at {idx}: expected "
            f"{ref.reshape(-1)[i].item()!r}, got {y.reshape(-1)[i].item()!r} "
            f"(bound {bound.reshape(-1)[i].item():.3g})")


def compare(c, y, ref, torch_y, name):
    """Within the bounds of the float64 reference, or else of PyTorch's own result."""
    dtype = y.dtype
    off = within(y, ref, dtype) if ref is not None else "no reference"
    if off is not None and torch_y is not None and within(y, torch_y, dtype) is None:
        off = None
    return None if off is None else f"{name}: {off}"


def same_bits(a, b):
    return a.shape == b.shape and a.dtype == b.dtype and bool(
        ((a == b) | (torch.isnan(a) & torch.isnan(b)) if a.is_floating_point() else (a == b)).all())


def healthy():
    try:
        torch.cuda.synchronize()
        return torch.ones(1, device="cuda").sum().item() == 1.0
    except Exception:  # noqa: BLE001
        return False


def run_case(it, c):
    """Returns (outcome, detail): outcome in matched, raised, refused, mismatch, broken."""
    x, t = build(c)
    x_before = x.clone()
    refusal = documented_refusal(c, x, t)
    torch_exc, torch_y, torch_t = None, None, None
    if refusal is None:
        torch_t = clone_stats(t)
        try:
            torch_y = torch_call(c, x, torch_t)
        except Exception as e:  # noqa: BLE001
            torch_exc = e
        if not healthy():
            return "broken", f"PyTorch's own op broke the CUDA context ({torch_exc!r})"
    ours = clone_stats(t)
    try:
        y, exc = package_call(it, c, x, ours), None
    except Exception as e:  # noqa: BLE001
        y, exc = None, e
    if not healthy():
        return "broken", f"the CUDA context is broken after the call (raised: {exc!r})"
    if not same_bits(x, x_before):
        return "mismatch", "x was written"
    if exc is not None or refusal is not None or torch_exc is not None:
        if exc is None:
            why = f"documented refusal '{refusal}'" if refusal else f"PyTorch raises {torch_exc!r}"
            return "mismatch", f"ran where it must raise: {why}"
        if refusal is None and torch_exc is None:
            return "mismatch", f"raised where PyTorch does not: {exc!r}"
        for k in ("running_mean", "running_var"):
            if t.get(k) is not None and not same_bits(ours[k], t[k]):
                return "mismatch", f"raised ({exc!r}) after writing {k}"
        return ("refused" if refusal else "raised"), repr(exc)
    if y.shape != torch_y.shape or y.dtype != torch_y.dtype:
        return "mismatch", (f"output {tuple(y.shape)} {y.dtype}, PyTorch's "
                            f"{tuple(torch_y.shape)} {torch_y.dtype}")
    # float64 reference on x's device
    r = {k: (v.detach().clone().double() if v is not None else None) for k, v in t.items()}
    try:
        x64 = x.detach().double()
        if c["op"] == "instance":
            ref = F.instance_norm(x64, r["running_mean"], r["running_var"], r["weight"], r["bias"],
                                  c["use_input_stats"], c["momentum"], c["eps"])
        else:
            ref = F.group_norm(x64, c["groups"], r["weight"], r["bias"], c["eps"])
        ref = act(ref, c["activation"])
    except Exception:  # noqa: BLE001
        ref = None
        r = {k: None for k in r}
    off = compare(c, y, ref, torch_y, "y")
    for k in ("running_mean", "running_var"):
        if off is None and t.get(k) is not None:
            off = compare(c, ours[k], r[k], torch_t[k], k)
    return ("mismatch", off) if off else ("matched", "")


# ---- the child: one batch ----------------------------------------------------------------------

def worker(batch, examples):
    from hypothesis import HealthCheck, Phase, given, seed, settings

    import instnorm_torch as it

    counts = {"examples": 0, "matched": 0, "raised": 0, "refused": 0, "mismatch": 0}
    mismatches = []

    def summary(**extra):
        print("FUZZ " + json.dumps(dict(batch=batch, mismatches=mismatches, **counts, **extra)),
              flush=True)

    @settings(max_examples=examples, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @seed(batch)
    @given(c=cases())
    def body(c):
        k = counts["examples"]
        counts["examples"] += 1
        # The case goes out before it runs, so that a crash leaves its last line behind.
        print(f"case {batch}.{k}: {c}", file=sys.stderr, flush=True)
        try:
            outcome, detail = run_case(it, c)
        except Exception as e:  # noqa: BLE001  (a fault of the harness: reported, not hidden)
            outcome, detail = "mismatch", f"harness error {e!r}"
        if outcome == "broken":
            mismatches.append({"case": f"{batch}.{k}", "args": repr(c), "detail": detail})
            summary(broken=True)
            sys.stdout.flush()
            os._exit(3)
        counts[outcome] += 1
        if outcome == "mismatch":
            mismatches.append({"case": f"{batch}.{k}", "args": repr(c), "detail": detail})

    body()
    summary(broken=False)


# ---- the pytest side -------------------------------------------------------------------------

def _run_batch(b, k):
    t0 = time.time()
    cmd = [sys.executable, os.path.abspath(__file__), "--batch", str(b), "--examples", str(k)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        out, err, rc = p.stdout, p.stderr, p.returncode
    except subprocess.TimeoutExpired as e:  # a hang counts as a crash of its batch
        out, err, rc = e.stdout or "", e.stderr or "", "timeout"
        out, err = (s.decode() if isinstance(s, bytes) else s for s in (out, err))
    lines = [ln for ln in out.splitlines() if ln.startswith("FUZZ ")]
    res = json.loads(lines[-1][5:]) if lines else None
    return b, k, rc, res, err, time.time() - t0


def test_argument_fuzz():
    import pytest

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    pytest.importorskip("hypothesis")
    import instnorm_torch  # noqa: F401  (builds the op once, before the children load it)

    total = int(os.environ.get("INSTNORM_FUZZ_EXAMPLES", "300"))
    per = int(os.environ.get("INSTNORM_FUZZ_BATCH", "150"))
    jobs = int(os.environ.get("INSTNORM_FUZZ_JOBS", "4"))
    batches = [(b, min(per, total - b * per)) for b in range((total + per - 1) // per)]
    agg = {"examples": 0, "matched": 0, "raised": 0, "refused": 0, "mismatch": 0}
    failures, crashes = [], []
    t0 = time.time()
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for b, k, rc, res, err, secs in pool.map(lambda a: _run_batch(*a), batches):
            tail = "\n".join(err.splitlines()[-3:])
            if res is not None:
                for key in agg:
                    agg[key] += res[key]
                failures += res["mismatches"]
            if rc != 0 or res is None or res.get("broken"):
                how = rc if rc == "timeout" else f"signal {-rc}" if rc < 0 else f"exit {rc}"
                crashes.append(f"batch {b} ({k} examples, hypothesis seed {b}): {how}; rerun: "
                               f"python3 {os.path.relpath(__file__)} --batch {b} --examples {k}; "
                               f"last lines:\n{tail}")
            print(f"fuzz batch {b}: {res and res['examples']} examples, "
                  f"{res and res['mismatch']} mismatches, {'crash' if rc else 'ok'}, {secs:.0f} s")
    line = (f"fuzz: {agg['examples']} examples, {agg['matched']} matched, {agg['raised']} raised "
            f"as PyTorch does, {agg['refused']} refused as documented, {len(failures)} "
            f"mismatches, {len(crashes)} crashes ({time.time() - t0:.0f} s)")
    print(line)
    if os.environ.get("INSTNORM_FUZZ_SUMMARY"):
        with open(os.environ["INSTNORM_FUZZ_SUMMARY"], "w") as f:
            f.write(line + "\n")
            for m in failures:
                f.write(json.dumps(m) + "\n")
            for cr in crashes:
                f.write(cr + "\n")
    report = [f"{m['case']}: {m['detail']}\n    {m['args']}" for m in failures[:20]]
    assert not failures and not crashes, line + "\n" + "\n".join(report + crashes)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="one batch of the argument fuzz")
    ap.add_argument("--batch", type=int, required=True)
    ap.add_argument("--examples", type=int, default=150)
    a = ap.parse_args()
    worker(a.batch, a.examples)
