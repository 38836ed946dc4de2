"""The functional API: instance_norm, group_norm, with autograd."""
import torch

from . import _build

_build.load()

_ACT = {None: 0, "none": 0, "relu": 1, "silu": 2}


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


def _check(x):
    if not x.is_cuda:
        raise ValueError("instnorm_torch: expected a CUDA tensor")


def instance_norm(x, weight=None, bias=None, running_mean=None, running_var=None,
                  use_input_stats=True, momentum=0.1, eps=1e-5):
    """F.instance_norm's semantics on (N, C, *) input: with running statistics and
    use_input_stats, they are updated (momentum, unbiased variance); with use_input_stats=False
    the running statistics normalize."""
    _check(x)
    if not use_input_stats and (running_mean is None or running_var is None):
        raise ValueError("Expected running_mean and running_var when use_input_stats=False")
    return _Norm.apply(x, weight, bias, running_mean, running_var, bool(use_input_stats),
                       float(momentum if momentum is not None else 0.0), float(eps), 0, 0)


def group_norm(x, num_groups, weight=None, bias=None, eps=1e-5, activation=None):
    """F.group_norm's semantics, optionally followed by a fused activation ("relu", "silu")."""
    _check(x)
    if x.shape[1] % num_groups != 0:
        raise ValueError("num_channels must be divisible by num_groups")
    return _Norm.apply(x, weight, bias, None, None, True, 0.0, float(eps), int(num_groups),
                       _ACT[activation])
