"""The functional API: instance_norm, group_norm (both with an optional per-sample scale and
shift), statistics, adaptive_instance_norm (AdaIN), with autograd.

Every call is checked before anything runs. A call PyTorch's op would refuse raises the exception
PyTorch raises (ValueError or RuntimeError), and so does a call the kernel cannot run (a tensor on
another device, an integer or complex parameter, a bad eps, momentum or activation): the message
names the argument, the rule and the value. What passes runs the kernel when x is a non-empty
CUDA tensor of float32, float16 or bfloat16 with parameters it takes; any other input (CPU,
float64, empty, other parameter dtypes) runs PyTorch's own implementation plus the activation,
so it behaves exactly as F.instance_norm / F.group_norm.

Autograd: the kernel's forward is the functional custom op instnorm_torch::norm, whose gradient
(torch.library.register_autograd) is the custom op instnorm_torch::backward, instnorm's fused
backward kernel (dx, dweight, dbias, dscale, dshift in one call). register_autograd refuses an op
that mutates an argument, so the running statistics are not updated by norm itself: it returns
their new values and _run copies them in. A call that needs no gradient runs
instnorm_torch::forward, which updates them in place.

The per-sample modulation (scale, shift per (sample, channel): the scale-shift GroupNorm of
diffusion U-Nets, FiLM, AdaIN) is applied by the same kernel after the per-channel affine:
    one_plus_scale=True:   y = act((norm(x) * weight + bias) * (1 + scale) + shift)
    one_plus_scale=False:  y = act(norm(x) * weight * scale + bias + shift)
scale and shift are (N, C) or (N, C, 1, ..., 1) tensors; the kernel reads their rows in place
when the channels are contiguous (stride(1) == 1), so the halves of emb.chunk(2, dim=1) cost no
copy. Their gradients (per (sample, channel)) come from the fused backward too.

statistics() is instnorm_torch::statistics (one read of x: the mean and sqrt(var + eps) of each
(sample, group)); its gradient is registered as PyTorch ops on the saved x, mean and std
(d mean/dx = 1/S, d std/dx = (x - mean) / (D * std), D = S - 1 unbiased or S), so AdaIN's style
statistics are one kernel in the forward whether or not the style needs a gradient.
"""
import numbers

import torch
import torch.nn.functional as F

from . import _build

# The kernel exists only where CUDA does; without it every call takes PyTorch's implementation.
_KERNEL = torch.cuda.is_available()
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_ACTIVATIONS = {None: 0, "none": 0, "relu": 1, "silu": 2}
_FLT_MAX = 3.4028234663852886e38  # eps reaches the kernel as a float32


def _memory_format(x):
    """The layout the kernel reads x in (and writes y and dx in): channels-last when x is that
    and not also contiguous, else contiguous."""
    if x.is_contiguous():
        return torch.contiguous_format
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


def _stats_fake(x, groups):
    g = groups if groups else x.shape[1]
    return (x.new_empty((x.shape[0], g), dtype=torch.float32),
            x.new_empty((x.shape[0], g), dtype=torch.float32))


_NORM_INPUTS = 14  # the arguments of instnorm_torch::norm, its defaulted trailing ones included


def _norm_setup_context(ctx, inputs, output):
    (x, weight, bias, running_mean, running_var, use_input_stats, _, eps, groups, act, scale,
     shift, one_plus_scale, unbiased) = inputs
    _, mean, rstd, new_rm, new_rv = output
    ctx.mark_non_differentiable(mean, rstd, new_rm, new_rv)
    ctx.set_materialize_grads(False)  # no zero tensors for the statistics outputs' gradients
    # The running statistics are read by the backward only in eval mode (use_input_stats False);
    # when they are updated, the caller copies the new values into them, so they are not saved.
    keep = not use_input_stats
    ctx.save_for_backward(x, weight, bias, running_mean if keep else None,
                          running_var if keep else None, mean, rstd, scale, shift)
    ctx.use_input_stats, ctx.eps, ctx.groups, ctx.act = use_input_stats, eps, groups, act
    ctx.one_plus_scale, ctx.unbiased = one_plus_scale, unbiased


def _norm_backward(ctx, gy, *_):
    """The gradient of instnorm_torch::norm: one call of instnorm's fused backward kernel
    (instnorm_torch::backward), dx, dweight, dbias, dscale and dshift together. dscale/dshift
    come back (N, C) float32 and take the dtype of the (N, C) scale/shift the op was given
    (autograd carries them back to the caller's shape and strides, a chunk of emb included)."""
    if gy is None:
        return (None,) * _NORM_INPUTS
    x, weight, bias, running_mean, running_var, mean, rstd, scale, shift = ctx.saved_tensors
    # The dispatcher may drop trailing arguments equal to their defaults (None, False) from the
    # inputs autograd sees; those never need a gradient.
    need = tuple(ctx.needs_input_grad) + (False,) * _NORM_INPUTS
    need_x, need_w, need_b, need_s, need_t = need[0], need[1], need[2], need[10], need[11]
    dx, dw, db, ds, dt = torch.ops.instnorm_torch.backward(
        x, gy, weight, bias, running_mean, running_var, mean, rstd, ctx.use_input_stats, ctx.eps,
        ctx.groups, ctx.act, bool(need_w), bool(need_b), scale, shift, ctx.one_plus_scale,
        ctx.unbiased, bool(need_s), bool(need_t))
    return (dx if need_x else None, dw.to(weight.dtype) if need_w else None,
            db.to(bias.dtype) if need_b else None, None, None, None, None, None, None, None,
            ds.to(scale.dtype) if need_s else None, dt.to(shift.dtype) if need_t else None,
            None, None)


def _statistics_setup_context(ctx, inputs, output):
    x, _, _, unbiased = inputs
    mean, std = output
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, mean, std)
    ctx.unbiased = unbiased


def _statistics_backward(ctx, gmean, gstd):
    """The gradient of instnorm_torch::statistics, as PyTorch ops: with S the values of a
    (sample, group), D = S - 1 (unbiased) or S, and std = sqrt(var + eps),
    dx = gmean / S + gstd * (x - mean) / (D * std), in float32, returned in x's dtype."""
    x, mean, std = ctx.saved_tensors
    if not ctx.needs_input_grad[0] or (gmean is None and gstd is None):
        return None, None, None, None
    n, g = mean.shape
    xv = x.reshape(n, g, -1)
    s = xv.shape[-1]
    dx = None
    if gstd is not None:
        d = s - 1 if ctx.unbiased else s
        dx = (xv.float() - mean.unsqueeze(-1)) * (gstd / (std * d)).unsqueeze(-1)
    if gmean is not None:
        part = (gmean / s).unsqueeze(-1)
        dx = part.expand(n, g, s) if dx is None else dx + part
    dx = dx.reshape(x.shape).to(x.dtype).contiguous(memory_format=_memory_format(x))
    return dx, None, None, None


def _double_backward(ctx, *grads):
    raise RuntimeError("instnorm_torch: double backward is not supported (the gradient of "
                       "instance_norm / group_norm is computed by a fused kernel that has no "
                       "gradient of its own); float64 input runs PyTorch's op, which has one")


if _KERNEL:
    _build.load()

    @torch.library.register_fake("instnorm_torch::forward")
    def _fake(x, weight, bias, running_mean, running_var, use_input_stats, momentum, eps, groups,
              activation, scale=None, shift=None, one_plus_scale=False, unbiased=False):
        y = torch.empty_like(x, memory_format=_memory_format(x))
        return (y,) + _stats_fake(x, groups)

    @torch.library.register_fake("instnorm_torch::norm")
    def _norm_fake(x, weight, bias, running_mean, running_var, use_input_stats, momentum, eps,
                   groups, activation, scale=None, shift=None, one_plus_scale=False,
                   unbiased=False):
        y = torch.empty_like(x, memory_format=_memory_format(x))
        c = x.shape[1] if running_mean is not None and use_input_stats else 0
        return (y,) + _stats_fake(x, groups) + (x.new_empty((c,), dtype=torch.float32),
                                                x.new_empty((c,), dtype=torch.float32))

    @torch.library.register_fake("instnorm_torch::backward")
    def _backward_fake(x, dy, weight, bias, running_mean, running_var, mean, rstd,
                       use_input_stats, eps, groups, activation, weight_grad, bias_grad,
                       scale=None, shift=None, one_plus_scale=False, unbiased=False,
                       scale_grad=False, shift_grad=False):
        n, c = x.shape[:2]
        return (torch.empty_like(x, memory_format=_memory_format(x)),
                x.new_empty((c if weight_grad else 0,), dtype=torch.float32),
                x.new_empty((c if bias_grad else 0,), dtype=torch.float32),
                x.new_empty((n, c) if scale_grad else (0,), dtype=torch.float32),
                x.new_empty((n, c) if shift_grad else (0,), dtype=torch.float32))

    @torch.library.register_fake("instnorm_torch::statistics")
    def _statistics_fake(x, groups, eps, unbiased):
        return _stats_fake(x, groups)

    # The autograd formula lives on the functional op: register_autograd refuses
    # instnorm_torch::forward, whose schema mutates running_mean/running_var ("Cannot register
    # autograd formula for non-functional operator"). The backward op gets a formula that
    # raises, so differentiating a gradient fails with a clear message (when that second
    # backward runs, not when create_graph=True merely records it).
    torch.library.register_autograd("instnorm_torch::norm", _norm_backward,
                                    setup_context=_norm_setup_context)
    torch.library.register_autograd("instnorm_torch::backward", _double_backward)
    torch.library.register_autograd("instnorm_torch::statistics", _statistics_backward,
                                    setup_context=_statistics_setup_context)


def _run(x, weight, bias, running_mean, running_var, use_input_stats, momentum, eps, groups,
         act, scale=None, shift=None, one_plus_scale=False, unbiased=False):
    """The kernel's forward. When autograd needs it: the functional op instnorm_torch::norm
    (whose backward is the fused kernel) and, with running statistics and use_input_stats, the
    updated statistics copied into running_mean/running_var. Otherwise instnorm_torch::forward,
    which updates them in place. Neither writes into x. scale/shift: None or (N, C)."""
    args = (x, weight, bias, running_mean, running_var, scale, shift)
    mod = (scale, shift, bool(one_plus_scale), bool(unbiased))
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args):
        y, _, _, new_rm, new_rv = torch.ops.instnorm_torch.norm(
            x, weight, bias, running_mean, running_var, use_input_stats, momentum, eps, groups,
            act, *mod)
        if running_mean is not None and use_input_stats:
            with torch.no_grad():
                running_mean.copy_(new_rm)
                running_var.copy_(new_rv)
        return y
    return torch.ops.instnorm_torch.forward(x, weight, bias, running_mean, running_var,
                                            use_input_stats, momentum, eps, groups, act, *mod)[0]


# Checks. Each raises with "<function>: <rule> (got <value>)".

def _activation(fn, activation):
    if activation is None or (isinstance(activation, str) and activation in _ACTIVATIONS):
        return _ACTIVATIONS[activation]
    raise ValueError(f"{fn}: activation must be one of None, 'none', 'relu', 'silu' "
                     f"(got {activation!r})")


def _number(fn, name, v):
    if not isinstance(v, numbers.Real):
        raise TypeError(f"{fn}: {name} must be a float (got {v!r})")
    return float(v)


def _check_eps(fn, eps):
    eps = _number(fn, "eps", eps)
    if not 0.0 <= eps <= _FLT_MAX:
        raise ValueError(f"{fn}: eps must be finite (in float32) and >= 0 (got {eps!r})")
    return eps


def _check_momentum(fn, momentum):
    momentum = _number(fn, "momentum", momentum)
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"{fn}: momentum must be in [0, 1] (got {momentum!r})")
    return momentum


def _check_x(fn, x, name="x"):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor (got {type(x).__name__})")


def _check_dims(fn, x, name="x"):
    if x.dim() < 2:
        raise RuntimeError(f"{fn}: {name} must have at least 2 dimensions (N, C, *) "
                           f"(got shape {tuple(x.shape)})")


def _check_params(fn, x, params):
    """params: (name, tensor or None) pairs; each must be a floating-point 1-D tensor of C
    elements on x's device."""
    c = x.shape[1]
    for name, t in params:
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{fn}: {name} must be a torch.Tensor or None (got {type(t).__name__})")
        if t.device != x.device:
            raise RuntimeError(f"{fn}: {name} must be on x's device {x.device} (got {t.device})")
        if not t.is_floating_point():
            raise RuntimeError(f"{fn}: {name} must have a floating-point dtype (got {t.dtype})")
        if t.dim() != 1 or t.shape[0] != c:
            raise RuntimeError(f"{fn}: {name} must be a 1-D tensor of C = {c} elements "
                               f"(got shape {tuple(t.shape)})")


def _modulation_shapes(x):
    n, c = x.shape[:2]
    shapes = [(n, c)]
    if x.dim() > 2:
        shapes.append((n, c) + (1,) * (x.dim() - 2))
    return shapes


def _check_modulation(fn, x, name, t, xname="x", required=False):
    """A per-(sample, channel) tensor (scale, shift, AdaIN's style statistics): None (unless
    required), or a floating-point tensor on x's device shaped (N, C) or (N, C, 1, ..., 1) (as
    many dimensions as x). Returns it as an (N, C) view (a reshape: no copy for either shape,
    the strides of a chunk of a larger tensor kept)."""
    if t is None and not required:
        return None
    if not isinstance(t, torch.Tensor):
        what = "a torch.Tensor" if required else "a torch.Tensor or None"
        raise TypeError(f"{fn}: {name} must be {what} (got {type(t).__name__})")
    if t.device != x.device:
        raise RuntimeError(f"{fn}: {name} must be on {xname}'s device {x.device} "
                           f"(got {t.device})")
    if not t.is_floating_point():
        raise RuntimeError(f"{fn}: {name} must have a floating-point dtype (got {t.dtype})")
    shapes = _modulation_shapes(x)
    if tuple(t.shape) not in shapes:
        names = ["(N, C)", "(N, C" + ", 1" * (x.dim() - 2) + ")"]
        want = " or ".join(f"{w} = {s}" for w, s in zip(names, shapes))
        raise RuntimeError(f"{fn}: {name} must have shape {want} for {xname} of shape "
                           f"{tuple(x.shape)} (got shape {tuple(t.shape)})")
    return t.reshape(shapes[0])


def _late_bias(scale, one_plus_scale):
    """Whether the bias goes after the scale (y * scale + bias + shift, AdaIN's convention), so
    that PyTorch's op runs without it; otherwise the op takes the bias itself, and without a
    modulation the fallback is PyTorch's op exactly (its bits, its refusals)."""
    return scale is not None and not one_plus_scale


def _modulate(y, bias, scale, shift, one_plus_scale, act):
    """PyTorch's expression of the modulation and the activation (the paths the kernel does not
    take), returned in y's dtype as the kernel's output is in x's. y is PyTorch's norm with the
    weight, and with the bias unless _late_bias; bias is then the bias, else None:
    act(y * (1 + scale) + shift), or act(y * scale + bias + shift) (the bias is not scaled in
    that convention); scale and shift (N, C) broadcast over the spatial dimensions."""
    if scale is None and shift is None and bias is None:
        return _apply_activation(y, act)
    bshape = tuple(y.shape[:2]) + (1,) * (y.dim() - 2)
    out = y
    if scale is not None:
        s = scale.reshape(bshape)
        out = out * (1 + s) if one_plus_scale else out * s
    if bias is not None:
        out = out + bias.reshape((1, -1) + (1,) * (y.dim() - 2))
    if shift is not None:
        out = out + shift.reshape(bshape)
    return _apply_activation(out, act).to(y.dtype)


def _spatial(x):
    s = 1
    for d in x.shape[2:]:
        s *= d
    return s


def _kernel_takes(x, params, float32_params):
    """Whether the kernel runs this call: x a non-empty CUDA tensor of a kernel dtype, the
    parameters all of x's dtype or (float32_params) all float32."""
    if not (_KERNEL and x.is_cuda and x.dtype in _KERNEL_DTYPES and x.numel() > 0):
        return False
    dtypes = [t.dtype for t in params if t is not None]
    for d in dtypes:
        if d != dtypes[0]:
            return False
    return not dtypes or dtypes[0] == x.dtype or (float32_params and dtypes[0] == torch.float32)


def _autocast_fp32(t):
    # What CUDA autocast does to the arguments of an op on its float32 list: CUDA floating
    # tensors other than float64 become float32, everything else is left as it is.
    if t is not None and t.is_cuda and t.is_floating_point() and t.dtype != torch.float64:
        return t.float()
    return t


def _apply_activation(y, act):
    return F.relu(y) if act == 1 else F.silu(y) if act == 2 else y


def instance_norm(x, weight=None, bias=None, running_mean=None, running_var=None,
                  use_input_stats=True, momentum=0.1, eps=1e-5, activation=None, scale=None,
                  shift=None, one_plus_scale=True):
    """F.instance_norm's semantics on (N, C, *) input, optionally followed by a per-sample
    modulation and a fused activation (None, "relu", "silu"): with running statistics and
    use_input_stats, they are updated (momentum, unbiased variance); with use_input_stats=False
    the running statistics normalize.

    scale, shift: None or (N, C) / (N, C, 1, ..., 1) tensors, applied after weight and bias:
    y = act((instance_norm(x) * (1 + scale)) + shift) with one_plus_scale (the default), else
    act(instance_norm(x) * scale + shift) (instance_norm(x) with weight and bias). Any floating
    dtype; their gradients come back in it.

    The kernel runs for a non-empty CUDA x of float32/float16/bfloat16 whose weight, bias and
    running statistics are all of x's dtype or all float32 (as F.instance_norm accepts them);
    anything else runs F.instance_norm (then the modulation). Output dtype: x's, also under
    torch.autocast (instance_norm is on none of autocast's lists) and with a scale or shift of
    another dtype. Raises before anything runs: ValueError for the activation, eps (finite,
    >= 0), momentum ([0, 1]), only one of running_mean/running_var, or one spatial element with
    use_input_stats (as PyTorch); RuntimeError for a tensor argument on another device than x,
    of a non-floating dtype, or of the wrong shape (weight, bias, running statistics: 1-D with
    C elements; scale, shift: (N, C) or (N, C, 1, ..., 1)), running statistics of two different
    dtypes, x with fewer than 2 dimensions, or use_input_stats=False without running
    statistics; TypeError for arguments of the wrong Python type."""
    fn = "instnorm_torch.instance_norm"
    act = _activation(fn, activation)
    eps = _check_eps(fn, eps)
    momentum = _check_momentum(fn, momentum)
    _check_x(fn, x)
    if use_input_stats and _spatial(x) == 1:
        raise ValueError(f"{fn}: use_input_stats needs more than 1 spatial element "
                         f"(got input of shape {tuple(x.shape)})")
    _check_dims(fn, x)
    params = [("weight", weight), ("bias", bias), ("running_mean", running_mean),
              ("running_var", running_var)]
    _check_params(fn, x, params)
    scale = _check_modulation(fn, x, "scale", scale)
    shift = _check_modulation(fn, x, "shift", shift)
    one_plus_scale = bool(one_plus_scale)
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"{fn}: running_mean and running_var must both be tensors or both be None "
                         f"(got only {'running_mean' if running_var is None else 'running_var'})")
    if running_mean is not None and running_mean.dtype != running_var.dtype:
        # PyTorch's op runs such a pair but its outputs were wrong (float64 x on CUDA with a
        # float64 running_mean and a bfloat16 running_var: 371 where 0.92 was right).
        raise RuntimeError(f"{fn}: running_mean and running_var must have the same dtype "
                           f"(got {running_mean.dtype} and {running_var.dtype})")
    if not use_input_stats and running_mean is None:
        raise RuntimeError(f"{fn}: running_mean and running_var are required when "
                           f"use_input_stats is False (got None)")
    if not _kernel_takes(x, [t for _, t in params], True):
        late = _late_bias(scale, one_plus_scale)
        y = F.instance_norm(x, running_mean, running_var, weight, None if late else bias,
                            bool(use_input_stats), momentum, eps)
        return _modulate(y, bias if late else None, scale, shift, one_plus_scale, act)
    return _run(x, weight, bias, running_mean, running_var, bool(use_input_stats), momentum, eps,
                0, act, scale, shift, one_plus_scale)


def group_norm(x, num_groups, weight=None, bias=None, eps=1e-5, activation=None, scale=None,
               shift=None, one_plus_scale=True):
    """F.group_norm's semantics, optionally followed by a per-sample modulation and a fused
    activation (None, "relu", "silu").

    scale, shift: None or (N, C) / (N, C, 1, ..., 1) tensors (one value per sample and channel,
    e.g. the two halves of emb.chunk(2, dim=1), read in place when stride(1) == 1), applied
    after weight and bias. one_plus_scale (the default; guided diffusion's
    use_scale_shift_norm): y = act(group_norm(x) * (1 + scale) + shift); otherwise
    y = act(group_norm(x) * scale + shift). A missing scale is a factor of 1 in both, a missing
    shift 0. Any floating dtype; their gradients come back in it.

    The kernel runs for a non-empty CUDA x of float32/float16/bfloat16 whose weight and bias
    have x's dtype (as F.group_norm on CUDA requires); anything else runs F.group_norm (then
    the modulation). The output has x's dtype (a scale or shift of another dtype does not
    promote it). Under CUDA autocast it does what autocast does to group_norm (on autocast's
    float32 list): CUDA floating arguments other than float64 (scale and shift too) become
    float32, and so does the output. Raises before anything runs: ValueError for the
    activation, eps (finite, >= 0), or one value per group (N * C / num_groups * spatial == 1,
    as PyTorch); RuntimeError for x with fewer than 2 dimensions, num_groups <= 0 or not
    dividing C, a weight, bias, scale or shift on another device than x, of a non-floating
    dtype, or of the wrong shape (weight, bias: 1-D with C elements; scale, shift: (N, C) or
    (N, C, 1, ..., 1)); TypeError for arguments of the wrong Python type."""
    fn = "instnorm_torch.group_norm"
    act = _activation(fn, activation)
    eps = _check_eps(fn, eps)
    _check_x(fn, x)
    _check_dims(fn, x)
    n, c = x.shape[:2]
    if num_groups <= 0:
        raise RuntimeError(f"{fn}: num_groups must be > 0 (got {num_groups})")
    if n * c // num_groups * _spatial(x) == 1:
        raise ValueError(f"{fn}: needs more than 1 value per group (got input of shape "
                         f"{tuple(x.shape)} and num_groups={num_groups})")
    if c % num_groups != 0:
        raise RuntimeError(f"{fn}: num_groups must divide C (got C = {c}, num_groups = "
                           f"{num_groups})")
    _check_params(fn, x, [("weight", weight), ("bias", bias)])
    scale = _check_modulation(fn, x, "scale", scale)
    shift = _check_modulation(fn, x, "shift", shift)
    one_plus_scale = bool(one_plus_scale)
    if x.is_cuda and torch.is_autocast_enabled("cuda"):
        x, weight, bias = _autocast_fp32(x), _autocast_fp32(weight), _autocast_fp32(bias)
        scale, shift = _autocast_fp32(scale), _autocast_fp32(shift)
    if not _kernel_takes(x, [weight, bias], False):
        late = _late_bias(scale, one_plus_scale)
        return _modulate(F.group_norm(x, num_groups, weight, None if late else bias, eps),
                         bias if late else None, scale, shift, one_plus_scale, act)
    return _run(x, weight, bias, None, None, True, 0.0, eps, int(num_groups), act, scale, shift,
                one_plus_scale)


# ---- statistics and AdaIN ----------------------------------------------------------------------

def _torch_statistics(x, groups, eps, unbiased):
    """statistics() as PyTorch ops (CPU, float64, empty input): float64 for float64 x, float32
    otherwise (the kernel's type)."""
    n, c = x.shape[:2]
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    if groups == 0:
        return x.new_empty((n, 0), dtype=dtype), x.new_empty((n, 0), dtype=dtype)
    xv = x.reshape(n, groups, c // groups * _spatial(x)).to(dtype)
    var, mean = torch.var_mean(xv, dim=-1, correction=1 if unbiased else 0)
    return mean, torch.sqrt(var + eps)


def _statistics(x, groups, eps, unbiased):
    """groups: G (C for instance norm), checked."""
    if _KERNEL and x.is_cuda and x.dtype in _KERNEL_DTYPES and x.numel() > 0:
        return torch.ops.instnorm_torch.statistics(x, int(groups), eps, bool(unbiased))
    return _torch_statistics(x, groups, eps, unbiased)


def statistics(x, groups=None, eps=1e-5, unbiased=False):
    """The mean and standard deviation of each (sample, group) of (N, C, *) input:
    (mean, std), each (N, G), std = sqrt(var + eps) with the biased variance or, with unbiased,
    the unbiased one (AdaIN's calc_mean_std: unbiased=True, eps=1e-5). groups=None: G = C, one
    entry per (sample, channel) (instance norm); else G groups of C / G channels, as GroupNorm.

    For a non-empty CUDA x of float32/float16/bfloat16 this is one kernel (one read of x,
    contiguous or channels-last), float32 results; it is differentiable (the gradient is
    computed with PyTorch ops from x, mean and std). Other input (CPU, float64, empty) runs
    PyTorch's var_mean (float64 results for float64 x, float32 otherwise). Raises before
    anything runs: ValueError for eps (finite, >= 0) or unbiased with one value per group;
    RuntimeError for x with fewer than 2 dimensions or a non-floating dtype, groups <= 0 or not
    dividing C; TypeError for arguments of the wrong Python type."""
    fn = "instnorm_torch.statistics"
    eps = _check_eps(fn, eps)
    _check_x(fn, x)
    _check_dims(fn, x)
    if not x.is_floating_point():
        raise RuntimeError(f"{fn}: x must have a floating-point dtype (got {x.dtype})")
    c = x.shape[1]
    if groups is None:
        g = c
    else:
        if isinstance(groups, bool) or not isinstance(groups, numbers.Integral):
            raise TypeError(f"{fn}: groups must be an int or None (got {groups!r})")
        g = int(groups)
        if g <= 0:
            raise RuntimeError(f"{fn}: groups must be > 0 (got {g})")
        if c % g != 0:
            raise RuntimeError(f"{fn}: groups must divide C (got C = {c}, groups = {g})")
    if unbiased and x.numel() > 0 and c // g * _spatial(x) == 1:
        raise ValueError(f"{fn}: the unbiased variance needs more than 1 value per group "
                         f"(got input of shape {tuple(x.shape)} and groups={groups})")
    return _statistics(x, g, eps, unbiased)


def _check_content(fn, content, eps):
    eps = _check_eps(fn, eps)
    _check_x(fn, content, "content")
    _check_dims(fn, content, "content")
    if _spatial(content) == 1 and content.numel() > 0:
        raise ValueError(f"{fn}: content needs more than 1 spatial element for the unbiased "
                         f"variance (got shape {tuple(content.shape)})")
    return eps


def _adain(content, style_mean, style_std, eps):
    """AdaIN with checked arguments (style_mean, style_std: (N, C)): one instnorm forward of
    content with the unbiased variance, no affine, and the modulation scale = style_std,
    shift = style_mean (not 1 + scale); otherwise the reference's PyTorch expression."""
    if _kernel_takes(content, [], False):
        return _run(content, None, None, None, None, True, 0.0, eps, 0, 0, style_std, style_mean,
                    False, True)
    n, c = content.shape[:2]
    bshape = (n, c) + (1,) * (content.dim() - 2)
    var, mean = torch.var_mean(content.reshape(n, c, _spatial(content)), dim=-1, correction=1)
    normalized = (content - mean.reshape(bshape)) / (var + eps).sqrt().reshape(bshape)
    out = normalized * style_std.reshape(bshape) + style_mean.reshape(bshape)
    return out.to(content.dtype)


def adaptive_instance_norm_with_stats(content, style_mean, style_std, eps=1e-5):
    """AdaIN with the style's statistics given: (content - mean) / std * style_std + style_mean,
    mean and std = sqrt(unbiased var + eps) of each (sample, channel) plane of content (the
    reference AdaIN's calc_mean_std). style_mean, style_std: (N, C) or (N, C, 1, ..., 1)
    tensors of any floating dtype (calc_mean_std's (N, C, 1, 1) outputs work as they are),
    differentiable. Output: content's dtype and layout.

    For a non-empty CUDA content of float32/float16/bfloat16 this is one instnorm kernel (the
    unbiased variance, and the style statistics as the per-sample modulation: scale =
    style_std, shift = style_mean), and its backward one fused kernel; anything else runs the
    reference's PyTorch expression. Raises before anything runs: ValueError for eps or content
    with one spatial element; RuntimeError for content with fewer than 2 dimensions, or a
    style_mean / style_std on another device, of a non-floating dtype or of the wrong shape;
    TypeError for arguments of the wrong Python type."""
    fn = "instnorm_torch.adaptive_instance_norm_with_stats"
    eps = _check_content(fn, content, eps)
    style_mean = _check_modulation(fn, content, "style_mean", style_mean, "content", True)
    style_std = _check_modulation(fn, content, "style_std", style_std, "content", True)
    return _adain(content, style_mean, style_std, eps)


def adaptive_instance_norm(content, style, eps=1e-5):
    """AdaIN (Huang and Belongie 2017), as the widely used reference
    adaptive_instance_normalization(content_feat, style_feat) computes it:
        (content - mean(content)) / std(content) * std(style) + mean(style),
    per (sample, channel), std = sqrt(unbiased variance + eps) for both (calc_mean_std).
    content: (N, C, *); style: (N, C, *) with any spatial size. Output: content's dtype and
    layout.

    For non-empty CUDA float32/float16/bfloat16 tensors this is two kernels: statistics() of
    the style (one read of style, unbiased), then one instnorm forward of content (the unbiased
    variance, the style's std and mean as the per-sample scale and shift). Gradients reach
    content (the fused backward kernel) and style (through statistics(), whose gradient is
    PyTorch ops on style and its mean and std). Anything else runs the reference's PyTorch
    expression. Raises before anything runs: ValueError for eps, content or style with one
    spatial element; RuntimeError for tensors with fewer than 2 dimensions, a style on another
    device than content, of a non-floating dtype or with another N or C; TypeError for arguments
    of the wrong Python type."""
    fn = "instnorm_torch.adaptive_instance_norm"
    eps = _check_content(fn, content, eps)
    _check_x(fn, style, "style")
    if style.device != content.device:
        raise RuntimeError(f"{fn}: style must be on content's device {content.device} "
                           f"(got {style.device})")
    if not style.is_floating_point():
        raise RuntimeError(f"{fn}: style must have a floating-point dtype (got {style.dtype})")
    if style.dim() < 2 or tuple(style.shape[:2]) != tuple(content.shape[:2]):
        raise RuntimeError(f"{fn}: style must be (N, C, *) with content's N, C = "
                           f"{tuple(content.shape[:2])} (got shape {tuple(style.shape)})")
    if _spatial(style) == 1 and style.numel() > 0:
        raise ValueError(f"{fn}: style needs more than 1 spatial element for the unbiased "
                         f"variance (got shape {tuple(style.shape)})")
    style_mean, style_std = _statistics(style, style.shape[1], eps, True)
    return _adain(content, style_mean, style_std, eps)
