#!/usr/bin/env bash
# The one call on the GPU host: builds vllm_kvcompress._C, runs the GPU tests,
# compute-sanitizer memcheck and the benchmarks, and writes logs and JSON under $OUT.
#   bash benchmarks/run_gpu_host.sh [codec]      (default: codec)
# Real KV pages for the codec benchmark are read from .gpu/kv_pages.pt when present
# (make them with benchmarks/extract_kv_pages.py and carry .gpu/kv_pages.pt).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/kvcompress-out}
mkdir -p "$OUT"
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
status=0

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv \
  > "$OUT/device.csv" 2>&1
start=$(date +%s)
if ! { cmake -S . -B build/host -G Ninja -DCMAKE_BUILD_TYPE=Release \
         -DPython_EXECUTABLE="$(command -v python3)" -DKVCOMPRESS_CUDA=ON \
         -DCMAKE_LIBRARY_OUTPUT_DIRECTORY="$PWD/vllm_kvcompress" \
       && cmake --build build/host -j "$(nproc)"; } > "$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"
  exit 1
fi
echo "build: $(( $(date +%s) - start )) s"

python3 -m pytest tests/kernels -q -rs -p no:cacheprovider --junitxml="$OUT/pytest_kernels.xml" \
  > "$OUT/pytest_kernels.log" 2>&1 || status=1
tail -5 "$OUT/pytest_kernels.log"

if command -v compute-sanitizer > /dev/null; then
  compute-sanitizer --tool memcheck --error-exitcode 9 python3 tests/kernels/memcheck_codec.py \
    > "$OUT/memcheck.log" 2>&1 || status=1
  tail -3 "$OUT/memcheck.log"
fi

kv_pages=()
[ -f .gpu/kv_pages.pt ] && kv_pages=(--kv-pages .gpu/kv_pages.pt)
python3 benchmarks/benchmark_codec.py "${kv_pages[@]}" --out "$OUT/codec" \
  > "$OUT/benchmark_codec.log" 2>&1 || status=1
grep -v "codec configs" "$OUT/benchmark_codec.log" | tail -120
exit $status
