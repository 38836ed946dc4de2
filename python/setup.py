"""Builds instnorm_torch ahead of time: pip install --no-build-isolation ./python
(without a build, the package compiles its op on first import with torch.utils.cpp_extension)."""
import os
import shutil

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CUDAExtension

here = os.path.dirname(os.path.abspath(__file__))
include = os.path.join(here, "..", "include")
# Ship the headers inside the package, so that a JIT rebuild works from an installed copy too.
shutil.copytree(include, os.path.join(here, "instnorm_torch", "include"), dirs_exist_ok=True)

setup(
    name="instnorm_torch",
    version="0.1.0",
    description="Instance norm and GroupNorm for PyTorch on instnorm's CUDA kernels",
    packages=["instnorm_torch"],
    # Every header, whatever folder of the layered tree it sits in.
    package_data={"instnorm_torch": ["csrc/*.cu"] + sorted(
        os.path.relpath(os.path.join(d, f), os.path.join(here, "instnorm_torch"))
        for d, _, files in os.walk(os.path.join(here, "instnorm_torch", "include"))
        for f in files if f.endswith((".cuh", ".h")))},
    ext_modules=[CUDAExtension(
        "instnorm_torch._C", ["instnorm_torch/csrc/instnorm_ext.cu"], include_dirs=[include],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--expt-relaxed-constexpr"]})],
    cmdclass={"build_ext": BuildExtension},
)
