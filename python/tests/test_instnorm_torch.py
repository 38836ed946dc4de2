"""instnorm_torch against torch.nn / torch.nn.functional on the same tensors (run on a GPU):
    python3 -m pytest python/tests -q      (or: python3 python/tests/test_instnorm_torch.py)"""
import copy
import itertools
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import instnorm_torch as it  # noqa: E402

DEV = "cuda"
try:  # under pytest: skip on a machine without CUDA
    import pytest
    pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
except ImportError:
    pass
# The convolutions of the convert() test must give the same bits on both sides: no TF32, and a
# deterministic cuDNN algorithm (TF32 convolutions differed by ~1e-4 between calls, which the
# following normalization magnified past the tolerance).
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.deterministic = True
torch.backends.cudnn.benchmark = False
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def close(a, b, dtype, scale=1.0):
    err = (a.double() - b.double()).abs().max().item()
    assert err <= TOL[dtype] * max(1.0, scale), f"max error {err} ({dtype})"


def make(shape, dtype, layout, offset=0.0, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    x = (torch.randn(shape, generator=g, device=DEV) * 2 + offset).to(dtype)
    if layout == "cl":
        x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    return x


SHAPES = [((2, 3, 7, 9), "nchw"), ((4, 64, 32, 32), "nchw"), ((4, 64, 32, 32), "cl"),
          ((1, 8, 1000), "nchw"), ((2, 4, 5, 6, 7), "nchw"), ((2, 4, 5, 6, 8), "cl"),
          ((2, 320, 16, 16), "cl")]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def test_instance_norm_matches_torch():
    for (shape, layout), dtype, affine in itertools.product(SHAPES, DTYPES, [False, True]):
        x = make(shape, dtype, layout)
        c = shape[1]
        w = torch.randn(c, device=DEV) if affine else None
        b = torch.randn(c, device=DEV) if affine else None
        y = it.instance_norm(x, w, b)
        ref = F.instance_norm(x.double(), weight=None if w is None else w.double(),
                              bias=None if b is None else b.double())
        assert y.dtype == dtype and y.shape == x.shape
        if layout == "cl":
            assert not y.is_contiguous() or c == 1, "channels-last output expected"
        close(y, ref, dtype, 4.0)


def test_offset_mean_fp32():
    x = make((2, 16, 64, 64), torch.float32, "nchw", offset=1e4)
    close(it.instance_norm(x), F.instance_norm(x.double()), torch.float32)


def test_running_statistics_train_and_eval():
    for layout, dtype in itertools.product(["nchw", "cl"], DTYPES):
        x = make((3, 8, 16, 16), dtype, layout, seed=3)
        rm, rv = torch.randn(8, device=DEV), torch.rand(8, device=DEV) + 0.5
        rm2, rv2 = rm.clone(), rv.clone()
        y = it.instance_norm(x, running_mean=rm, running_var=rv, momentum=0.3)
        ref = F.instance_norm(x.float(), rm2, rv2, momentum=0.3)
        close(y, ref, dtype)
        torch.testing.assert_close(rm, rm2, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(rv, rv2, rtol=1e-5, atol=1e-6)
        ye = it.instance_norm(x, running_mean=rm, running_var=rv, use_input_stats=False)
        refe = F.instance_norm(x.float(), rm2, rv2, use_input_stats=False)
        close(ye, refe, dtype)
        torch.testing.assert_close(rm, rm2)  # eval leaves them alone


def test_group_norm_and_silu_match_torch():
    for (shape, layout), dtype, act in itertools.product(
            [((2, 320, 16, 16), "nchw"), ((2, 320, 16, 16), "cl"), ((2, 64, 7, 9), "nchw"),
             ((1, 128, 4, 8, 8), "cl")], DTYPES, [None, "silu", "relu"]):
        x = make(shape, dtype, layout, seed=5)
        c = shape[1]
        # weight and bias of x's dtype, as F.group_norm on CUDA wants them outside autocast
        w, b = torch.randn(c, device=DEV).to(dtype), torch.randn(c, device=DEV).to(dtype)
        y = it.group_norm(x, 32, w, b, activation=act)
        ref = F.group_norm(x.double(), 32, w.double(), b.double())
        ref = F.silu(ref) if act == "silu" else F.relu(ref) if act == "relu" else ref
        close(y, ref, dtype, 4.0)


def grads(fn, x, w, b):
    x = x.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    b = b.detach().clone().requires_grad_()
    y = fn(x, w, b)
    # The same upstream gradient for both sides, in logical (NCHW) order whatever the layout.
    gy = torch.randn(y.shape, generator=torch.Generator(device=DEV).manual_seed(1), device=DEV)
    (y.float() * gy).sum().backward()
    return y, x.grad, w.grad, b.grad


def test_gradients_match_torch():
    cases = [
        ((2, 8, 12, 12), "nchw", lambda x, w, b: it.instance_norm(x, w, b),
         lambda x, w, b: F.instance_norm(x, weight=w, bias=b)),
        ((2, 8, 12, 12), "cl", lambda x, w, b: it.instance_norm(x, w, b),
         lambda x, w, b: F.instance_norm(x, weight=w, bias=b)),
        ((2, 64, 8, 8), "nchw", lambda x, w, b: it.group_norm(x, 32, w, b, activation="silu"),
         lambda x, w, b: F.silu(F.group_norm(x, 32, w, b))),
        ((2, 64, 8, 8), "cl", lambda x, w, b: it.group_norm(x, 8, w, b, activation="relu"),
         lambda x, w, b: F.relu(F.group_norm(x, 8, w, b))),
    ]
    for shape, layout, ours, theirs in cases:
        x = make(shape, torch.float32, layout, seed=7)
        w, b = torch.randn(shape[1], device=DEV), torch.randn(shape[1], device=DEV)
        _, gx, gw, gb = grads(ours, x, w, b)
        _, rx, rw, rb = grads(theirs, x, w, b)
        for a, r in [(gx, rx), (gw, rw), (gb, rb)]:
            torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-4)
    # Eval mode: the running statistics are constants.
    x = make((2, 8, 6, 6), torch.float32, "nchw", seed=8)
    rm, rv = torch.randn(8, device=DEV), torch.rand(8, device=DEV) + 0.5
    w, b = torch.randn(8, device=DEV), torch.randn(8, device=DEV)
    _, gx, gw, gb = grads(lambda x, w, b: it.instance_norm(x, w, b, rm, rv, use_input_stats=False), x, w, b)
    _, rx, rw, rb = grads(lambda x, w, b: F.instance_norm(x, rm, rv, w, b, use_input_stats=False), x, w, b)
    for a, r in [(gx, rx), (gw, rw), (gb, rb)]:
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-4)


def test_modules_state_dict_and_convert():
    ref = nn.InstanceNorm2d(16, affine=True, track_running_stats=True).to(DEV)
    with torch.no_grad():
        ref.weight.normal_()
        ref.bias.normal_()
    ours = it.InstanceNorm2d(16, affine=True, track_running_stats=True).to(DEV)
    ours.load_state_dict(ref.state_dict())
    assert ours.state_dict().keys() == ref.state_dict().keys()
    x = make((4, 16, 20, 20), torch.float32, "nchw", seed=9)
    for mode in ["train", "eval"]:
        ref.train(mode == "train")
        ours.train(mode == "train")
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=2e-5)
        torch.testing.assert_close(ours.running_mean, ref.running_mean)
        torch.testing.assert_close(ours.running_var, ref.running_var)
    # Unbatched input, 1d and 3d.
    m1 = it.InstanceNorm1d(5).to(DEV)
    x1 = torch.randn(5, 30, device=DEV)
    torch.testing.assert_close(m1(x1), nn.InstanceNorm1d(5).to(DEV)(x1), rtol=1e-5, atol=2e-5)
    m3 = it.InstanceNorm3d(3, affine=True).to(DEV)
    x3 = torch.randn(2, 3, 4, 5, 6, device=DEV)
    r3 = nn.InstanceNorm3d(3, affine=True).to(DEV)
    torch.testing.assert_close(m3(x3), r3(x3), rtol=1e-5, atol=2e-5)
    # convert(): a block with GroupNorm + SiLU and an InstanceNorm, same outputs, SiLU fused.
    model = nn.Sequential(nn.Conv2d(8, 64, 3, padding=1), nn.GroupNorm(32, 64), nn.SiLU(),
                          nn.Conv2d(64, 8, 3, padding=1), nn.InstanceNorm2d(8, affine=True)).to(DEV)
    xin = torch.randn(2, 8, 16, 16, device=DEV)
    want = model(xin)
    conv = it.convert(copy.deepcopy(model))
    assert isinstance(conv[1], it.GroupNorm) and conv[1].activation == "silu"
    assert isinstance(conv[2], nn.Identity) and isinstance(conv[4], it.InstanceNorm2d)
    torch.testing.assert_close(conv(xin), want, rtol=1e-4, atol=1e-4)
    assert conv.state_dict().keys() == model.state_dict().keys()


def test_torch_compile_fullgraph():
    def fn(x, w, b):  # group_norm with parameters of x's dtype, instance_norm with float32 ones
        return it.group_norm(x, 32, w.to(x.dtype), b.to(x.dtype), activation="silu") + \
            it.instance_norm(x, w, b)

    x = make((2, 64, 16, 16), torch.float16, "nchw", seed=10)
    w, b = torch.randn(64, device=DEV), torch.randn(64, device=DEV)
    compiled = torch.compile(fn, fullgraph=True)
    torch.testing.assert_close(compiled(x, w, b), fn(x, w, b))
    xc = x.contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(compiled(xc, w, b), fn(xc, w, b))
    # Training step through the compiled function (the backward is traced too).
    xg = x.float().requires_grad_()
    torch.compile(lambda t: it.instance_norm(t, w, b).sum(), fullgraph=True)(xg).backward()
    assert xg.grad is not None and torch.isfinite(xg.grad).all()
    # A module with running statistics under compile.
    m = it.InstanceNorm2d(64, track_running_stats=True).to(DEV)
    r = nn.InstanceNorm2d(64, track_running_stats=True).to(DEV)
    mc = torch.compile(m, fullgraph=True)
    torch.testing.assert_close(mc(x.float()), r(x.float()), rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(m.running_var, r.running_var, rtol=1e-5, atol=1e-6)


def test_cuda_graph_replay():
    m = it.GroupNorm(32, 64, activation="silu").to(DEV).half()
    x = make((2, 64, 32, 32), torch.float16, "nchw", seed=11)
    want = m(x)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        m(x)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = m(x)
    for _ in range(10):
        g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, want)


def test_bad_arguments_raise():
    # More in test_package_edges.py; CPU input is no error (PyTorch's implementation runs it).
    x = make((2, 6, 4, 4), torch.float32, "nchw")
    for call in [lambda: it.group_norm(x, 4), lambda: it.instance_norm(x, use_input_stats=False),
                 lambda: it.instance_norm(x, torch.ones(6))]:
        try:
            call()
        except (ValueError, RuntimeError):
            continue
        raise AssertionError("expected an error")


if __name__ == "__main__":  # without pytest
    tests = [v for k, v in sorted(globals().items()) if k.startswith("test_")]
    failed = 0
    for t in tests:
        try:
            t()
            print("PASSED", t.__name__)
        except Exception as e:  # noqa: BLE001
            failed += 1
            print("FAILED", t.__name__, repr(e)[:2000])
    print(f"{len(tests) - failed} passed, {failed} failed")
    sys.exit(1 if failed else 0)
