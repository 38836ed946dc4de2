"""The functional API: instance_norm, group_norm, with autograd.

Every call is checked before anything runs. A call PyTorch's op would refuse raises the exception
PyTorch raises (ValueError or RuntimeError), and so does a call the kernel cannot run (a tensor on
another device, an integer or complex parameter, a bad eps, momentum or activation): the message
names the argument, the rule and the value. What passes runs the kernel when x is a non-empty
CUDA tensor of float32, float16 or bfloat16 with parameters it takes; any other input (CPU,
float64, empty, other parameter dtypes) runs PyTorch's own implementation plus the activation,
so it behaves exactly as F.instance_norm / F.group_norm.

Autograd: the kernel's forward is the functional custom op instnorm_torch::norm, whose gradient
(torch.library.register_autograd) is the custom op instnorm_torch::backward, instnorm's fused
backward kernel (dx, dweight, dbias in one call). register_autograd refuses an op that mutates an
argument, so the running statistics are not updated by norm itself: it returns their new values
and _run copies them in. A call that needs no gradient runs instnorm_torch::forward, which
updates them in place.
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


def _norm_setup_context(ctx, inputs, output):
    x, weight, bias, running_mean, running_var, use_input_stats, _, eps, groups, act = inputs
    _, mean, rstd, new_rm, new_rv = output
    ctx.mark_non_differentiable(mean, rstd, new_rm, new_rv)
    ctx.set_materialize_grads(False)  # no zero tensors for the statistics outputs' gradients
    # The running statistics are read by the backward only in eval mode (use_input_stats False);
    # when they are updated, the caller copies the new values into them, so they are not saved.
    keep = not use_input_stats
    ctx.save_for_backward(x, weight, bias, running_mean if keep else None,
                          running_var if keep else None, mean, rstd)
    ctx.use_input_stats, ctx.eps, ctx.groups, ctx.act = use_input_stats, eps, groups, act


def _norm_backward(ctx, gy, *_):
    """The gradient of instnorm_torch::norm: one call of instnorm's fused backward kernel
    (instnorm_torch::backward), dx, dweight and dbias together."""
    if gy is None:
        return (None,) * 10
    x, weight, bias, running_mean, running_var, mean, rstd = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    dx, dw, db = torch.ops.instnorm_torch.backward(
        x, gy, weight, bias, running_mean, running_var, mean, rstd, ctx.use_input_stats, ctx.eps,
        ctx.groups, ctx.act, bool(need_w), bool(need_b))
    return (dx if need_x else None, dw.to(weight.dtype) if need_w else None,
            db.to(bias.dtype) if need_b else None, None, None, None, None, None, None, None)


def _double_backward(ctx, *grads):
    raise RuntimeError("instnorm_torch: double backward is not supported (the gradient of "
                       "instance_norm / group_norm is computed by a fused kernel that has no "
                       "gradient of its own); float64 input runs PyTorch's op, which has one")


if _KERNEL:
    _build.load()

    @torch.library.register_fake("instnorm_torch::forward")
    def _fake(x, weight, bias, running_mean, running_var, use_input_stats, momentum, eps, groups,
              activation):
        y = torch.empty_like(x, memory_format=_memory_format(x))
        return (y,) + _stats_fake(x, groups)

    @torch.library.register_fake("instnorm_torch::norm")
    def _norm_fake(x, weight, bias, running_mean, running_var, use_input_stats, momentum, eps,
                   groups, activation):
        y = torch.empty_like(x, memory_format=_memory_format(x))
        c = x.shape[1] if running_mean is not None and use_input_stats else 0
        return (y,) + _stats_fake(x, groups) + (x.new_empty((c,), dtype=torch.float32),
                                                x.new_empty((c,), dtype=torch.float32))

    @torch.library.register_fake("instnorm_torch::backward")
    def _backward_fake(x, dy, weight, bias, running_mean, running_var, mean, rstd,
                       use_input_stats, eps, groups, activation, weight_grad, bias_grad):
        c = x.shape[1]
        return (torch.empty_like(x, memory_format=_memory_format(x)),
                x.new_empty((c if weight_grad else 0,), dtype=torch.float32),
                x.new_empty((c if bias_grad else 0,), dtype=torch.float32))

    # The autograd formula lives on the functional op: register_autograd refuses
    # instnorm_torch::forward, whose schema mutates running_mean/running_var ("Cannot register
    # autograd formula for non-functional operator"). The backward op gets a formula that
    # raises, so differentiating a gradient fails with a clear message (when that second
    # backward runs, not when create_graph=True merely records it).
    torch.library.register_autograd("instnorm_torch::norm", _norm_backward,
                                    setup_context=_norm_setup_context)
    torch.library.register_autograd("instnorm_torch::backward", _double_backward)


def _run(x, weight, bias, running_mean, running_var, use_input_stats, momentum, eps, groups,
         act):
    """The kernel's forward. When autograd needs it: the functional op instnorm_torch::norm
    (whose backward is the fused kernel) and, with running statistics and use_input_stats, the
    updated statistics copied into running_mean/running_var. Otherwise instnorm_torch::forward,
    which updates them in place. Neither writes into x."""
    args = (x, weight, bias, running_mean, running_var)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args):
        y, _, _, new_rm, new_rv = torch.ops.instnorm_torch.norm(
            x, weight, bias, running_mean, running_var, use_input_stats, momentum, eps, groups,
            act)
        if running_mean is not None and use_input_stats:
            with torch.no_grad():
                running_mean.copy_(new_rm)
                running_var.copy_(new_rv)
        return y
    return torch.ops.instnorm_torch.forward(x, weight, bias, running_mean, running_var,
                                            use_input_stats, momentum, eps, groups, act)[0]


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


def _check_x(fn, x):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{fn}: x must be a torch.Tensor (got {type(x).__name__})")


def _check_dims(fn, x):
    if x.dim() < 2:
        raise RuntimeError(f"{fn}: x must have at least 2 dimensions (N, C, *) "
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
                  use_input_stats=True, momentum=0.1, eps=1e-5, activation=None):
    """F.instance_norm's semantics on (N, C, *) input, optionally followed by a fused activation
    (None, "relu", "silu"): with running statistics and use_input_stats, they are updated
    (momentum, unbiased variance); with use_input_stats=False the running statistics normalize.

    The kernel runs for a non-empty CUDA x of float32/float16/bfloat16 whose weight, bias and
    running statistics are all of x's dtype or all float32 (as F.instance_norm accepts them);
    anything else runs F.instance_norm. Output dtype: x's, also under torch.autocast
    (instance_norm is on none of autocast's lists). Raises before anything runs:
    ValueError for the activation, eps (finite, >= 0), momentum ([0, 1]), only one of
    running_mean/running_var, or one spatial element with use_input_stats (as PyTorch);
    RuntimeError for a tensor argument on another device than x, of a non-floating dtype, or not
    1-D with C elements, running statistics of two different dtypes, x with fewer than 2
    dimensions, or use_input_stats=False without running statistics; TypeError for arguments of
    the wrong Python type."""
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
        y = F.instance_norm(x, running_mean, running_var, weight, bias, bool(use_input_stats),
                            momentum, eps)
        return _apply_activation(y, act)
    return _run(x, weight, bias, running_mean, running_var, bool(use_input_stats), momentum, eps,
                0, act)


def group_norm(x, num_groups, weight=None, bias=None, eps=1e-5, activation=None):
    """F.group_norm's semantics, optionally followed by a fused activation (None, "relu",
    "silu").

    The kernel runs for a non-empty CUDA x of float32/float16/bfloat16 whose weight and bias
    have x's dtype (as F.group_norm on CUDA requires); anything else runs F.group_norm. Under
    CUDA autocast it does what autocast does to group_norm (on autocast's float32 list): CUDA
    floating arguments other than float64 become float32, and so does the output. Raises
    before anything runs: ValueError for the activation, eps (finite, >= 0), or one value per
    group (N * C / num_groups * spatial == 1, as PyTorch); RuntimeError for x with fewer than 2
    dimensions, num_groups <= 0 or not dividing C, a weight or bias on another device than x, of
    a non-floating dtype, or not 1-D with C elements; TypeError for arguments of the wrong
    Python type."""
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
    if x.is_cuda and torch.is_autocast_enabled("cuda"):
        x, weight, bias = _autocast_fp32(x), _autocast_fp32(weight), _autocast_fp32(bias)
    if not _kernel_takes(x, [weight, bias], False):
        return _apply_activation(F.group_norm(x, num_groups, weight, bias, eps), act)
    return _run(x, weight, bias, None, None, True, 0.0, eps, int(num_groups), act)
