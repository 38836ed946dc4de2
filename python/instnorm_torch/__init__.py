"""instnorm for PyTorch: instance norm and GroupNorm (+ fused ReLU/SiLU) on instnorm's kernels.

    import instnorm_torch as it
    y = it.instance_norm(x, weight, bias)                    # like F.instance_norm
    y = it.group_norm(x, 32, weight, bias, activation="silu")
    scale, shift = emb.chunk(2, dim=1)                       # (N, C) each, used in place
    y = it.group_norm(x, 32, weight, bias, activation="silu", scale=scale, shift=shift)
    y = it.adaptive_instance_norm(content, style)            # AdaIN, as the reference computes it
    mean, std = it.statistics(x, unbiased=True)              # (N, C) each
    model = it.convert(model)                                # swap nn.InstanceNorm*d / nn.GroupNorm

The forward is one instnorm kernel call on PyTorch's current stream (contiguous or channels-last
input, no copy; fp32, fp16, bf16), and so is the backward: instnorm's fused backward kernel
computes dx, dweight and dbias in one pass over x and dy from the forward's saved mean and rstd
(the activation's derivative taken at the pre-activation recomputed from x). Custom ops, each
with a fake implementation, so training runs under ``torch.compile(fullgraph=True)`` and CUDA
graphs:

  ``torch.ops.instnorm_torch.norm``      the forward, functional; its autograd formula
                                         (torch.library.register_autograd) calls
  ``torch.ops.instnorm_torch.backward``  the fused backward kernel;
  ``torch.ops.instnorm_torch.forward``   the forward updating the running statistics in place,
                                         for calls that need no gradient;
  ``torch.ops.instnorm_torch.statistics`` per (sample, group) mean and sqrt(var + eps), its
                                         gradient PyTorch ops (register_autograd).

group_norm and instance_norm take a per-sample scale and shift ((N, C) or (N, C, 1, ..., 1);
y = act(norm(x) * (1 + scale) + shift), or with one_plus_scale=False act(norm(x) * scale +
shift)) applied by the same kernel, with their gradients from the same fused backward; AdaIN is
statistics() of the style then that forward with the unbiased variance (scale = style std,
shift = style mean).

Double backward (differentiating a gradient) raises RuntimeError; float64 input runs PyTorch's
ops, which support it.

Arguments are checked before anything runs: a tensor argument on another device than x, of an
integer, bool or complex dtype, or not 1-D with C elements raises RuntimeError; a bad eps,
momentum or activation ValueError; and every call PyTorch's op refuses raises as PyTorch does.
CPU, float64 and empty input (and parameter dtypes the kernel does not take) run PyTorch's own
F.instance_norm / F.group_norm plus the activation, so modules work on the CPU and in double.
Under CUDA autocast, group_norm computes and returns float32 (as autocast does for
F.group_norm); instance_norm keeps x's dtype (as F.instance_norm).
"""
from ._ops import (adaptive_instance_norm, adaptive_instance_norm_with_stats,  # noqa: F401
                   group_norm, instance_norm, statistics)
from ._modules import GroupNorm, InstanceNorm1d, InstanceNorm2d, InstanceNorm3d, convert  # noqa: F401

__all__ = ["instance_norm", "group_norm", "statistics", "adaptive_instance_norm",
           "adaptive_instance_norm_with_stats", "InstanceNorm1d", "InstanceNorm2d",
           "InstanceNorm3d", "GroupNorm", "convert"]
