"""The functional API: instance_norm, group_norm, with autograd.

Every call is checked before anything runs. A call PyTorch's op would refuse raises the exception
PyTorch raises (ValueError or RuntimeError), and so does a call the kernel cannot run (a tensor on
another device, an integer or complex parameter, a bad eps, momentum or activation): the message
names the argument, the rule and the value. What passes runs the kernel when x is a non-empty
CUDA tensor of float32, float16 or bfloat16 with parameters it takes; any other input (CPU,
float64, empty, other parameter dtypes) runs PyTorch's own implementation plus the activation,
so it behaves exactly as F.instance_norm / F.group_norm.
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

if _KERNEL:
    _build.load()

    @torch.library.register_fake("instnorm_torch::forward")
    def _fake(x, weight, bias, running_mean, running_var, use_input_stats, momentum, eps, groups,
              activation):
        g = groups if groups else x.shape[1]
        mf = torch.channels_last if (x.dim() == 4 and not x.is_contiguous()
                                     and x.is_contiguous(memory_format=torch.channels_last)) else \
            torch.channels_last_3d if (x.dim() == 5 and not x.is_contiguous()
                                       and x.is_contiguous(memory_format=torch.channels_last_3d)) else \
            torch.contiguous_format
        y = torch.empty_like(x, memory_format=mf)
        return y, x.new_empty((x.shape[0], g), dtype=torch.float32), \
            x.new_empty((x.shape[0], g), dtype=torch.float32)


def _act_grad(g, pre, activation):
    if activation == 1:
        return g * (pre > 0).to(g.dtype)
    if activation == 2:
        s = torch.sigmoid(pre)
        return g * (s * (1 + pre * (1 - s)))
    return g


class _Norm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, use_input_stats, momentum, eps,
                groups, activation):
        y, mean, rstd = torch.ops.instnorm_torch.forward(
            x, weight, bias, running_mean, running_var, use_input_stats, momentum, eps, groups,
            activation)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.groups, ctx.activation, ctx.use_input_stats = groups, activation, use_input_stats
        return y

    @staticmethod
    def backward(ctx, gy):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        n, c = x.shape[:2]
        g = ctx.groups if ctx.groups else c
        bshape = (1, c) + (1,) * (x.dim() - 2)
        red = [0] + list(range(2, x.dim()))
        xf = x.float()
        xhat = ((xf.reshape(n, g, -1) - mean[..., None]) * rstd[..., None]).reshape(x.shape)
        go = gy.float()
        if ctx.activation:
            pre = xhat
            if weight is not None:
                pre = pre * weight.float().reshape(bshape)
            if bias is not None:
                pre = pre + bias.float().reshape(bshape)
            go = _act_grad(go, pre, ctx.activation)
        gw = (go * xhat).sum(red).to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        gb = go.sum(red).to(bias.dtype) if bias is not None and ctx.needs_input_grad[2] else None
        gx = None
        if ctx.needs_input_grad[0]:
            gxh = go * weight.float().reshape(bshape) if weight is not None else go
            gxh = gxh.reshape(n, g, -1)
            r = rstd[..., None]
            if ctx.use_input_stats:
                xh = xhat.reshape(n, g, -1)
                gx = r * (gxh - gxh.mean(-1, keepdim=True) - xh * (gxh * xh).mean(-1, keepdim=True))
            else:
                gx = gxh * r
            gx = gx.reshape(x.shape).to(x.dtype)
        return gx, gw, gb, None, None, None, None, None, None, None


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
    return _Norm.apply(x, weight, bias, running_mean, running_var, bool(use_input_stats),
                       momentum, eps, 0, act)


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
    return _Norm.apply(x, weight, bias, None, None, True, 0.0, eps, int(num_groups), act)
