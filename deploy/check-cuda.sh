#!/usr/bin/env bash
# Checks that the `cuda` feature compiles on a machine without a GPU or a system CUDA: nvcc and
# headers come from NVIDIA's CUDA 13 wheels on PyPI, in a venv under target/. The first run
# builds candle's kernels (about 20 minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=target/cuda-venv
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet nvidia-cuda-nvcc nvidia-cuda-runtime nvidia-cuda-crt nvidia-cuda-cccl
fi
CU=$("$venv/bin/python" -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13"))')
export PATH="$CU/bin:$PATH" CUDA_HOME="$CU" CUDA_PATH="$CU"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
# cudarc knows CUDA up to 13.4; the wheel's nvcc is 13.5.
export CUDARC_CUDA_VERSION="${CUDARC_CUDA_VERSION:-13040}"
nvcc --version | tail -1
cargo check --locked --workspace --features alora/cuda
echo "cuda feature compiles"
