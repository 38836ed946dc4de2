"""Per-sample modulation (the scale-shift GroupNorm of diffusion U-Nets, FiLM), statistics() and
AdaIN in instnorm_torch, against the unfused PyTorch expressions computed in float64 on the same
values: act(F.group_norm(x) * (1 + scale) + shift) (or * scale + shift), the reference AdaIN
(calc_mean_std: unbiased variance + eps inside the square root, for content and style), forward
and backward. The refusals and the PyTorch-implementation paths (CPU, float64) run anywhere; the
kernel tests skip without a CUDA device:
    python3 -m pytest python/tests/test_modulation.py -q"""
import os
import re
import subprocess
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
DEV = "cuda"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Max abs error allowed, relative to the largest |reference| of the tensor compared (plus ABS):
# forward, the kernel's fp32 math then the output's rounding (fp16 2^-11, bf16 2^-8 relative);
# gradients as python/tests/test_backward.py.
FWD = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
GRAD = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
ABS = {torch.float32: 1e-6, torch.float16: 1e-5, torch.bfloat16: 1e-4}
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False


def cl_format(dim):
    return torch.channels_last if dim == 4 else torch.channels_last_3d


def make(shape, dtype=torch.float32, layout="nchw", seed=0, scale=1.0, offset=0.0, device=DEV):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * scale + offset).to(device, dtype)
    if layout == "cl":
        x = x.contiguous(memory_format=cl_format(x.dim()))
    return x


def upstream(shape, seed=99, device=DEV):
    """A random upstream gradient of float16-representable values (the same numbers whichever
    dtype y has on either side)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).half().float().to(device)


def close(name, got, ref, rel, absolute):
    """max |got - ref| <= rel * max |ref| + absolute, got cast to float64."""
    assert got is not None, f"{name}: missing"
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    err = (got.double() - ref.double()).abs().max().item() if got.numel() else 0.0
    bound = rel * (ref.double().abs().max().item() if ref.numel() else 0.0) + absolute
    assert err <= bound, f"{name}: max error {err:.3g} > {bound:.3g}"


def act_fn(act):
    return {None: lambda t: t, "relu": F.relu, "silu": F.silu}[act]


def bcast(t, like):
    """(N, C) or (N, C, 1, ...) -> (N, C, 1, ...) broadcasting over like's spatial dims."""
    return None if t is None else t.reshape(tuple(like.shape[:2]) + (1,) * (like.dim() - 2))


def modulate_ref(pre, scale, shift, one_plus_scale, bias=None):
    """The unfused expression after the norm, pre = norm(x) * weight: (pre + bias) * (1 + scale)
    + shift, or pre * scale + bias + shift (AdaIN's convention: the bias is not scaled)."""
    b = None if bias is None else bias.reshape((1, -1) + (1,) * (pre.dim() - 2))
    if scale is not None and not one_plus_scale:
        pre = pre * bcast(scale, pre)
    if b is not None:
        pre = pre + b
    if scale is not None and one_plus_scale:
        pre = pre * (1 + bcast(scale, pre))
    if shift is not None:
        pre = pre + bcast(shift, pre)
    return pre


def check(ours, theirs, inputs, dtype, act=None, seed=99, grads=True, frozen=()):
    """ours(**inputs) (instnorm_torch, act included) against act(theirs(**inputs64)) (PyTorch
    in float64 on the same values), forward and, for the same upstream gradient, the gradients
    of every tensor input but those named in frozen (which require none on either side).
    inputs: name -> tensor or None; clones keep layout and strides."""
    ref_in = {k: None if v is None else v.detach().double().requires_grad_(k not in frozen)
              for k, v in inputs.items()}
    pre64 = theirs(**ref_in)
    y64 = act_fn(act)(pre64)
    our_in = {k: None if v is None else v.detach().clone().requires_grad_(k not in frozen)
              for k, v in inputs.items()}
    y = ours(**our_in)
    x = next(iter(inputs.values()))
    assert y.dtype == x.dtype and y.shape == x.shape
    close("y", y, y64, FWD[dtype], ABS[dtype])
    if not grads:
        return our_in
    gy = upstream(y.shape, seed, y.device).double()
    if act == "relu":  # the jump of ReLU's derivative at 0: no gradient within rounding of it
        gy = gy.masked_fill(pre64.detach().abs() < 1e-3, 0.0)
    y.backward(gy.to(y.dtype))
    y64.backward(gy.to(y.dtype).double())
    for k, v in our_in.items():
        if v is None or k in frozen:
            continue
        assert v.grad is not None, f"d{k}: no gradient"
        assert v.grad.dtype == v.dtype, f"d{k}: dtype {v.grad.dtype} != {v.dtype}"
        close("d" + k, v.grad, ref_in[k].grad, GRAD[dtype], ABS[dtype])
    return our_in


def healthy():
    torch.cuda.synchronize()
    assert torch.ones(1, device="cuda").sum().item() == 1.0


# ---- scale-shift GroupNorm ---------------------------------------------------------------------

GN_SHAPES = [((2, 320, 16, 16), 32, "cl"), ((2, 64, 8, 8), 32, "nchw"), ((3, 6, 7, 7), 3, "nchw"),
             ((3, 6, 7, 7), 3, "cl"), ((2, 12, 5, 6, 7), 4, "cl"), ((4, 64, 31), 8, "nchw"),
             ((1, 8, 64, 64), 2, "cl")]


def gn_inputs(shape, dtype, layout, seed, affine=True, scale=True, shift=True, mod_dtype=None):
    n, c = shape[:2]
    md = mod_dtype or dtype
    return {"x": make(shape, dtype, layout, seed, scale=2.0, offset=0.5),
            "weight": make((c,), dtype, seed=seed + 1) if affine else None,
            "bias": make((c,), dtype, seed=seed + 2) if affine else None,
            "scale": make((n, c), md, seed=seed + 3, scale=0.5) if scale else None,
            "shift": make((n, c), md, seed=seed + 4) if shift else None}


def gn_pair(groups, act, one_plus_scale, eps=1e-5):
    def ours(x, weight, bias, scale, shift):
        return it.group_norm(x, groups, weight, bias, eps, act, scale, shift, one_plus_scale)

    def theirs(x, weight, bias, scale, shift):
        return modulate_ref(F.group_norm(x, groups, weight, None, eps), scale, shift,
                            one_plus_scale, bias)
    return ours, theirs


@needs_cuda
@pytest.mark.parametrize("shape,groups,layout", GN_SHAPES,
                         ids=[f"{s}-g{g}-{l}" for s, g, l in GN_SHAPES])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("one_plus_scale", [True, False])
@pytest.mark.parametrize("act", [None, "silu"], ids=str)
def test_group_norm_scale_shift(shape, groups, layout, dtype, one_plus_scale, act):
    ours, theirs = gn_pair(groups, act, one_plus_scale)
    check(ours, theirs, gn_inputs(shape, dtype, layout, seed=1), dtype, act)


@needs_cuda
@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("parts", ["scale", "shift", "scale+shift"])
@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("one_plus_scale", [True, False])
def test_group_norm_modulation_parts(layout, dtype, parts, affine, one_plus_scale):
    """Either of scale / shift alone (a missing scale is a factor of 1 in both conventions), with
    and without weight and bias, ReLU."""
    ours, theirs = gn_pair(8, "relu", one_plus_scale)
    inputs = gn_inputs((2, 32, 9, 9), dtype, layout, seed=2, affine=affine,
                       scale="scale" in parts, shift="shift" in parts)
    check(ours, theirs, inputs, dtype, "relu")


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mod_dtype", [torch.float32, torch.float64], ids=str)
def test_modulation_of_another_dtype(dtype, mod_dtype):
    """fp16/bf16 x with float32 (read as float) or float64 (converted) scale and shift: the
    output keeps x's dtype, the gradients come back in the modulation's dtype."""
    ours, theirs = gn_pair(4, "silu", True)
    inputs = gn_inputs((2, 16, 12, 12), dtype, "cl", seed=3, mod_dtype=mod_dtype)
    check(ours, theirs, inputs, dtype, "silu")


# ---- scale and shift as views: emb.chunk(2, dim=1) and other strides ---------------------------

@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("emb_dims", [2, 4])
def test_chunk_views_of_an_embedding(dtype, layout, emb_dims):
    """scale, shift = emb.chunk(2, dim=1), emb (N, 2C) or (N, 2C, 1, 1) as a U-Net's embedding
    projection gives it: rows 2C apart, read in place; the gradient reaches emb."""
    n, c = 3, 64
    x0 = make((n, c, 10, 10), dtype, layout, seed=4, scale=2.0)
    w0, b0 = make((c,), dtype, seed=5), make((c,), dtype, seed=6)
    e0 = make((n, 2 * c) + (1,) * (emb_dims - 2), dtype, seed=7, scale=0.5)
    gy = upstream(x0.shape).to(dtype)

    x, w, b, e = (t.clone().requires_grad_() for t in (x0, w0, b0, e0))
    scale, shift = e.chunk(2, dim=1)
    assert scale.stride(0) == 2 * c and not scale.is_contiguous()
    y = it.group_norm(x, 32, w, b, activation="silu", scale=scale, shift=shift)
    y.backward(gy)

    x64, w64, b64, e64 = (t.detach().double().requires_grad_() for t in (x0, w0, b0, e0))
    s64, t64 = e64.chunk(2, dim=1)
    y64 = F.silu(F.group_norm(x64, 32, w64, b64) * (1 + bcast(s64, x64)) + bcast(t64, x64))
    y64.backward(gy.double())
    close("y", y, y64, FWD[dtype], ABS[dtype])
    for name, t, r in (("dx", x, x64), ("dweight", w, w64), ("dbias", b, b64), ("demb", e, e64)):
        assert t.grad.dtype == t.dtype and t.grad.shape == t.shape
        close(name, t.grad, r.grad, GRAD[dtype], ABS[dtype])


@needs_cuda
def test_chunk_views_are_not_copied():
    """The forward of a chunked embedding runs no copy of scale or shift (the kernel reads the
    rows at their stride): no aten::copy_ / aten::clone / aten::contiguous in the call."""
    n, c = 2, 32
    x = make((n, c, 8, 8), torch.float16, "cl", seed=8)
    emb = make((n, 2 * c), torch.float16, seed=9)
    scale, shift = emb.chunk(2, dim=1)
    it.group_norm(x, 8, scale=scale, shift=shift)  # loaded and warm
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        y = it.group_norm(x, 8, scale=scale, shift=shift, activation="silu")
    names = {e.name for e in prof.events()}
    for op in ("aten::copy_", "aten::clone", "aten::contiguous", "aten::_to_copy"):
        assert op not in names, f"{op} ran: {sorted(names)}"
    ref = F.silu(F.group_norm(x.double(), 8) * (1 + bcast(scale.double(), x))
                 + bcast(shift.double(), x))
    close("y", y, ref, FWD[torch.float16], ABS[torch.float16])


STRIDED = {
    "transposed": lambda t: t.t().contiguous().t(),            # stride(1) = N: copied
    "every_other_channel": lambda t: torch.cat([t, t], 1).reshape(t.shape[0], -1, 2)[..., 0],
    "row_of_a_wider_matrix": lambda t: torch.cat([t, t[:, :5]], 1)[:, :t.shape[1]],  # stride C+5
    "expanded_sample": lambda t: t[:1].expand(t.shape[0], -1),  # stride(0) = 0: copied
    "offset_view": lambda t: torch.cat([t.new_zeros(t.shape[0], 1), t], 1)[:, 1:],  # misaligned
}


@needs_cuda
@pytest.mark.parametrize("how", list(STRIDED))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_strided_scale_and_shift(how, dtype):
    """Rows with channels contiguous are read at their stride (any offset); anything else is
    copied first. Gradients reach the base tensors through the views."""
    n, c = 3, 24
    base_s = make((n, c), dtype, seed=10, scale=0.5)
    base_t = make((n, c), dtype, seed=11)
    x0 = make((n, c, 7, 9), dtype, "nchw", seed=12, scale=2.0)
    gy = upstream(x0.shape).to(dtype)
    x, bs, bt = (t.clone().requires_grad_() for t in (x0, base_s, base_t))
    y = it.group_norm(x, 6, activation="silu", scale=STRIDED[how](bs), shift=STRIDED[how](bt))
    y.backward(gy)
    x64, bs64, bt64 = (t.detach().double().requires_grad_() for t in (x0, base_s, base_t))
    y64 = F.silu(modulate_ref(F.group_norm(x64, 6), STRIDED[how](bs64), STRIDED[how](bt64),
                              True))
    y64.backward(gy.double())
    close("y", y, y64, FWD[dtype], ABS[dtype])
    for name, t, r in (("dx", x, x64), ("dscale", bs, bs64), ("dshift", bt, bt64)):
        close(name, t.grad, r.grad, GRAD[dtype], ABS[dtype])


# ---- instance norm with a modulation -------------------------------------------------------------

IN_SHAPES = [((3, 5, 7, 7), "nchw"), ((3, 5, 7, 7), "cl"), ((2, 16, 9, 11), "cl"),
             ((1, 8, 64, 64), "nchw"), ((2, 3, 100), "nchw"), ((2, 4, 5, 6, 8), "cl")]


@needs_cuda
@pytest.mark.parametrize("shape,layout", IN_SHAPES, ids=[f"{s}-{l}" for s, l in IN_SHAPES])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("one_plus_scale", [True, False])
def test_instance_norm_scale_shift(shape, layout, dtype, one_plus_scale):
    n, c = shape[:2]
    inputs = {"x": make(shape, dtype, layout, seed=13, scale=2.0),
              "weight": make((c,), seed=14), "bias": make((c,), seed=15),  # float32, as F takes
              "scale": make((n, c) + (1,) * (len(shape) - 2), dtype, seed=16, scale=0.5),
              "shift": make((n, c), dtype, seed=17)}

    def ours(x, weight, bias, scale, shift):
        return it.instance_norm(x, weight, bias, activation="silu", scale=scale, shift=shift,
                                one_plus_scale=one_plus_scale)

    def theirs(x, weight, bias, scale, shift):
        return modulate_ref(F.instance_norm(x, weight=weight), scale, shift, one_plus_scale,
                            bias)
    check(ours, theirs, inputs, dtype, "silu")


@needs_cuda
@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("use_input_stats", [True, False])
def test_instance_norm_modulation_with_running_stats(layout, use_input_stats):
    """Training (running statistics updated as F.instance_norm updates them) and eval mode
    (normalized by them), with a per-sample scale and shift."""
    n, c = 4, 8
    rm, rv = make((c,), seed=18), make((c,), seed=19).abs() + 0.5
    rm_ref, rv_ref = rm.double(), rv.double()
    inputs = {"x": make((n, c, 10, 12), torch.float32, layout, seed=20, scale=2.0, offset=1.0),
              "scale": make((n, c), seed=21, scale=0.5), "shift": make((n, c), seed=22)}

    def ours(x, scale, shift):
        return it.instance_norm(x, None, None, rm, rv, use_input_stats, 0.3, scale=scale,
                                shift=shift)

    def theirs(x, scale, shift):
        return modulate_ref(F.instance_norm(x, rm_ref, rv_ref, None, None, use_input_stats, 0.3),
                            scale, shift, True)
    check(ours, theirs, inputs, torch.float32)
    torch.testing.assert_close(rm.double(), rm_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rv.double(), rv_ref, rtol=1e-5, atol=1e-6)


# ---- statistics ----------------------------------------------------------------------------------

def stats_ref(x, groups, eps, unbiased):
    n, c = x.shape[:2]
    g = c if groups is None else groups
    xv = x.reshape(n, g, -1)
    var = xv.var(dim=2, correction=1 if unbiased else 0)
    return xv.mean(dim=2), (var + eps).sqrt()


STAT_CASES = [((2, 8, 16, 16), None, "nchw"), ((2, 8, 16, 16), None, "cl"),
              ((3, 5, 7, 7), None, "nchw"), ((2, 320, 8, 8), 32, "cl"),
              ((2, 12, 5, 6, 7), 4, "nchw"),
              ((1, 4, 256, 256), None, "nchw"), ((2, 6, 100), 3, "nchw")]


@needs_cuda
@pytest.mark.parametrize("shape,groups,layout", STAT_CASES,
                         ids=[f"{s}-g{g}-{l}" for s, g, l in STAT_CASES])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("unbiased", [False, True])
def test_statistics(shape, groups, layout, dtype, unbiased):
    x0 = make(shape, dtype, layout, seed=23, scale=3.0, offset=2.0)
    x = x0.clone().requires_grad_()
    mean, std = it.statistics(x, groups, 1e-5, unbiased)
    g = shape[1] if groups is None else groups
    assert mean.shape == std.shape == (shape[0], g)
    assert mean.dtype == std.dtype == torch.float32
    x64 = x0.double().requires_grad_()
    m64, s64 = stats_ref(x64, groups, 1e-5, unbiased)
    close("mean", mean, m64, 1e-5, 1e-6)
    close("std", std, s64, 1e-5, 1e-6)
    gm, gs = upstream(mean.shape, 1), upstream(std.shape, 2)
    (mean * gm + std * gs).sum().backward()
    (m64 * gm.double() + s64 * gs.double()).sum().backward()
    assert x.grad.dtype == dtype
    close("dx", x.grad, x64.grad, GRAD[dtype], ABS[dtype])


@needs_cuda
def test_statistics_only_mean_or_only_std_used():
    x0 = make((2, 6, 9, 9), seed=24)
    for pick in (0, 1):
        x = x0.clone().requires_grad_()
        it.statistics(x, 3, unbiased=True)[pick].sum().backward()
        x64 = x0.double().requires_grad_()
        stats_ref(x64, 3, 1e-5, True)[pick].sum().backward()
        close("dx", x.grad, x64.grad, 1e-5, 1e-7)


# ---- AdaIN ---------------------------------------------------------------------------------------

def calc_mean_std(feat, eps=1e-5):
    """The reference AdaIN's calc_mean_std (reshape instead of view: channels-last works)."""
    size = feat.size()
    n, c = size[:2]
    feat_var = feat.reshape(n, c, -1).var(dim=2) + eps
    feat_std = feat_var.sqrt().reshape(n, c, *([1] * (len(size) - 2)))
    feat_mean = feat.reshape(n, c, -1).mean(dim=2).reshape(n, c, *([1] * (len(size) - 2)))
    return feat_mean, feat_std


def adain_ref(content, style, eps=1e-5):
    """The reference adaptive_instance_normalization(content_feat, style_feat)."""
    assert content.size()[:2] == style.size()[:2]
    size = content.size()
    style_mean, style_std = calc_mean_std(style, eps)
    content_mean, content_std = calc_mean_std(content, eps)
    normalized = (content - content_mean.expand(size)) / content_std.expand(size)
    return normalized * style_std.expand(size) + style_mean.expand(size)


ADAIN_CASES = [((2, 8, 16, 16), (2, 8, 12, 20), "nchw"), ((4, 64, 32, 32), (4, 64, 32, 32), "cl"),
               ((1, 3, 7, 7), (1, 3, 9, 9), "nchw"), ((2, 16, 50), (2, 16, 40), "nchw"),
               ((2, 512, 8, 8), (2, 512, 16, 16), "cl")]


@needs_cuda
@pytest.mark.parametrize("cshape,sshape,layout", ADAIN_CASES,
                         ids=[f"{c}-{s}-{l}" for c, s, l in ADAIN_CASES])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("style_grad", [False, True])
def test_adaptive_instance_norm(cshape, sshape, layout, dtype, style_grad):
    inputs = {"content": make(cshape, dtype, layout, seed=25, scale=2.0, offset=1.0),
              "style": make(sshape, dtype, layout, seed=26, scale=3.0, offset=-2.0)}

    got = check(it.adaptive_instance_norm, adain_ref, inputs, dtype,
                frozen=() if style_grad else ("style",))
    assert (got["style"].grad is not None) == style_grad


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("stat_dims", [2, 4])
def test_adaptive_instance_norm_with_stats(dtype, stat_dims):
    """The style's mean and std given ((N, C) or calc_mean_std's (N, C, 1, 1)), float32 with
    16-bit content, their gradients from the fused backward."""
    n, c = 3, 32
    style = make((n, c, 11, 13), torch.float32, seed=27, scale=2.0, offset=0.5)
    sm, ss = calc_mean_std(style)
    if stat_dims == 2:
        sm, ss = sm.reshape(n, c), ss.reshape(n, c)
    inputs = {"content": make((n, c, 16, 16), dtype, "cl", seed=28, scale=2.0),
              "style_mean": sm, "style_std": ss}

    def ours(content, style_mean, style_std):
        return it.adaptive_instance_norm_with_stats(content, style_mean, style_std)

    def theirs(content, style_mean, style_std):
        size = content.size()
        cm, cs = calc_mean_std(content)
        return ((content - cm.expand(size)) / cs.expand(size) * bcast(style_std, content)
                + bcast(style_mean, content))
    check(ours, theirs, inputs, dtype)


@needs_cuda
def test_adaptive_instance_norm_style_of_another_dtype():
    """bf16 content, float32 style (the statistics and their gradients in float32)."""
    inputs = {"content": make((2, 16, 12, 12), torch.bfloat16, "cl", seed=29, scale=2.0),
              "style": make((2, 16, 10, 10), torch.float32, seed=30, scale=2.0, offset=1.0)}
    ref_in = {k: v.double().requires_grad_() for k, v in inputs.items()}
    our_in = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    y = it.adaptive_instance_norm(**our_in)
    assert y.dtype == torch.bfloat16
    y64 = adain_ref(**ref_in)
    close("y", y, y64, FWD[torch.bfloat16], ABS[torch.bfloat16])
    gy = upstream(y.shape)
    y.backward(gy.to(y.dtype))
    y64.backward(gy.to(y.dtype).double())
    close("dcontent", our_in["content"].grad, ref_in["content"].grad, GRAD[torch.bfloat16], 1e-4)
    assert our_in["style"].grad.dtype == torch.float32
    close("dstyle", our_in["style"].grad, ref_in["style"].grad, GRAD[torch.bfloat16], 1e-4)


@needs_cuda
def test_adaptive_instance_norm_large_offset_fp32():
    """|mean| = 1e3 std in content (and in a second style): fp32 keeps the reference's digits
    (E[x^2] - E[x]^2 in fp32 would lose about 6 of them)."""
    content = make((2, 8, 32, 32), seed=31, offset=1e3)
    style = make((2, 8, 32, 32), seed=32)
    close("y", it.adaptive_instance_norm(content, style),
          adain_ref(content.double(), style.double()), 1e-5, 1e-5)
    style = make((2, 8, 32, 32), seed=32, offset=-1e3)
    sm, ss = it.statistics(style, unbiased=True)
    rm, rs = calc_mean_std(style.double())
    close("style mean", sm, rm.reshape(2, 8), 1e-7, 1e-6)
    close("style std", ss, rs.reshape(2, 8), 1e-5, 1e-6)


# ---- what runs -----------------------------------------------------------------------------------

@needs_cuda
def test_backward_runs_the_fused_op_with_modulation():
    """The modulation's gradients come from instnorm_torch::backward, not from PyTorch ops."""
    x = make((2, 32, 8, 8), seed=33).requires_grad_()
    emb = make((2, 64), seed=34).requires_grad_()
    scale, shift = emb.chunk(2, dim=1)
    y = it.group_norm(x, 8, activation="silu", scale=scale, shift=shift)
    assert "instnorm_torch_norm" in type(y.grad_fn).__name__, type(y.grad_fn).__name__
    loss = y.sum()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        loss.backward()
    names = [e.name for e in prof.events()]
    assert "instnorm_torch::backward" in names, sorted(set(names))
    for op in ("aten::sigmoid", "aten::silu_backward", "aten::mean",
               "aten::native_group_norm_backward"):
        assert op not in names, f"{op} ran in the backward"
    assert emb.grad is not None and x.grad is not None


@needs_cuda
def test_only_some_inputs_require_grad():
    x0 = make((2, 16, 8, 8), torch.float16, "cl", seed=35)
    s0, t0 = make((2, 16), torch.float16, seed=36, scale=0.5), make((2, 16), torch.float16, seed=37)
    for which in ("x", "scale", "shift", "scale+shift"):
        x, s, t = x0.clone(), s0.clone(), t0.clone()
        for name, v in (("x", x), ("scale", s), ("shift", t)):
            v.requires_grad_(name in which.split("+"))
        gy = upstream(x0.shape)
        (it.group_norm(x, 4, scale=s, shift=t, activation="silu").float() * gy).sum().backward()
        x64, s64, t64 = (v.double().requires_grad_() for v in (x0, s0, t0))
        (F.silu(modulate_ref(F.group_norm(x64, 4), s64, t64, True)) * gy.double()).sum().backward()
        for name, v, r in (("x", x, x64), ("scale", s, s64), ("shift", t, t64)):
            if v.requires_grad:
                close("d" + name, v.grad, r.grad, GRAD[torch.float16], ABS[torch.float16])
            else:
                assert v.grad is None


@needs_cuda
def test_no_grad_call_and_forward_never_writes_inputs():
    x = make((2, 16, 8, 8), torch.float16, "cl", seed=38)
    emb = make((2, 32), torch.float16, seed=39)
    x0, e0 = x.clone(), emb.clone()
    with torch.no_grad():
        y = it.group_norm(x, 4, scale=emb[:, :16], shift=emb[:, 16:])
    assert torch.equal(x, x0) and torch.equal(emb, e0)
    ref = modulate_ref(F.group_norm(x.double(), 4), emb[:, :16].double(), emb[:, 16:].double(),
                       True)
    close("y", y, ref, FWD[torch.float16], ABS[torch.float16])


@needs_cuda
@pytest.mark.parametrize("cast", [torch.float16, torch.bfloat16])
def test_autocast_scale_shift_group_norm(cast):
    """Under autocast group_norm computes in float32 (as autocast does for F.group_norm); the
    unfused expression's multiply and add promote to float32 as well. The reference takes
    1 + scale in float32, as the kernel does (in float16 it rounds to 2^-11, 2e-3 on these
    values)."""
    x = make((2, 32, 8, 8), torch.float16, "cl", seed=40)
    emb = make((2, 64), torch.float16, seed=41, scale=0.5)
    w, b = make((32,), seed=42), make((32,), seed=43)
    s, t = emb.chunk(2, dim=1)
    with torch.autocast("cuda", dtype=cast):
        got = it.group_norm(x, 8, w, b, activation="silu", scale=s, shift=t)
        want = F.silu(F.group_norm(x, 8, w, b) * (1 + bcast(s, x).float()) + bcast(t, x))
    assert got.dtype == want.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ---- the ops themselves --------------------------------------------------------------------------

@needs_cuda
def test_opcheck():
    """torch.library.opcheck of the ops with the modulation arguments and of statistics:
    schemas, fake implementations against the real ones, autograd registration, AOT dispatch."""
    x = make((2, 8, 6, 6), torch.float16, "cl", seed=44)
    w = make((8,), seed=45)
    emb = make((2, 16), torch.float16, seed=46).requires_grad_()
    s, t = emb.chunk(2, dim=1)
    cases = [
        (x.clone().requires_grad_(), w.clone().requires_grad_(), None, None, None, True, 0.1,
         1e-5, 2, 2, s, t, True, False),
        (x, None, None, None, None, True, 0.1, 1e-5, 0, 0, t, s, False, True),
        (x.clone().requires_grad_(), None, None, None, None, True, 0.1, 1e-5, 0, 1, None,
         t.float(), False, False),
    ]
    for args in cases:
        torch.library.opcheck(torch.ops.instnorm_torch.norm.default, args)
    sd, td = s.detach(), t.detach()
    y, mean, rstd, _, _ = torch.ops.instnorm_torch.norm(x, w, None, None, None, True, 0.1, 1e-5,
                                                        2, 2, sd, td, True, False)
    dy = torch.randn_like(y)
    torch.library.opcheck(torch.ops.instnorm_torch.backward.default,
                          (x, dy, w, None, None, None, mean, rstd, True, 1e-5, 2, 2, True, False,
                           sd, td, True, False, True, True),
                          test_utils=("test_schema", "test_faketensor"))
    for xs, g in ((make((2, 8, 6, 6), seed=47).requires_grad_(), 0),
                  (make((2, 8, 6, 6), torch.bfloat16, "cl", seed=48).requires_grad_(), 4)):
        torch.library.opcheck(torch.ops.instnorm_torch.statistics.default, (xs, g, 1e-5, True))


_DIRECT_CHILD = """
import sys, torch
sys.path.insert(0, {root!r})
import instnorm_torch
x = torch.randn(2, 6, 5, 6, device="cuda")
s = torch.randn(2, 6, device="cuda")
cases = [
    ("scale (C,)", lambda: torch.ops.instnorm_torch.norm(x, None, None, None, None, True, 0.1,
        1e-5, 0, 0, s[0], None, True, False),
        "scale must have shape \\\\(N, C\\\\) = \\\\(2, 6\\\\)"),
    ("shift on the CPU", lambda: torch.ops.instnorm_torch.forward(x, None, None, None, None, True,
        0.1, 1e-5, 0, 0, None, s.cpu(), True, False), "shift must be on x's device"),
    ("integer scale", lambda: torch.ops.instnorm_torch.norm(x, None, None, None, None, True, 0.1,
        1e-5, 0, 0, s.long(), None, True, False), "scale must have a floating-point dtype"),
    ("unbiased, one value per plane", lambda: torch.ops.instnorm_torch.norm(x[:, :, :1, :1], None,
        None, None, None, True, 0.1, 1e-5, 0, 0, None, None, False, True), "unbiased variance"),
    ("statistics, groups 4 of 6", lambda: torch.ops.instnorm_torch.statistics(x, 4, 1e-5, False),
        "groups must divide"),
    ("statistics, eps -1", lambda: torch.ops.instnorm_torch.statistics(x, 0, -1.0, False),
        "eps must be"),
    ("backward, dscale (C,)", lambda: torch.ops.instnorm_torch.backward(x, x, None, None, None,
        None, torch.zeros(12, device="cuda"), torch.ones(12, device="cuda"), True, 1e-5, 0, 0,
        False, False, s[0], None, True, False, True, False), "scale must have shape"),
]
import re
for name, call, msg in cases:
    try:
        call()
        print("NO EXCEPTION", name)
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        print("RAISED" if re.search(msg, first) else "WRONG MESSAGE", name, "|", first)
torch.cuda.synchronize()
assert torch.ones(1, device="cuda").sum().item() == 1.0
print("HEALTHY")
"""


@needs_cuda
def test_direct_op_calls_refuse_bad_modulation():
    """The ops themselves (no Python checks) refuse a bad scale/shift and the unbiased variance
    of one value, naming the argument or instnorm's reason; the process and its CUDA context
    survive (a child process, as test_package_edges does for the earlier arguments)."""
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    r = subprocess.run([sys.executable, "-c", _DIRECT_CHILD.format(root=root)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"the process ended with {r.returncode}:\n{r.stderr[-2000:]}"
    bad = [line for line in r.stdout.splitlines() if not line.startswith(("RAISED", "HEALTHY"))]
    assert not bad and "HEALTHY" in r.stdout, r.stdout


# ---- torch.compile -------------------------------------------------------------------------------

class ScaleShiftBlock(nn.Module):
    """An ADM ResBlock's out_layers with use_scale_shift_norm, and an AdaIN of its output."""

    def __init__(self, c=64, e=32):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.emb = nn.Linear(e, 2 * c)
        self.gn_w = nn.Parameter(torch.randn(c) * 0.5 + 1)
        self.gn_b = nn.Parameter(torch.randn(c) * 0.1)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x, emb, style):
        h = self.conv1(x)
        scale, shift = self.emb(emb).chunk(2, dim=1)
        h = it.group_norm(h, 32, self.gn_w, self.gn_b, activation="silu", scale=scale,
                          shift=shift)
        return it.adaptive_instance_norm(self.conv2(h), style)


@needs_cuda
@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_compiled_training_step_matches_eager(layout):
    torch.manual_seed(0)
    eager = ScaleShiftBlock().to(DEV)
    compiled_mod = ScaleShiftBlock().to(DEV)
    compiled_mod.load_state_dict(eager.state_dict())
    if layout == "cl":
        eager = eager.to(memory_format=torch.channels_last)
        compiled_mod = compiled_mod.to(memory_format=torch.channels_last)
    x = make((2, 64, 16, 16), layout=layout, seed=49)
    emb = make((2, 32), seed=50)
    style0 = make((2, 64, 8, 8), layout=layout, seed=51, scale=2.0)

    def loss_fn(m, x, emb, style):
        return m(x, emb, style).square().mean()

    loss_c = torch.compile(loss_fn, fullgraph=True)
    for _ in range(2):
        for m in (eager, compiled_mod):
            m.zero_grad(set_to_none=True)
        se, sc = style0.clone().requires_grad_(), style0.clone().requires_grad_()
        le = loss_fn(eager, x, emb, se)
        le.backward()
        lc = loss_c(compiled_mod, x, emb, sc)
        lc.backward()
        torch.testing.assert_close(lc, le, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(sc.grad, se.grad, rtol=1e-4, atol=1e-6)
        for (name, pe), pc in zip(eager.named_parameters(), compiled_mod.parameters()):
            torch.testing.assert_close(pc.grad, pe.grad, rtol=1e-4, atol=1e-5, msg=name)


# ---- PyTorch's implementation (CPU, float64): runs anywhere --------------------------------------

@pytest.mark.parametrize("dev", DEVICES)
def test_float64_gradcheck(dev):
    """float64 runs PyTorch's ops: gradcheck through the modulation, statistics and AdaIN."""
    g = torch.Generator().manual_seed(52)

    def t(*shape, s=1.0):
        return (torch.randn(shape, generator=g, dtype=torch.float64) * s).to(dev).requires_grad_()
    x, w, b = t(2, 4, 3, 5), t(4), t(4)
    s, sh = t(2, 4, s=0.5), t(2, 4, 1, 1)
    for one_plus in (True, False):
        assert torch.autograd.gradcheck(
            lambda x, w, b, s, sh: it.group_norm(x, 2, w, b, activation="silu", scale=s,
                                                 shift=sh, one_plus_scale=one_plus),
            (x, w, b, s, sh))
        assert torch.autograd.gradcheck(
            lambda x, s, sh: it.instance_norm(x, scale=s, shift=sh, one_plus_scale=one_plus),
            (x, s, sh))
    style = t(2, 4, 4, 6)
    assert torch.autograd.gradcheck(it.adaptive_instance_norm, (x, style))
    assert torch.autograd.gradcheck(
        lambda x, m, sd: it.adaptive_instance_norm_with_stats(x, m, sd), (x, sh, s))
    assert torch.autograd.gradcheck(lambda x: it.statistics(x, 2, unbiased=True), (x,))


@pytest.mark.parametrize("dev", DEVICES)
def test_float64_matches_the_unfused_expressions(dev):
    x = make((2, 6, 5, 7), torch.float64, device=dev, seed=53)
    style = make((2, 6, 4, 4), torch.float64, device=dev, seed=54, scale=2.0, offset=1.0)
    s, sh = make((2, 6), torch.float64, device=dev, seed=55), make((2, 6), torch.float64,
                                                                    device=dev, seed=56)
    y = it.group_norm(x, 3, activation="silu", scale=s, shift=sh)
    assert torch.equal(y, F.silu(F.group_norm(x, 3) * (1 + bcast(s, x)) + bcast(sh, x)))
    y = it.group_norm(x, 3, scale=s, shift=sh, one_plus_scale=False)
    assert torch.equal(y, F.group_norm(x, 3) * bcast(s, x) + bcast(sh, x))
    torch.testing.assert_close(it.adaptive_instance_norm(x, style), adain_ref(x, style),
                               rtol=1e-12, atol=1e-12)
    m, sd = it.statistics(style, unbiased=True)
    rm, rsd = calc_mean_std(style)
    assert m.dtype == torch.float64
    torch.testing.assert_close(m, rm.reshape(2, 6), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sd, rsd.reshape(2, 6), rtol=1e-12, atol=1e-12)


def test_cpu_float32_and_half_keep_xs_dtype():
    x = make((2, 4, 6, 6), torch.float32, device="cpu", seed=57)
    s64 = make((2, 4), torch.float64, device="cpu", seed=58)
    y = it.group_norm(x, 2, scale=s64, shift=s64)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, (F.group_norm(x, 2) * (1 + bcast(s64, x))
                                   + bcast(s64, x)).float())
    m, sd = it.statistics(x.bfloat16())
    assert m.dtype == sd.dtype == torch.float32 and m.shape == (2, 4)


@pytest.mark.parametrize("dev", DEVICES)
def test_empty_input(dev):
    """Empty input runs PyTorch's ops (as the package does for plain calls)."""
    x = torch.randn(0, 4, 3, 3, device=dev)
    s = torch.randn(0, 4, device=dev)
    try:
        want = F.group_norm(x, 2)
    except Exception as e:  # noqa: BLE001
        with pytest.raises(type(e)):
            it.group_norm(x, 2, scale=s, shift=s)
    else:
        assert it.group_norm(x, 2, scale=s, shift=s).shape == want.shape
    m, sd = it.statistics(x)
    assert m.shape == sd.shape == (0, 4)
    assert it.adaptive_instance_norm(x, torch.randn(0, 4, 5, 5, device=dev)).shape == x.shape


# ---- refusals: before anything runs, the argument named ------------------------------------------

def shape_msg(name, n, c, dims, got, xname="x", xshape=None):
    ones = "".join(", 1" for _ in range(dims - 2))
    alt = f" or (N, C{ones}) = {(n, c) + (1,) * (dims - 2)}" if dims > 2 else ""
    return re.escape(f"{name} must have shape (N, C) = {(n, c)}{alt} for {xname} of shape "
                     f"{xshape} (got shape {got})")


@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize("name", ["scale", "shift"])
@pytest.mark.parametrize("shape", [(3,), (1, 3), (2, 4), (2, 3, 1), (2, 3, 2, 1), (2, 3, 1, 1, 1)])
def test_wrong_modulation_shape_raises(dev, name, shape):
    x = make((2, 3, 5, 6), device=dev)
    bad = torch.ones(shape, device=dev)
    msg = shape_msg(name, 2, 3, 4, shape, xshape=(2, 3, 5, 6))
    with pytest.raises(RuntimeError, match="group_norm: " + msg):
        it.group_norm(x, 1, **{name: bad})
    with pytest.raises(RuntimeError, match="instance_norm: " + msg):
        it.instance_norm(x, **{name: bad})


@pytest.mark.parametrize("dev", DEVICES)
def test_modulation_shapes_follow_xs_rank(dev):
    x3 = make((2, 3, 10), device=dev)
    ok = it.group_norm(x3, 1, scale=torch.zeros(2, 3, 1, device=dev))
    torch.testing.assert_close(ok, F.group_norm(x3, 1))
    with pytest.raises(RuntimeError, match=shape_msg("scale", 2, 3, 3, (2, 3, 1, 1),
                                                     xshape=(2, 3, 10))):
        it.group_norm(x3, 1, scale=torch.zeros(2, 3, 1, 1, device=dev))
    x2 = make((4, 3), device=dev)
    with pytest.raises(RuntimeError, match=re.escape("scale must have shape (N, C) = (4, 3) for "
                                                     "x of shape (4, 3) (got shape (4, 3, 1))")):
        it.group_norm(x2, 1, scale=torch.zeros(4, 3, 1, device=dev))


@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.complex64])
def test_non_floating_modulation_raises(dev, dtype):
    x = make((2, 3, 5, 6), device=dev)
    bad = torch.ones(2, 3, device=dev).to(dtype)
    for name in ("scale", "shift"):
        with pytest.raises(RuntimeError, match=re.escape(
                f"{name} must have a floating-point dtype (got {dtype})")):
            it.group_norm(x, 1, **{name: bad})
    with pytest.raises(RuntimeError, match=re.escape(
            f"style_std must have a floating-point dtype (got {dtype})")):
        it.adaptive_instance_norm_with_stats(x, torch.ones(2, 3, device=dev), bad)
    with pytest.raises(RuntimeError, match=re.escape(
            f"style must have a floating-point dtype (got {dtype})")):
        it.adaptive_instance_norm(x, torch.ones(2, 3, 4, 4, device=dev).to(dtype))


@pytest.mark.parametrize("dev", DEVICES)
def test_wrong_python_types_raise_type_error(dev):
    x = make((2, 3, 5, 6), device=dev)
    with pytest.raises(TypeError,
                       match=re.escape("scale must be a torch.Tensor or None (got list)")):
        it.group_norm(x, 1, scale=[[1.0] * 3] * 2)
    with pytest.raises(TypeError,
                       match=re.escape("style_mean must be a torch.Tensor (got NoneType)")):
        it.adaptive_instance_norm_with_stats(x, None, torch.ones(2, 3, device=dev))
    with pytest.raises(TypeError, match=re.escape("style must be a torch.Tensor (got float)")):
        it.adaptive_instance_norm(x, 1.0)
    with pytest.raises(TypeError, match=re.escape("content must be a torch.Tensor (got NoneType)")):
        it.adaptive_instance_norm(None, x)
    with pytest.raises(TypeError, match="groups must be an int or None"):
        it.statistics(x, 1.5)


@needs_cuda
def test_modulation_on_another_device_raises_before_launch():
    x = make((2, 3, 5, 6))
    s = torch.ones(2, 3)
    msg = re.escape("must be on x's device cuda:0 (got cpu)")
    with pytest.raises(RuntimeError, match="group_norm: scale " + msg):
        it.group_norm(x, 1, scale=s)
    with pytest.raises(RuntimeError, match="instance_norm: shift " + msg):
        it.instance_norm(x, shift=s)
    with pytest.raises(RuntimeError, match=re.escape(
            "adaptive_instance_norm_with_stats: style_mean must be on content's device cuda:0 "
            "(got cpu)")):
        it.adaptive_instance_norm_with_stats(x, s, s.cuda())
    with pytest.raises(RuntimeError, match=re.escape(
            "adaptive_instance_norm: style must be on content's device cuda:0 (got cpu)")):
        it.adaptive_instance_norm(x, torch.ones(2, 3, 4, 4))
    with pytest.raises(RuntimeError,
                       match=re.escape("scale must be on x's device cpu (got cuda:0)")):
        it.group_norm(x.cpu(), 1, scale=s.cuda())
    healthy()


@pytest.mark.parametrize("dev", DEVICES)
def test_adain_refusals(dev):
    c = make((2, 3, 5, 6), device=dev)
    with pytest.raises(RuntimeError, match=re.escape(
            "style must be (N, C, *) with content's N, C = (2, 3) (got shape (1, 3, 4, 4))")):
        it.adaptive_instance_norm(c, make((1, 3, 4, 4), device=dev))
    with pytest.raises(RuntimeError, match=re.escape("got shape (2, 4, 4, 4)")):
        it.adaptive_instance_norm(c, make((2, 4, 4, 4), device=dev))
    with pytest.raises(ValueError, match="style needs more than 1 spatial element"):
        it.adaptive_instance_norm(c, make((2, 3, 1, 1), device=dev))
    with pytest.raises(ValueError, match="content needs more than 1 spatial element"):
        it.adaptive_instance_norm(make((2, 3, 1, 1), device=dev), c)
    with pytest.raises(ValueError, match="content needs more than 1 spatial element"):
        it.adaptive_instance_norm_with_stats(make((2, 3), device=dev), c[:, :, 0, 0],
                                             c[:, :, 0, 0])
    with pytest.raises(RuntimeError, match=shape_msg("style_std", 2, 3, 4, (3,), "content",
                                                     (2, 3, 5, 6))):
        it.adaptive_instance_norm_with_stats(c, c[:, :, 0, 0], torch.ones(3, device=dev))
    with pytest.raises(ValueError, match=re.escape("eps must be finite (in float32) and >= 0")):
        it.adaptive_instance_norm(c, c, eps=-1.0)
    with pytest.raises(RuntimeError, match="content must have at least 2 dimensions"):
        it.adaptive_instance_norm(c[0, 0, 0], c)


@pytest.mark.parametrize("dev", DEVICES)
def test_statistics_refusals(dev):
    x = make((2, 6, 4, 4), device=dev)
    with pytest.raises(RuntimeError,
                       match=re.escape("groups must divide C (got C = 6, groups = 4)")):
        it.statistics(x, 4)
    with pytest.raises(RuntimeError, match=re.escape("groups must be > 0 (got 0)")):
        it.statistics(x, 0)
    with pytest.raises(ValueError, match="unbiased variance needs more than 1 value per group"):
        it.statistics(make((2, 6, 1), device=dev), unbiased=True)
    m, sd = it.statistics(make((2, 6, 1), device=dev), 3, unbiased=True)  # 2 values per group
    assert m.shape == (2, 3)
    with pytest.raises(ValueError, match="eps must be finite"):
        it.statistics(x, eps=float("nan"))
    with pytest.raises(RuntimeError, match=re.escape(
            "x must have a floating-point dtype (got torch.int64)")):
        it.statistics(x.long())
    with pytest.raises(RuntimeError, match="x must have at least 2 dimensions"):
        it.statistics(x[0, 0, 0])


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
