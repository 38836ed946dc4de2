"""instnorm_torch at its edges: what it refuses (before anything runs), PyTorch's implementation
for float64 and CPU input, and autocast. The CPU cases run anywhere; the CUDA ones skip without a
device:  python3 -m pytest python/tests/test_package_edges.py -q"""
import copy
import os
import re
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import instnorm_torch as it  # noqa: E402

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
DEVICES = ["cpu"] + (["cuda"] if CUDA else [])
# Converted models are compared with the originals: TF32 convolutions would turn last-bit
# differences of the norm into 1e-3 ones.
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False


def healthy():
    torch.cuda.synchronize()
    assert torch.ones(1, device="cuda").sum().item() == 1.0


def args(dev, c=3, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, c, 5, 6, generator=g).to(dev, dtype)
    return x, {"weight": torch.randn(c, generator=g).to(dev),
               "bias": torch.randn(c, generator=g).to(dev),
               "running_mean": torch.randn(c, generator=g).to(dev),
               "running_var": (torch.rand(c, generator=g) + 0.5).to(dev)}


def call_instance(x, p, **kw):
    return it.instance_norm(x, p["weight"], p["bias"], p["running_mean"], p["running_var"], **kw)


# ---- refusals --------------------------------------------------------------------------------

@needs_cuda
@pytest.mark.parametrize("name", ["weight", "bias", "running_mean", "running_var"])
def test_cpu_tensor_argument_with_cuda_input_raises_before_launch(name):
    x, p = args("cuda")
    p[name] = p[name].cpu()
    before = {k: v.clone() for k, v in p.items()}
    msg = re.escape(f"{name} must be on x's device cuda:0 (got cpu)")
    with pytest.raises(RuntimeError, match="instance_norm: " + msg):
        call_instance(x, p)
    if name in ("weight", "bias"):
        with pytest.raises(RuntimeError, match="group_norm: " + msg):
            it.group_norm(x, 3, p["weight"], p["bias"])
    healthy()  # no kernel ran on a host pointer
    for k, v in p.items():
        assert torch.equal(v.cpu(), before[k].cpu()), f"{k} written by a refused call"


@needs_cuda
def test_cuda_parameter_with_cpu_input_raises():
    x, p = args("cpu")
    p["weight"] = p["weight"].cuda()
    with pytest.raises(RuntimeError, match=r"weight must be on x's device cpu \(got cuda:0\)"):
        call_instance(x, p)
    healthy()


@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize("name,shape", [("weight", (4,)), ("bias", (2,)), ("running_mean", (3, 1)),
                                        ("running_var", ())])
def test_wrong_number_of_elements_raises(dev, name, shape):
    x, p = args(dev)
    p[name] = torch.ones(shape, device=dev)
    with pytest.raises(RuntimeError, match=re.escape(
            f"{name} must be a 1-D tensor of C = 3 elements (got shape {tuple(shape)})")):
        call_instance(x, p)
    if name in ("weight", "bias"):
        with pytest.raises(RuntimeError, match=f"{name} must be a 1-D tensor of C = 3 elements"):
            it.group_norm(x, 1, **{name: p[name]})


@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64])
@pytest.mark.parametrize("name", ["weight", "bias", "running_mean", "running_var"])
def test_integer_bool_and_complex_parameters_raise(dev, dtype, name):
    x, p = args(dev)
    p[name] = p[name].to(dtype)
    with pytest.raises(RuntimeError,
                       match=re.escape(f"{name} must have a floating-point dtype (got {dtype})")):
        call_instance(x, p)


@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize("eps", [-1.0, -1e-5, float("nan"), float("inf"), 1e39])
def test_bad_eps_raises(dev, eps):
    x, _ = args(dev)
    for call in (lambda: it.instance_norm(x, eps=eps), lambda: it.group_norm(x, 1, eps=eps)):
        with pytest.raises(ValueError, match=re.escape(
                f"eps must be finite (in float32) and >= 0 (got {eps!r})")):
            call()


@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize("momentum", [-0.1, 2.0, float("nan"), float("inf")])
def test_bad_momentum_raises(dev, momentum):
    x, p = args(dev)
    with pytest.raises(ValueError,
                       match=re.escape(f"momentum must be in [0, 1] (got {momentum!r})")):
        call_instance(x, p, momentum=momentum)
    with pytest.raises(TypeError, match="momentum must be a float"):  # as F.instance_norm
        it.instance_norm(x, momentum=None)


@pytest.mark.parametrize("dev", DEVICES)
def test_unknown_activation_raises_value_error_listing_the_choices(dev):
    x, _ = args(dev)
    choices = r"activation must be one of None, 'none', 'relu', 'silu' \(got 'gelu'\)"
    with pytest.raises(ValueError, match=choices):
        it.group_norm(x, 1, activation="gelu")
    with pytest.raises(ValueError, match=choices):
        it.instance_norm(x, activation="gelu")
    with pytest.raises(ValueError, match=choices):
        it.GroupNorm(1, 3, activation="gelu")
    m = it.GroupNorm(1, 3, activation="silu").to(dev)
    m.activation = "gelu"
    with pytest.raises(ValueError, match=choices):
        m(x)


@pytest.mark.parametrize("dev", DEVICES)
def test_one_spatial_element_when_training_raises_as_pytorch(dev):
    x = torch.randn(2, 3, 1, 1, device=dev)
    for fn in (it.instance_norm, F.instance_norm):
        with pytest.raises(ValueError, match="spatial element"):
            fn(x)
    rm, rv = torch.zeros(3, device=dev), torch.ones(3, device=dev)
    y = it.instance_norm(x, running_mean=rm, running_var=rv, use_input_stats=False)  # eval: fine
    torch.testing.assert_close(y, F.instance_norm(x, rm, rv, use_input_stats=False))
    with pytest.raises(ValueError):  # group_norm: one value per group in one sample
        F.group_norm(torch.randn(1, 4, 1, device=dev), 4)
    with pytest.raises(ValueError, match="more than 1 value per group"):
        it.group_norm(torch.randn(1, 4, 1, device=dev), 4)
    x2 = torch.randn(2, 4, 1, device=dev)  # two samples: PyTorch runs it, so does the package
    torch.testing.assert_close(it.group_norm(x2, 4), F.group_norm(x2, 4))


@pytest.mark.parametrize("dev", DEVICES)
def test_pytorchs_refusals_raise_the_same_exception_type(dev):
    x, p = args(dev, c=6)
    cases = [
        (lambda f: f(x, 4), lambda: it.group_norm(x, 4)),                     # 4 does not divide 6
        (lambda f: f(x, -2), lambda: it.group_norm(x, -2)),
        (lambda f: f(x[0, :, 0, 0], 1), lambda: it.group_norm(x[0, :, 0, 0], 1)),  # 1-D
    ]
    for theirs, ours in cases:
        with pytest.raises(Exception) as ref:
            theirs(F.group_norm)
        with pytest.raises(type(ref.value)):
            ours()
    with pytest.raises(RuntimeError):
        F.instance_norm(x, use_input_stats=False)
    with pytest.raises(RuntimeError, match="required when use_input_stats is False"):
        it.instance_norm(x, use_input_stats=False)
    with pytest.raises(ValueError):
        F.instance_norm(x, p["running_mean"], None)
    with pytest.raises(ValueError, match="both be tensors or both be None"):
        it.instance_norm(x, running_mean=p["running_mean"])


# Each case of the direct op call runs in its own process: on the H200 (2026-12-03) one of them
# ended the process with a segmentation fault, which took the rest of the suite with it.
_DIRECT_CASES = [
    ("weight on the CPU", "dict(weight=w.cpu())", "weight must be on x's device"),
    ("integer bias", "dict(bias=b.to(torch.int64))", "bias must have a floating-point dtype"),
    ("short running statistics", "dict(running_mean=torch.zeros(5, device='cuda'), "
     "running_var=torch.ones(5, device='cuda'))", "running_mean must have C = 6"),
    ("eps -1", "dict(eps=-1.0)", "eps must be"),
    ("momentum 2", "dict(running_mean=rm, running_var=rv, momentum=2.0)", "momentum must be"),
    ("groups not dividing C", "dict(groups=4)", "groups must divide"),
    ("activation 7", "dict(activation=7)", "activation must be"),
    ("eval without running statistics", "dict(use_input_stats=False)", "use_input_stats"),
]

_DIRECT_CHILD = """
import sys, torch
sys.path.insert(0, {root!r})
import instnorm_torch
g = torch.Generator().manual_seed(0)
c = 6
x = torch.randn(2, c, 5, 6, generator=g).cuda()
w, b = torch.randn(c, generator=g).cuda(), torch.randn(c, generator=g).cuda()
rm, rv = torch.randn(c, generator=g).cuda(), (torch.rand(c, generator=g) + 0.5).cuda()
kw = dict(weight=None, bias=None, running_mean=None, running_var=None, use_input_stats=True,
          momentum=0.1, eps=1e-5, groups=0, activation=0)
kw.update({change})
try:
    torch.ops.instnorm_torch.forward(x, kw["weight"], kw["bias"], kw["running_mean"],
        kw["running_var"], kw["use_input_stats"], kw["momentum"], kw["eps"], kw["groups"],
        kw["activation"])
    print("NO EXCEPTION")
except RuntimeError as e:
    print("RAISED", str(e).splitlines()[0])
torch.cuda.synchronize()
assert torch.ones(1, device="cuda").sum().item() == 1.0
print("HEALTHY")
"""


@needs_cuda
@pytest.mark.parametrize("name,change,msg", _DIRECT_CASES, ids=[c[0] for c in _DIRECT_CASES])
def test_direct_op_call_reports_instnorms_reason(name, change, msg):
    """The op itself (no Python checks): a host pointer is refused, and a refused call names
    instnorm's reason (validate/to_string) instead of 'invalid argument'; the process and its
    CUDA context survive."""
    import subprocess
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    code = _DIRECT_CHILD.format(root=root, change=change)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"{name}: the process ended with {r.returncode}:\n{r.stderr[-2000:]}"
    assert "RAISED" in r.stdout and re.search(msg, r.stdout), r.stdout
    assert "HEALTHY" in r.stdout


# ---- PyTorch's implementation for what the kernel does not take --------------------------------

@pytest.mark.parametrize("dev", DEVICES)
def test_float64_runs_pytorch_forward_and_backward(dev):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 3, 5, generator=g, dtype=torch.float64).to(dev).requires_grad_()
    w = torch.randn(4, generator=g, dtype=torch.float64).to(dev).requires_grad_()
    b = torch.randn(4, generator=g, dtype=torch.float64).to(dev).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w, b: it.instance_norm(x, w, b, activation="silu"),
                                    (x, w, b))
    assert torch.autograd.gradcheck(lambda x, w, b: it.group_norm(x, 2, w, b, activation="silu"),
                                    (x, w, b))
    rm = torch.zeros(4, dtype=torch.float64, device=dev)
    rv = torch.ones(4, dtype=torch.float64, device=dev)
    rm2, rv2 = rm.clone(), rv.clone()
    y = it.instance_norm(x, w, b, rm, rv, momentum=0.3)
    assert y.dtype == torch.float64
    assert torch.equal(y, F.instance_norm(x, rm2, rv2, w, b, momentum=0.3))
    assert torch.equal(rm, rm2) and torch.equal(rv, rv2)
    assert torch.equal(it.group_norm(x, 2, w, b, activation="relu"),
                       F.relu(F.group_norm(x, 2, w, b)))


def block(dev):
    torch.manual_seed(2)
    return nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.GroupNorm(4, 8), nn.SiLU(),
                         nn.Conv2d(8, 6, 3, padding=1),
                         nn.InstanceNorm2d(6, affine=True, track_running_stats=True)).to(dev)


@pytest.mark.parametrize("dev", DEVICES)
def test_converted_model_in_double_and_on_cpu_works_like_torch_nn(dev):
    for dtype in (torch.float64, torch.float32):
        ref = block(dev).to(dtype)
        ours = it.convert(copy.deepcopy(ref))
        assert isinstance(ours[1], it.GroupNorm) and isinstance(ours[4], it.InstanceNorm2d)
        assert ours[1].weight.dtype == dtype  # convert() keeps the dtype
        x = torch.randn(2, 4, 7, 9, device=dev, dtype=dtype)
        for train in (True, False):
            ref.train(train)
            ours.train(train)
            xr, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
            yr, yo = ref(xr), ours(xo)
            # the kernel on CUDA fp32; otherwise the very same PyTorch ops on both sides
            kernel = dtype == torch.float32 and dev == "cuda"
            tol = dict(rtol=1e-5, atol=1e-5) if kernel else dict(rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(yo, yr, **tol)
            yr.square().sum().backward()
            yo.square().sum().backward()
            gtol = dict(tol, rtol=1e-4 if kernel else 1e-10)
            torch.testing.assert_close(xo.grad, xr.grad, **gtol)
            torch.testing.assert_close(ours[4].running_var, ref[4].running_var, **tol)


@pytest.mark.parametrize("dev", DEVICES)
def test_modules_keep_torch_nn_checks_and_unbatched_input(dev):
    m, r = it.InstanceNorm1d(5, affine=True).to(dev), nn.InstanceNorm1d(5, affine=True).to(dev)
    x = torch.randn(5, 30, device=dev)
    torch.testing.assert_close(m(x), r(x))
    with pytest.raises(ValueError, match="expected 2D or 3D input"):
        m(torch.randn(2, 5, 3, 3, device=dev))
    with pytest.raises(ValueError, match="num_features"):
        m(torch.randn(2, 4, 30, device=dev))


@needs_cuda
def test_mixed_parameter_dtypes_follow_pytorch():
    """instance_norm takes fp16/bf16 x with float32 parameters (as F.instance_norm); group_norm
    with such a mix does what F.group_norm does on CUDA (outside autocast)."""
    for dtype in (torch.float16, torch.bfloat16):
        x, p = args("cuda", c=8, dtype=dtype)
        y = call_instance(x, {k: v.clone() for k, v in p.items()})
        ref = call_instance(x.double(), {k: v.double() for k, v in p.items()})
        assert y.dtype == dtype
        eps = torch.finfo(dtype).eps
        torch.testing.assert_close(y.double(), ref, rtol=eps, atol=2 * eps)
        try:
            want = F.group_norm(x, 2, p["weight"], p["bias"])
        except Exception as e:  # noqa: BLE001
            with pytest.raises(type(e)):
                it.group_norm(x, 2, p["weight"], p["bias"])
        else:
            torch.testing.assert_close(it.group_norm(x, 2, p["weight"], p["bias"]), want)
        healthy()


@pytest.mark.parametrize("dev", DEVICES)
def test_empty_input_behaves_as_pytorch(dev):
    for shape in [(0, 3, 4), (2, 0, 4), (2, 3, 0)]:
        x = torch.randn(shape, device=dev)
        for ours, theirs in [(lambda: it.instance_norm(x), lambda: F.instance_norm(x)),
                             (lambda: it.group_norm(x, 1), lambda: F.group_norm(x, 1))]:
            try:
                want = theirs()
            except Exception as e:  # noqa: BLE001
                with pytest.raises(type(e)):
                    ours()
            else:
                got = ours()
                assert got.shape == want.shape and got.dtype == want.dtype


# ---- autocast --------------------------------------------------------------------------------

@needs_cuda
@pytest.mark.parametrize("cast", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("xdtype", [torch.float32, torch.float16])
def test_autocast_output_dtype_is_the_replaced_ops(cast, xdtype):
    """group_norm is on CUDA autocast's float32 list: float32 out; instance_norm is on no list:
    x's dtype out. Values as PyTorch's under the same autocast."""
    x, p = args("cuda", c=8, dtype=xdtype)
    w, b = p["weight"], p["bias"]
    with torch.autocast("cuda", dtype=cast):
        want_g = F.silu(F.group_norm(x, 4, w, b))
        got_g = it.group_norm(x, 4, w, b, activation="silu")
        want_i = F.instance_norm(x, weight=w, bias=b)
        got_i = it.instance_norm(x, w, b)
    assert got_g.dtype == want_g.dtype == torch.float32
    assert got_i.dtype == want_i.dtype == xdtype
    torch.testing.assert_close(got_g, want_g, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_i, want_i, rtol=4e-3, atol=4e-3)
    # Modules and backward: the converted model gives the original's output and gradient dtypes.
    ref = block("cuda")
    ours = it.convert(copy.deepcopy(ref))
    xin = torch.randn(2, 4, 8, 8, device="cuda")
    with torch.autocast("cuda", dtype=cast):
        yr, yo = ref(xin), ours(xin)
    assert yo.dtype == yr.dtype
    tol = 1e-2 if cast == torch.float16 else 6e-2  # the half-precision convolutions round apart
    torch.testing.assert_close(yo.float(), yr.float(), rtol=tol, atol=tol)
    yr.float().sum().backward()
    yo.float().sum().backward()
    for a, r in zip(ours.parameters(), ref.parameters()):
        assert a.grad.dtype == r.grad.dtype


@needs_cuda
def test_autocast_leaves_float64_and_cpu_arguments_alone():
    x = torch.randn(2, 4, 5, device="cuda", dtype=torch.float64)
    with torch.autocast("cuda", dtype=torch.float16):
        assert it.group_norm(x, 2).dtype == F.group_norm(x, 2).dtype == torch.float64
        with pytest.raises(RuntimeError, match="weight must be on x's device"):
            it.group_norm(x.float(), 2, torch.ones(4))
    healthy()
