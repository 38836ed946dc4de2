# Sourced on the device machine: library paths for binaries built elsewhere and carried in .dev/
# (Google Benchmark's shared library, the CUDA runtime) and for cuDNN, which ships with PyTorch.
here=$(pwd)
cudnn_lib=$(python3 -c 'import nvidia.cudnn, os; print(os.path.join(os.path.dirname(nvidia.cudnn.__file__), "lib"))' 2>/dev/null)
export LD_LIBRARY_PATH="$here/.dev/lib:${cudnn_lib}:${LD_LIBRARY_PATH:-}"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv,noheader
