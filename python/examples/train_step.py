"""Times a training step (forward, backward, optimizer step) of two small models with
torch.nn's normalization layers and again after instnorm_torch.convert, whose forward and
backward are each one instnorm kernel call (the backward is the fused kernel: dx, dweight and
dbias in one pass over x and dy):
  - a diffusion U-Net block (GroupNorm(32) -> SiLU -> Conv, twice, residual), channels-last,
    under bf16 autocast (GroupNorm runs in float32 there, as autocast does for F.group_norm),
    and the same block with fp16 weights and input (no autocast: the norm runs in fp16),
  - a style-transfer residual block (Conv -> InstanceNorm2d(affine) -> ReLU -> Conv ->
    InstanceNorm2d(affine)), fp32.
Median step time over 30 steps after 5 warmup steps, CUDA events.
Run: python3 python/examples/train_step.py"""
import copy
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import instnorm_torch as it  # noqa: E402


class UNetBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.body = nn.Sequential(nn.GroupNorm(32, c), nn.SiLU(), nn.Conv2d(c, c, 3, padding=1),
                                  nn.GroupNorm(32, c), nn.SiLU(), nn.Conv2d(c, c, 3, padding=1))

    def forward(self, x):
        return x + self.body(x)


class ResidualBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.InstanceNorm2d(c, affine=True),
                                  nn.ReLU(), nn.Conv2d(c, c, 3, padding=1),
                                  nn.InstanceNorm2d(c, affine=True))

    def forward(self, x):
        return x + self.body(x)


def step_ms(model, x, autocast_dtype=None, warmup=5, reps=30):
    """Median time of one SGD step (zero_grad, forward, MSE-to-zero loss, backward, step)."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=autocast_dtype or torch.float16,
                            enabled=autocast_dtype is not None):
            loss = model(x).float().square().mean()
        loss.backward()
        opt.step()
        return loss

    for _ in range(warmup):
        step()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        step()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def grad_difference(ref, ours, x, autocast_dtype):
    """Largest difference of the parameters' gradients after one step on each, relative to the
    largest gradient."""
    for m in (ref, ours):
        m.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=autocast_dtype or torch.float16,
                            enabled=autocast_dtype is not None):
            loss = m(x).float().square().mean()
        loss.backward()
    # Relative to the largest gradient of the whole model: a convolution's bias in front of an
    # instance norm has a gradient of rounding noise only (the norm removes it), which a
    # per-parameter scale would turn into a difference of order 1.
    pairs = list(zip(ours.parameters(), ref.parameters()))
    scale = max(r.grad.float().abs().max().item() for _, r in pairs) or 1.0
    return max((a.grad.float() - r.grad.float()).abs().max().item() for a, r in pairs) / scale


def compare(name, model, x, autocast_dtype=None):
    ours = it.convert(copy.deepcopy(model))  # GroupNorm + SiLU fused into one kernel each
    diff = grad_difference(model, ours, x, autocast_dtype)
    before = step_ms(model, x, autocast_dtype)
    after = step_ms(ours, x, autocast_dtype)
    print(f"{name}: torch.nn {before:.3f} ms/step, instnorm {after:.3f} ms/step "
          f"({before / after:.2f}x); gradients differ by {diff:.1e} of their max")


if __name__ == "__main__":
    torch.backends.cudnn.benchmark = True
    cl = torch.channels_last
    unet = UNetBlock(320).cuda().to(memory_format=cl)
    x = torch.randn(8, 320, 32, 32, device="cuda").contiguous(memory_format=cl)
    compare("U-Net block 8x320x32x32 channels-last, bf16 autocast", unet, x, torch.bfloat16)
    compare("U-Net block 8x320x32x32 channels-last, fp16", copy.deepcopy(unet).half(), x.half())
    compare("style-transfer block 8x128x128x128 fp32", ResidualBlock(128).cuda(),
            torch.randn(8, 128, 128, 128, device="cuda"))
