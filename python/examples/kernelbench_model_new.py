"""KernelBench-style replacement of an instance-norm model: Model is the reference
(nn.InstanceNorm2d), ModelNew the same computation on instnorm_torch. Run it to check and time
both: python3 python/examples/kernelbench_model_new.py"""
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import instnorm_torch as it  # noqa: E402

batch_size, features, dim1, dim2 = 112, 64, 512, 512


class Model(nn.Module):
    def __init__(self, num_features: int):
        super().__init__()
        self.inorm = nn.InstanceNorm2d(num_features=num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inorm(x)


class ModelNew(nn.Module):
    def __init__(self, num_features: int):
        super().__init__()
        self.eps = 1e-5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return it.instance_norm(x, eps=self.eps)


def get_inputs():
    return [torch.randn(batch_size, features, dim1, dim2, device="cuda")]


def get_init_inputs():
    return [features]


if __name__ == "__main__":
    x, = get_inputs()
    ref, new = Model(*get_init_inputs()).cuda(), ModelNew(*get_init_inputs()).cuda()
    print("max difference", (ref(x) - new(x)).abs().max().item())
    from triton.testing import do_bench
    print(f"Model {do_bench(lambda: ref(x)):.3f} ms, ModelNew {do_bench(lambda: new(x)):.3f} ms")
