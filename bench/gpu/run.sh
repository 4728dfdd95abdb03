#!/usr/bin/env bash
# Build llama-cpp-python with CUDA + RPC on the device, then run check.py. Resumable build dir.
set -uo pipefail
exec > >(tee -a "$OUT/log.txt") 2>&1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
which nvcc cmake ninja; nvcc --version | tail -1; python3 --version
if [ ! -x /tmp/v/bin/python ]; then python3 -m venv --system-site-packages /tmp/v; fi
/tmp/v/bin/python -m pip install -q --no-index --no-deps .gpu/*.whl
[ -f /tmp/v/lib/python3.12/site-packages/llama_cpp/lib/libggml-rpc.so ] && echo "already built" || {
  mkdir -p /tmp/src && [ -d /tmp/src/llama_cpp_python-0.3.36 ] || tar xJf .gpu/llama-stripped.tar.xz -C /tmp/src
  t0=$(date +%s)
  CMAKE_ARGS="-DGGML_RPC=ON -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DGGML_CUDA_FA=OFF -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TOOLS=OFF" \
  CMAKE_BUILD_PARALLEL_LEVEL=16 timeout 500 /tmp/v/bin/python -m pip install --no-index --no-deps --no-build-isolation \
     --config-settings=build-dir=/tmp/skbuild /tmp/src/llama_cpp_python-0.3.36 2>&1 | tail -25
  echo "build seconds: $(( $(date +%s) - t0 ))"
}
export PYTHONPATH=/tmp/v/lib/python3.12/site-packages  # the image's python3 has numpy, jinja2, typing_extensions
python3 -c "import llama_cpp; print('rpc', llama_cpp.llama_supports_rpc(), 'gpu offload', llama_cpp.llama_supports_gpu_offload())" || exit 3
timeout 240 python3 bench/gpu/check.py
