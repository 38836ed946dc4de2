"""Swaps the normalization layers of two small models for instnorm's and prints the forward time
before and after (CUDA events, median of 50):
  - a style-transfer residual block (Conv -> InstanceNorm2d(affine) -> ReLU, twice), fp32,
  - a diffusion U-Net block (GroupNorm(32) -> SiLU -> Conv, twice), fp16, channels-last.
Run: python3 python/examples/swap_layers.py"""
import copy
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import instnorm_torch as it  # noqa: E402


class ResidualBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.InstanceNorm2d(c, affine=True),
                                  nn.ReLU(), nn.Conv2d(c, c, 3, padding=1),
                                  nn.InstanceNorm2d(c, affine=True))

    def forward(self, x):
        return x + self.body(x)


def unet_block(c):
    return nn.Sequential(nn.GroupNorm(32, c), nn.SiLU(), nn.Conv2d(c, c, 3, padding=1),
                         nn.GroupNorm(32, c), nn.SiLU(), nn.Conv2d(c, c, 3, padding=1))


def time_ms(model, x, reps=50):
    with torch.no_grad():
        for _ in range(5):
            model(x)
        times = []
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            model(x)
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def compare(name, model, x):
    swapped = it.convert(copy.deepcopy(model))
    with torch.no_grad():
        err = (swapped(x).float() - model(x).float()).abs().max().item()
    before, after = time_ms(model, x), time_ms(swapped, x)
    print(f"{name}: torch.nn {before:.3f} ms, instnorm {after:.3f} ms "
          f"({before / after:.2f}x), max difference {err:.2e}")


if __name__ == "__main__":
    torch.backends.cudnn.benchmark = True
    compare("style-transfer block 8x128x128x128 fp32", ResidualBlock(128).cuda().eval(),
            torch.randn(8, 128, 128, 128, device="cuda"))
    compare("U-Net block 2x320x64x64 fp16 channels-last",
            unet_block(320).cuda().half().to(memory_format=torch.channels_last).eval(),
            torch.randn(2, 320, 64, 64, device="cuda", dtype=torch.half)
            .contiguous(memory_format=torch.channels_last))
