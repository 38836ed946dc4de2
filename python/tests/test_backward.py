"""The autograd backward of instnorm_torch: instnorm's fused backward kernel (the custom op
instnorm_torch::backward, registered as the gradient of instnorm_torch::norm), against PyTorch's
own F.instance_norm / F.group_norm (+ F.relu / F.silu) computed in float64 on the same data.
Needs a GPU (skips without one):  python3 -m pytest python/tests/test_backward.py -q"""
import itertools
import os
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import instnorm_torch as it  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEV = "cuda"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ACTS = [None, "relu", "silu"]
# Max abs error allowed, relative to the largest |reference| of the tensor compared: the
# kernel's fp32 math, then the output's rounding (fp16 2^-11, bf16 2^-8 relative).
REL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
ABS = {torch.float32: 1e-6, torch.float16: 1e-5, torch.bfloat16: 1e-4}
# The convolutions of the compile test: the same bits eager and compiled.
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.deterministic = True
torch.backends.cudnn.benchmark = False


def cl_format(dim):
    return torch.channels_last if dim == 4 else torch.channels_last_3d


def make(shape, dtype, layout="nchw", seed=0, scale=2.0, offset=0.0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    x = (torch.randn(shape, generator=g, device=DEV) * scale + offset).to(dtype)
    if layout == "cl":
        x = x.contiguous(memory_format=cl_format(x.dim()))
    return x


def upstream(shape, seed=99):
    """A random upstream gradient of float16-representable float32 values (the same numbers
    whichever dtype y has on either side)."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    return torch.randn(shape, generator=g, device=DEV).half().float()


def close(name, got, ref, dtype):
    """max |got - ref| <= REL * max |ref| + ABS, got cast to float64."""
    assert got is not None, f"{name}: no gradient"
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    err = (got.double() - ref).abs().max().item()
    bound = REL[dtype] * ref.abs().max().item() + ABS[dtype]
    assert err <= bound, f"{name}: max error {err:.3g} > {bound:.3g} ({dtype})"


def act_fn(act):
    return {None: lambda t: t, "relu": F.relu, "silu": F.silu}[act]


def check(ours, theirs, x, params, act, dtype, gy=None, expanded_gy=False):
    """Gradients of ours(x, *params) (instnorm_torch) against theirs(x64, *params64) (PyTorch
    in float64) for the same upstream gradient. params: tensors, or None, that get gradients."""
    x64 = x.detach().double().requires_grad_()
    p64 = [None if p is None else p.detach().double().requires_grad_() for p in params]
    pre64 = theirs(x64, *p64)
    y64 = act_fn(act)(pre64)
    if expanded_gy:
        gy = None
    elif gy is None:
        gy = upstream(x.shape).double()
        if act == "relu":
            # ReLU's derivative jumps at 0: where the pre-activation is within rounding of 0 the
            # fp32 kernel and the fp64 reference may take different sides, so no gradient there.
            gy = gy.masked_fill(pre64.detach().abs() < 1e-3, 0.0)
    xg = x.detach().clone().requires_grad_()  # clone keeps x's layout
    pg = [None if p is None else p.detach().clone().requires_grad_() for p in params]
    y = ours(xg, *pg)
    assert y.dtype == x.dtype and y.shape == x.shape
    if expanded_gy:  # the gradient of a sum: a stride-0 expanded tensor reaches the backward
        y.sum().backward()
        y64.sum().backward()
    else:
        y.backward(gy.to(y.dtype))
        y64.backward(gy.to(y.dtype).double())  # the same rounded values on both sides
    assert xg.grad.dtype == x.dtype
    close("dx", xg.grad, x64.grad, dtype)
    for name, p, r in zip(["dweight", "dbias"], pg, p64):
        if p is not None:
            assert p.grad.dtype == p.dtype
            close(name, p.grad, r.grad, dtype)
    return xg, pg


# ---- instance norm ---------------------------------------------------------------------------

IN_SHAPES = [((3, 5, 7, 7), "nchw"), ((3, 5, 7, 7), "cl"), ((1, 8, 64, 64), "nchw"),
             ((1, 8, 64, 64), "cl"), ((2, 16, 9, 11), "cl"), ((2, 3, 100), "nchw"),
             ((2, 4, 5, 6, 8), "cl")]


@pytest.mark.parametrize("shape,layout", IN_SHAPES, ids=[f"{s}-{l}" for s, l in IN_SHAPES])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("act", ACTS, ids=str)
def test_instance_norm_gradients(shape, layout, dtype, affine, act):
    c = shape[1]
    x = make(shape, dtype, layout, seed=1)
    params = [torch.randn(c, device=DEV), torch.randn(c, device=DEV)] if affine else []
    check(lambda x, *p: it.instance_norm(x, *p, activation=act),
          lambda x, *p: F.instance_norm(x, weight=p[0] if p else None, bias=p[1] if p else None),
          x, params, act, dtype)


@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("act", ACTS, ids=str)
def test_instance_norm_eval_running_stats_gradients(layout, dtype, affine, act):
    """use_input_stats=False: normalized by the running statistics, which are constants."""
    shape = (3, 6, 9, 7)
    c = shape[1]
    x = make(shape, dtype, layout, seed=2)
    rm, rv = torch.randn(c, device=DEV), torch.rand(c, device=DEV) * 3 + 0.5
    rm0, rv0 = rm.clone(), rv.clone()
    params = [torch.randn(c, device=DEV), torch.randn(c, device=DEV)] if affine else []

    def ours(x, *p):
        return it.instance_norm(x, *(p or (None, None)), rm, rv, use_input_stats=False,
                                activation=act)

    def theirs(x, *p):
        return F.instance_norm(x, rm.double(), rv.double(), *(p or (None, None)),
                               use_input_stats=False)

    check(ours, theirs, x, params, act, dtype)
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0), "eval mode wrote the running statistics"


@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_instance_norm_training_with_running_stats(layout, dtype):
    """Training with running statistics: gradients from the kernel, and the running statistics
    updated as F.instance_norm updates them (the functional op returns them, the wrapper copies
    them in)."""
    shape = (4, 8, 10, 12)
    c = shape[1]
    x = make(shape, dtype, layout, seed=3)
    rm, rv = torch.randn(c, device=DEV), torch.rand(c, device=DEV) + 0.5
    rm_ref, rv_ref = rm.double(), rv.double()
    w, b = torch.randn(c, device=DEV), torch.randn(c, device=DEV)
    check(lambda x, w, b: it.instance_norm(x, w, b, rm, rv, momentum=0.3, activation="silu"),
          lambda x, w, b: F.instance_norm(x, rm_ref, rv_ref, w, b, momentum=0.3),
          x, [w, b], "silu", dtype)
    torch.testing.assert_close(rm.double(), rm_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rv.double(), rv_ref, rtol=1e-5, atol=1e-6)


# ---- group norm ------------------------------------------------------------------------------

GN_SHAPES = [((2, 320, 16, 16), 32, "nchw"), ((2, 320, 16, 16), 32, "cl"),
             ((3, 6, 7, 7), 3, "nchw"), ((3, 6, 7, 7), 3, "cl"), ((1, 8, 64, 64), 2, "cl"),
             ((2, 12, 5, 6, 7), 4, "nchw"), ((4, 64, 31), 8, "nchw")]


@pytest.mark.parametrize("shape,groups,layout", GN_SHAPES,
                         ids=[f"{s}-g{g}-{l}" for s, g, l in GN_SHAPES])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("act", ACTS, ids=str)
def test_group_norm_gradients(shape, groups, layout, dtype, affine, act):
    c = shape[1]
    x = make(shape, dtype, layout, seed=4)
    # F.group_norm on CUDA takes parameters of x's dtype only; so does the kernel path.
    params = [torch.randn(c, device=DEV).to(dtype), torch.randn(c, device=DEV).to(dtype)] \
        if affine else []
    check(lambda x, *p: it.group_norm(x, groups, *p, activation=act),
          lambda x, *p: F.group_norm(x, groups, *p),
          x, params, act, dtype)


# ---- what reaches the backward -----------------------------------------------------------------

@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_expanded_upstream_gradient(layout):
    """y.sum().backward(): dy is an expanded (stride-0) tensor, put in x's layout by the op."""
    x = make((2, 32, 12, 12), torch.float32, layout, seed=5)
    w, b = torch.randn(32, device=DEV), torch.randn(32, device=DEV)
    check(lambda x, w, b: it.group_norm(x, 8, w, b, activation="silu"),
          lambda x, w, b: F.group_norm(x, 8, w, b), x, [w, b], "silu", torch.float32,
          expanded_gy=True)


def test_strided_input_and_channels_last_upstream_gradient():
    """x neither contiguous nor channels-last (the op copies it contiguous, forward and
    backward alike); and a channels-last dy for a contiguous x."""
    base = make((2, 8, 10, 14), torch.float32, seed=6)
    x = base.transpose(2, 3)  # (2, 8, 14, 10), strided
    w, b = torch.randn(8, device=DEV), torch.randn(8, device=DEV)
    check(lambda x, w, b: it.instance_norm(x, w, b, activation="relu"),
          lambda x, w, b: F.instance_norm(x, weight=w, bias=b), x, [w, b], "relu", torch.float32)
    xc = make((2, 8, 10, 14), torch.float32, seed=7)
    gy = make((2, 8, 10, 14), torch.float32, "cl", seed=8)
    check(lambda x, w, b: it.instance_norm(x, w, b),
          lambda x, w, b: F.instance_norm(x, weight=w, bias=b),
          xc, [w, b], None, torch.float32, gy=gy)


@pytest.mark.parametrize("which", ["x", "weight", "bias", "weight+bias"])
def test_only_some_inputs_require_grad(which):
    x0 = make((2, 16, 8, 8), torch.float16, "cl", seed=9)
    w0, b0 = torch.randn(16, device=DEV), torch.randn(16, device=DEV)
    x, w, b = x0.clone(), w0.clone(), b0.clone()
    for name, t in (("x", x), ("weight", w), ("bias", b)):
        t.requires_grad_(name in which.split("+"))
    r = upstream(x0.shape)
    (it.group_norm(x, 4, w.half(), b.half(), activation="silu").float() * r).sum().backward()
    x64, w64, b64 = (t.double().requires_grad_() for t in (x0, w0, b0))
    (F.silu(F.group_norm(x64, 4, w64, b64)) * r.double()).sum().backward()
    for name, t, r in (("x", x, x64), ("weight", w, w64), ("bias", b, b64)):
        if t.requires_grad:
            close("d" + name, t.grad, r.grad, torch.float16)
        else:
            assert t.grad is None


def test_float32_parameters_with_half_input_give_float32_gradients():
    """instance_norm takes float32 weight/bias with 16-bit x (as F.instance_norm does):
    dweight/dbias come back float32."""
    x = make((2, 8, 16, 16), torch.bfloat16, "cl", seed=10)
    w, b = torch.randn(8, device=DEV), torch.randn(8, device=DEV)
    check(lambda x, w, b: it.instance_norm(x, w, b, activation="silu"),
          lambda x, w, b: F.instance_norm(x, weight=w, bias=b), x, [w, b], "silu",
          torch.bfloat16)


def test_backward_runs_the_fused_op():
    """The recorded graph's backward is instnorm_torch::backward, no PyTorch-op formula."""
    x = make((2, 8, 6, 6), torch.float32, seed=11).requires_grad_()
    w = torch.randn(8, device=DEV, requires_grad=True)
    y = it.instance_norm(x, w, None, activation="silu")
    assert "instnorm_torch_norm" in type(y.grad_fn).__name__, type(y.grad_fn).__name__
    loss = y.sum()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        loss.backward()
    names = [e.name for e in prof.events()]
    assert "instnorm_torch::backward" in names, sorted(set(names))
    for op in ("aten::sigmoid", "aten::mean", "aten::sum"):
        assert op not in names, f"{op} ran in the backward"


def test_forward_never_writes_x():
    x = make((2, 8, 6, 6), torch.float16, "cl", seed=12)
    x0 = x.clone()
    xg = x.clone().requires_grad_()
    y = it.group_norm(xg, 2, activation="relu")
    assert y.data_ptr() != xg.data_ptr()
    y.float().sum().backward()
    assert torch.equal(xg.detach(), x0)
    with torch.no_grad():
        y = it.instance_norm(x)
    assert y.data_ptr() != x.data_ptr() and torch.equal(x, x0)


def test_double_backward_raises():
    x = make((2, 8, 6, 6), torch.float32, seed=13).requires_grad_()
    w = torch.randn(8, device=DEV, requires_grad=True)
    y = it.group_norm(x, 2, w, None, activation="silu")
    (gx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)  # records, no error
    with pytest.raises(RuntimeError, match="instnorm_torch: double backward is not supported"):
        gx.sum().backward()


def test_gradcheck_float64_runs_pytorchs_op():
    g = torch.Generator().manual_seed(14)
    x = torch.randn(2, 4, 3, 5, generator=g, dtype=torch.float64).to(DEV).requires_grad_()
    w = torch.randn(4, generator=g, dtype=torch.float64).to(DEV).requires_grad_()
    b = torch.randn(4, generator=g, dtype=torch.float64).to(DEV).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w, b: it.instance_norm(x, w, b, activation="silu"),
                                    (x, w, b))
    assert torch.autograd.gradcheck(lambda x, w, b: it.group_norm(x, 2, w, b, activation="relu"),
                                    (x, w, b))
    assert torch.autograd.gradgradcheck(lambda x, w, b: it.group_norm(x, 2, w, b), (x, w, b))


def test_autocast_group_norm_gradients():
    """Under autocast, group_norm computes in float32 (as autocast does for F.group_norm); the
    gradients reach 16-bit x and float32 parameters with their dtypes, and match PyTorch's."""
    x0 = make((2, 32, 8, 8), torch.float16, "cl", seed=15)
    w0, b0 = torch.randn(32, device=DEV), torch.randn(32, device=DEV)
    out = []
    for fn in (lambda x, w, b: it.group_norm(x, 8, w, b, activation="silu"),
               lambda x, w, b: F.silu(F.group_norm(x, 8, w, b))):
        x, w, b = (t.clone().requires_grad_() for t in (x0, w0, b0))
        with torch.autocast("cuda", dtype=torch.float16):
            y = fn(x, w, b)
        assert y.dtype == torch.float32
        (y * upstream(y.shape)).sum().backward()
        out.append((x.grad, w.grad, b.grad))
    for a, r in zip(*out):
        assert a.dtype == r.dtype
        torch.testing.assert_close(a, r, rtol=2e-3, atol=2e-3)


# ---- the ops themselves ----------------------------------------------------------------------

def test_opcheck():
    """torch.library.opcheck: schemas (no undeclared mutation), fake implementations against
    the real ones, autograd registration, AOT dispatch."""
    x = make((2, 8, 6, 6), torch.float16, "cl", seed=16)
    w, b = torch.randn(8, device=DEV), torch.randn(8, device=DEV)
    rm, rv = torch.randn(8, device=DEV), torch.rand(8, device=DEV) + 0.5
    cases = [
        (x.requires_grad_(), w.requires_grad_(), b, None, None, True, 0.1, 1e-5, 2, 2),
        (x, w, b, rm, rv, True, 0.1, 1e-5, 0, 1),
        (x, None, None, rm, rv, False, 0.1, 1e-5, 0, 0),
    ]
    for args in cases:
        torch.library.opcheck(torch.ops.instnorm_torch.norm.default, args)
    xd = x.detach()
    y, mean, rstd, _, _ = torch.ops.instnorm_torch.norm(xd, w.detach(), b, None, None, True, 0.1,
                                                        1e-5, 2, 2)
    dy = torch.randn_like(y)
    torch.library.opcheck(torch.ops.instnorm_torch.backward.default,
                          (xd, dy, w.detach(), b, None, None, mean, rstd, True, 1e-5, 2, 2, True,
                           False), test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.instnorm_torch.backward.default,
                          (xd, dy, None, None, rm, rv, mean, rstd, False, 1e-5, 0, 0, False,
                           False), test_utils=("test_schema", "test_faketensor"))


def test_backward_op_reports_instnorms_reason():
    x = make((2, 8, 6, 6), torch.float32, seed=17)
    dy = torch.randn_like(x)
    y, mean, rstd, _, _ = torch.ops.instnorm_torch.norm(x, None, None, None, None, True, 0.1,
                                                        1e-5, 0, 0)
    with pytest.raises(RuntimeError, match="activation must be"):
        torch.ops.instnorm_torch.backward(x, dy, None, None, None, None, mean, rstd, True, 1e-5,
                                          0, 7, False, False)
    with pytest.raises(RuntimeError, match="groups must divide"):
        torch.ops.instnorm_torch.backward(x, dy, None, None, None, None, mean, rstd, True, 1e-5,
                                          3, 0, False, False)
    with pytest.raises(RuntimeError, match="mean must have N \\* G = 16 elements"):
        torch.ops.instnorm_torch.backward(x, dy, None, None, None, None, mean[:1], rstd, True,
                                          1e-5, 0, 0, False, False)
    with pytest.raises(RuntimeError, match="dy must have x's shape"):
        torch.ops.instnorm_torch.backward(x, dy[:1], None, None, None, None, mean, rstd, True,
                                          1e-5, 0, 0, False, False)
    torch.cuda.synchronize()


# ---- torch.compile ---------------------------------------------------------------------------

class Block(nn.Module):
    def __init__(self, c=64):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.gn_w = nn.Parameter(torch.randn(c) * 0.5 + 1)
        self.gn_b = nn.Parameter(torch.randn(c) * 0.1)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        h = self.conv1(x)
        h = it.group_norm(h, 32, self.gn_w, self.gn_b, activation="silu")
        return self.conv2(h)


@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_compiled_training_step_matches_eager(layout):
    torch.manual_seed(0)
    eager = Block().to(DEV)
    compiled_mod = Block().to(DEV)
    compiled_mod.load_state_dict(eager.state_dict())
    if layout == "cl":
        eager = eager.to(memory_format=torch.channels_last)
        compiled_mod = compiled_mod.to(memory_format=torch.channels_last)
    x = make((2, 64, 16, 16), torch.float32, layout, seed=18)

    def loss_fn(m, x):
        return m(x).square().mean()

    # Forward and loss compiled in one graph, the backward of which AOTAutograd compiles too
    # (Tensor.backward() itself is not traced by dynamo).
    loss_c = torch.compile(loss_fn, fullgraph=True)
    for _ in range(2):  # the second call runs the compiled graph again (no recompile needed)
        for m in (eager, compiled_mod):
            m.zero_grad(set_to_none=True)
        le = loss_fn(eager, x)
        le.backward()
        lc = loss_c(compiled_mod, x)
        lc.backward()
        torch.testing.assert_close(lc, le, rtol=1e-5, atol=1e-6)
        for (name, pe), pc in zip(eager.named_parameters(), compiled_mod.parameters()):
            torch.testing.assert_close(pc.grad, pe.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_compiled_graph_calls_the_backward_op():
    """The compiled backward graph holds instnorm_torch.backward (no decomposed formula)."""
    from torch._dynamo.testing import AotEagerAndRecordGraphs
    backend = AotEagerAndRecordGraphs()
    x = make((2, 16, 8, 8), torch.bfloat16, "cl", seed=19).requires_grad_()
    w = torch.randn(16, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    fn = torch.compile(lambda x, w: it.group_norm(x, 4, w, None, activation="silu").float().sum(),
                       backend=backend, fullgraph=True)
    fn(x, w).backward()
    assert x.grad is not None and w.grad is not None and w.grad.dtype == torch.bfloat16
    bw = "\n".join(g.print_readable(print_output=False) for g in backend.bw_graphs)
    assert "instnorm_torch.backward" in bw, bw
    fw = "\n".join(g.print_readable(print_output=False) for g in backend.fw_graphs)
    assert "instnorm_torch.norm" in fw, fw


def test_compiled_module_with_running_stats_trains():
    """A converted InstanceNorm2d(affine, track_running_stats) in training mode under
    torch.compile: the running statistics are updated, the parameters get the fused gradients."""
    ref = nn.InstanceNorm2d(16, affine=True, track_running_stats=True).to(DEV)
    ours = it.convert(nn.InstanceNorm2d(16, affine=True, track_running_stats=True).to(DEV))
    ours.load_state_dict(ref.state_dict())
    x = make((3, 16, 12, 12), torch.float32, seed=20, offset=1.0)
    step = torch.compile(lambda m, x: m(x).square().sum(), fullgraph=True)
    step(ours, x).backward()
    ref(x).square().sum().backward()
    torch.testing.assert_close(ours.running_mean, ref.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.running_var, ref.running_var, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours.bias.grad, ref.bias.grad, rtol=1e-4, atol=1e-4)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
