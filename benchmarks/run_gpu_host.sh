#!/usr/bin/env bash
# Everything that runs on the GPU host, in phases that fit its call limits. Logs,
# JSON and plots go under $OUT. The host reaches no package index: vLLM comes from
# the offline bundles of ../shared/gpu-runtime copied into .gpu/ (git-ignored),
# unpacked by .gpu/stage.sh; vllm.tar.xz travels alone, the rest in a later call.
#
#   bash benchmarks/run_gpu_host.sh build      # carry .gpu/vllm.tar.xz .gpu/stage.sh
#       stages vLLM, builds and installs vllm_kvcompress (extension + entry point),
#       runs the kernel tests (CPU vs GPU byte identity) and compute-sanitizer memcheck
#   bash benchmarks/run_gpu_host.sh codec      # carry .gpu/kv_pages.pt: codec benchmark
#       (CODEC_ARGS: extra arguments for benchmarks/benchmark_codec.py)
#   bash benchmarks/run_gpu_host.sh sizes      # the codec benchmark by page size and CTA size
#   bash benchmarks/run_gpu_host.sh compare    # COMPARE_PATCH=FILE: the codec benchmark of this
#       tree and of a patched copy, alternately in one call (after `build`)
#   bash benchmarks/run_gpu_host.sh vllm       # carry .gpu/deps.tar.xz .gpu/fa3.xz .gpu/fidelity
#       the offload tests on CPU, then the phases e2e (trains the small test Llama
#       once, end-to-end tests through vLLM on it) and offload (benchmark_offload.py)
#   bash benchmarks/run_gpu_host.sh worker     # benchmark_worker.py: where an offload's time goes
#   bash benchmarks/run_gpu_host.sh eviction   # benchmark_eviction.py: a cold prefill's time,
#       host cache filling vs evicting (scheduler, worker and GPU under one profiler)
#   bash benchmarks/run_gpu_host.sh profile    # Nsight Compute on one compress and decompress launch
#   bash benchmarks/run_gpu_host.sh sass       # the same launches, counts and stalls per SASS instruction
#       (PROFILE_ARGS: extra arguments for benchmark_codec.py in profile and sass,
#       e.g. "--synthetic-shapes 16x12x32" to profile small pages)
#   bash benchmarks/run_gpu_host.sh racecheck  # compute-sanitizer racecheck on the memcheck driver
#   bash benchmarks/run_gpu_host.sh fidelity   # carry .gpu/fidelity: train + evaluate
#   bash benchmarks/run_gpu_host.sh examples   # carry .gpu/fidelity: examples/ on the test model
# Phases may be chained in one call: `build codec`, `e2e fidelity`. SKIP_KERNEL_TESTS=1
# and SKIP_MEMCHECK=1 shorten `build` when the kernels are unchanged. A call brings back
# at most 8 files: point OUT at a scratch folder and tar it into the real $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/kvcompress-out}
mkdir -p "$OUT"
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
status=0

stage() {
  # Bundles carried by an earlier call stay in .gpu/; unpack each one only once.
  local fresh rt=/root/gpu-runtime
  fresh=$(mktemp -d)
  for f in vllm.tar.xz deps.tar.xz fa3.xz; do
    if [ -f ".gpu/$f" ] && [ ! -e "$rt/.staged-$f" ]; then ln -s "$PWD/.gpu/$f" "$fresh/$f"; fi
  done
  # shellcheck disable=SC1091
  . .gpu/stage.sh "$fresh" || return 1
  for f in "$fresh"/*; do [ -e "$f" ] && touch "$rt/.staged-$(basename "$f")"; done
  if [ -d build/dist ]; then  # installed by an earlier call on this host
    export PYTHONPATH="$PWD:$PWD/build/dist${PYTHONPATH:+:$PYTHONPATH}"
  fi
}

# The extension must raise Python exceptions for bad arguments; a toolchain whose
# exception unwinding does not mix with torch's crashes there instead.
error_path_works() {
  python3 - <<'EOF'
import torch
import vllm_kvcompress._custom_ops as ops
for pages, error in ((torch.zeros(2, 8, dtype=torch.float64), TypeError),
                     (torch.zeros(8, 4).t(), ValueError)):
    try:
        ops.compress([pages], torch.tensor([0]), 0.1, True, 1, 1,
                     torch.empty(256, dtype=torch.uint8), torch.empty(1, 3, dtype=torch.long))
    except error as e:
        print("error path ok:", str(e).splitlines()[0])
EOF
}

# Builds the extension into vllm_kvcompress/ and makes the package visible to every
# process (vLLM's workers too) with its entry point, without pip or an index.
# Builds the extension of the source tree $1 into $1/vllm_kvcompress, in the build
# folder $2, logging to $3.
build_extension() {
  { cmake -S "$1" -B "$2" -G Ninja -DCMAKE_BUILD_TYPE=Release -DKVCOMPRESS_CUDA=ON \
      -DPython_EXECUTABLE="$(command -v python3)" \
      -DCMAKE_LIBRARY_OUTPUT_DIRECTORY="$PWD/$1/vllm_kvcompress" \
    && cmake --build "$2" -j "$MAX_JOBS"; } > "$3" 2>&1
}

install_package() {
  rm -rf "build/host-$1" vllm_kvcompress/_C*.so
  build_extension . "build/host-$1" "$OUT/build_$1.log" || return 1
  local dist=build/dist/vllm_kvcompress-0.1.0.dist-info
  mkdir -p "$dist"
  printf 'Metadata-Version: 2.1\nName: vllm-kvcompress\nVersion: 0.1.0\n' > "$dist/METADATA"
  python3 - "$dist/entry_points.txt" <<'EOF2'
import sys, tomllib
eps = tomllib.load(open("pyproject.toml", "rb"))["project"]["entry-points"]
with open(sys.argv[1], "w") as f:
    for group, entries in eps.items():
        f.write(f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in entries.items()))
EOF2
  export PYTHONPATH="$PWD:$PWD/build/dist${PYTHONPATH:+:$PYTHONPATH}"
}

build() {
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem \
    --format=csv > "$OUT/device.csv" 2>&1
  { echo "CC=${CC:-} CXX=${CXX:-} CUDAHOSTCXX=${CUDAHOSTCXX:-}"; ls /usr/bin/g++* /opt/gcc/bin 2>&1
    python3 -c "import torch; print(torch.__config__.show())"; } > "$OUT/toolchain.txt" 2>&1
  local start=$(date +%s) ok=0
  for attempt in default system-gcc shared-libgcc; do
    case $attempt in
      default) install_package "$attempt" ;;
      system-gcc) [ -x /usr/bin/g++ ] || continue
        CC=/usr/bin/gcc CXX=/usr/bin/g++ CUDAHOSTCXX=/usr/bin/g++ install_package "$attempt" ;;
      shared-libgcc) LDFLAGS="-shared-libgcc" install_package "$attempt" ;;
    esac
    { ldd vllm_kvcompress/_C*.so; readelf -d vllm_kvcompress/_C*.so | grep -E "NEEDED|RPATH|RUNPATH"
    } >> "$OUT/toolchain.txt" 2>&1
    if error_path_works >> "$OUT/toolchain.txt" 2>&1; then
      ok=1; echo "build ($attempt): $(( $(date +%s) - start )) s"; break
    fi
    echo "build ($attempt): error path crashed, trying another toolchain"
  done
  [ $ok = 1 ] || { tail -30 "$OUT"/build_*.log; return 1; }

  [ -n "${SKIP_KERNEL_TESTS:-}" ] && return 0
  # Several processes (pytest-xdist, on the host) so one crashing test cannot hide the rest.
  python3 -m pytest tests/kernels -q -rs -n "${TEST_PROCS:-8}" -p no:cacheprovider \
    --junitxml="$OUT/pytest_kernels.xml" > "$OUT/pytest_kernels.log" 2>&1 || status=1
  tail -3 "$OUT/pytest_kernels.log"
  if [ -z "${SKIP_MEMCHECK:-}" ] && command -v compute-sanitizer > /dev/null; then
    compute-sanitizer --tool memcheck --error-exitcode 9 python3 tests/kernels/memcheck_codec.py \
      > "$OUT/memcheck.log" 2>&1 || status=1
    tail -2 "$OUT/memcheck.log"
  fi
}

# The codec benchmark of the package in the tree $1 (. for this one), with the real
# pages of .gpu/kv_pages.pt when carried: $OUT/$2.json and .png, its output in $OUT/$3.
# The GPU's SM clock, power and clock-limiting reasons are sampled alongside into
# $OUT/$2_clocks.csv, so that a run's rates can be read against its clock. The log's
# summary takes the samples above 1 GHz (the idle clock is 345 MHz).
codec_benchmark() {
  local kv_pages=() sampler
  [ -f .gpu/kv_pages.pt ] && kv_pages=(--kv-pages "$PWD/.gpu/kv_pages.pt")
  nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,clocks_event_reasons.active \
    --format=csv,noheader,nounits -lms 250 > "$OUT/$2_clocks.csv" 2>&1 &
  sampler=$!
  # shellcheck disable=SC2086  # CODEC_ARGS (e.g. "--dtypes bf16") is a list of words
  PYTHONPATH="$PWD/$1:$PYTHONPATH" python3 "$1/benchmarks/benchmark_codec.py" "${kv_pages[@]}" \
    --out "$OUT/$2" ${CODEC_ARGS:-} > "$OUT/$3" 2>&1 || status=1
  kill "$sampler" 2> /dev/null; wait "$sampler" 2> /dev/null
  awk -F', ' '$2 > 1000 {print $2}' "$OUT/$2_clocks.csv" | sort -n \
    | awk '{v[NR] = $1} END {if (NR) printf "%s: SM clock while busy, median %d MHz (%d..%d)\n", "'"$2"'", v[int((NR + 1) / 2)], v[1], v[NR]}'
}

codec() {
  codec_benchmark . codec benchmark_codec.log
  grep -v "codec configs" "$OUT/benchmark_codec.log" | tail -40
}

# bf16 pages of 4 to 32 KiB (and the real pages when carried) in CTAs of 2, 4 and 8
# warps, rel eb 1e-2, every mode and layout: the data behind the automatic CTA size
# (automatic_cta_warps in csrc/codec_cuda.cu). 64 KiB pages are left out: CTAs of 2
# warps cannot decompress them.
sizes() {
  CODEC_ARGS="--dtypes bf16 --rel-ebs 1e-2 --codec-warps 2 4 8 --synthetic-shapes 16x2x64 \
    16x4x64 16x8x64 16x12x32 16x16x64 16x8x128 ${SIZES_ARGS:-}" \
    codec_benchmark . codec_sizes benchmark_codec_sizes.log
  tail -1 "$OUT/benchmark_codec_sizes.log"
}

# The small Llama of benchmarks/train_tiny_llama.py (once per host) and held-out
# prompts for it: the end-to-end tests need trained weights, since a random model's
# near-tied logits let any change of arithmetic flip a greedy token.
trained_model() {
  export MODEL_DIR=${MODEL_DIR:-/tmp/tiny-llama}
  if [ ! -f "$MODEL_DIR/model.safetensors" ]; then
    python3 benchmarks/train_tiny_llama.py --data .gpu/fidelity/data.tar.xz \
      --tokenizer .gpu/fidelity/tokenizer --out "$MODEL_DIR" \
      --time-budget-s "${TRAIN_BUDGET_S:-90}" > "$OUT/train.log" 2>&1 || return 1
  fi
  grep -E "^(model:|best step)" "$OUT/train.log" 2> /dev/null
  python3 - "$MODEL_DIR" <<'EOF2'
import json, sys
from pathlib import Path
sys.path.insert(0, "benchmarks")
from benchmark_fidelity import eval_windows
model = Path(sys.argv[1])
(model / "e2e_prompts.json").write_text(
    json.dumps(eval_windows(model, Path(".gpu/fidelity/data.tar.xz"), 8, 512)))
EOF2
}

# Nsight Compute on the first compress and decompress launch of a bf16 sweep point
# (docs/codec.md, "Measurements"): stall reasons, occupancy, memory throughput.
# The working tree's build ("base", from `build`) against a copy of the tree with
# COMPARE_PATCH applied ("variant"), the codec benchmark run in ABBA order
# COMPARE_ROUNDS times (default 1) with CODEC_ARGS, and benchmarks/compare_codec.py's
# table of variant / base (COMPARE_UNCHANGED=decompress or compress: that kernel's
# ratio also nets out the other's). Timing only: the variant's tests run by applying
# the patch to the tree and calling `build`.
compare() {
  [ -f "${COMPARE_PATCH:-}" ] || { echo "compare: set COMPARE_PATCH to a patch file"; status=1; return; }
  local variant=build/compare-variant base=() other=()
  rm -rf "$variant" && mkdir -p "$variant"
  tar cf - --exclude=./build --exclude=./.gpu --exclude='./vllm_kvcompress/_C*.so' . \
    | tar xf - -C "$variant"
  patch -s -p1 -d "$variant" < "$COMPARE_PATCH" || { echo "compare: the patch does not apply"; status=1; return; }
  build_extension "$variant" "$variant/build" "$OUT/build_variant.log" \
    || { echo "compare: the variant does not build (build_variant.log)"; status=1; return; }
  for round in $(seq "${COMPARE_ROUNDS:-1}"); do
    codec_benchmark . "base_${round}a" "base_${round}a.log"
    codec_benchmark "$variant" "variant_${round}a" "variant_${round}a.log"
    codec_benchmark "$variant" "variant_${round}b" "variant_${round}b.log"
    codec_benchmark . "base_${round}b" "base_${round}b.log"
    base+=("$OUT/base_${round}a.json" "$OUT/base_${round}b.json")
    other+=("$OUT/variant_${round}a.json" "$OUT/variant_${round}b.json")
  done
  python3 benchmarks/compare_codec.py --base "${base[@]}" --variant "${other[@]}" \
    ${COMPARE_UNCHANGED:+--unchanged "$COMPARE_UNCHANGED"} \
    --out "$OUT/compare.json" | tee "$OUT/compare.txt" | tail -40
}

profile() {
  command -v ncu > /dev/null || { echo "ncu not found"; status=1; return; }
  ncu --set full --kernel-name regex:"compress_kernel|decompress_kernel" --launch-count 2 \
    --csv --page details python3 benchmarks/benchmark_codec.py --out "$OUT/profile_codec" \
    --dtypes bf16 --modes plain --rel-ebs 1e-2 --warmup 0 --iters 1 ${PROFILE_ARGS:-} \
    > "$OUT/ncu_codec.csv" 2> "$OUT/ncu_codec.log" || status=1
  grep -E '"(Duration|Memory Throughput|DRAM Throughput|Achieved Occupancy|Theoretical Occupancy|Registers Per Thread|Issue Slots Busy|Warp Cycles Per Issued Instruction|Executed Ipc Active)"' \
    "$OUT/ncu_codec.csv" | cut -d, -f5,13- | head -40
}

# Per SASS instruction of the same two launches: executions and sampled stalls
# (docs/codec-kernel-notes.md reads its instruction budgets from these), gzipped.
sass() {
  command -v ncu > /dev/null || { echo "ncu not found"; status=1; return; }
  ncu --section SourceCounters --section WarpStateStats --kernel-name regex:"compress_kernel|decompress_kernel" \
    --launch-count 2 --csv --page source --print-source sass \
    python3 benchmarks/benchmark_codec.py --out "$OUT/sass_codec" --dtypes bf16 --modes plain \
    --rel-ebs 1e-2 --warmup 0 --iters 1 ${PROFILE_ARGS:-} > "$OUT/ncu_sass.csv" 2> "$OUT/ncu_sass.log" || status=1
  gzip -f "$OUT/ncu_sass.csv"
  tail -3 "$OUT/ncu_sass.log"
}

# Shared-memory hazards between the threads of a CTA, on the same launches as memcheck.
racecheck() {
  command -v compute-sanitizer > /dev/null || { echo "compute-sanitizer not found"; status=1; return; }
  timeout "${RACECHECK_TIMEOUT_S:-400}" compute-sanitizer --tool racecheck --racecheck-report all \
    --error-exitcode 9 python3 tests/kernels/memcheck_codec.py > "$OUT/racecheck.log" 2>&1 || status=1
  tail -2 "$OUT/racecheck.log"
}

# KVCOMPRESS_ATTENTION_BACKEND (default TRITON_ATTN) picks vLLM's attention backend
# for the end-to-end tests, OFFLOAD_ATTENTION_BACKEND (default FLASH_ATTN) for the
# offload benchmark, so that both KV layouts run through the connector.
e2e() {
  export KVCOMPRESS_ATTENTION_BACKEND=${KVCOMPRESS_ATTENTION_BACKEND:-TRITON_ATTN}
  if trained_model; then
    export KVCOMPRESS_TEST_MODEL=$MODEL_DIR KVCOMPRESS_TEST_PROMPTS=$MODEL_DIR/e2e_prompts.json
  else
    echo "training the test model failed (train.log); the e2e tests use random weights"
    status=1
  fi
  # The engine runs in this process (no engine-core subprocess), so a stall at engine
  # start shows up in the thread dumps that pytest-timeout writes.
  # E2E_TESTS narrows the run (e.g. tests/offload/test_e2e_gpu.py::test_tensor_parallel_2).
  # shellcheck disable=SC2086  # a list of test ids
  VLLM_ENABLE_V1_MULTIPROCESSING=0 timeout "${E2E_TIMEOUT_S:-300}" python3 -m pytest \
    ${E2E_TESTS:-tests/offload/test_e2e_gpu.py} -q -rs -s -p no:cacheprovider --timeout "${E2E_TEST_TIMEOUT_S:-150}" \
    --timeout-method thread --junitxml="$OUT/pytest_e2e.xml" > "$OUT/pytest_e2e.log" 2>&1 \
    || status=1
  grep -E "passed|failed|PASSED|FAILED|Error|error:|error bound|default bound" \
    "$OUT/pytest_e2e.log" | cut -c1-600 | tail -15
}

offload() {
  timeout "${OFFLOAD_TIMEOUT_S:-300}" python3 benchmarks/benchmark_offload.py \
    --out "$OUT/offload" --repeats "${OFFLOAD_REPEATS:-5}" --enforce-eager \
    --attention-backend "${OFFLOAD_ATTENTION_BACKEND:-FLASH_ATTN}" \
    > "$OUT/benchmark_offload.log" 2>&1 || status=1
  grep -v "offload configs" "$OUT/benchmark_offload.log" | tail -12
}

# One prompt's store and load through the worker alone, in each KV layout of
# WORKER_LAYOUTS (default both): host launch time, GPU time and the PCIe roofline,
# with a profiler table.
worker() {
  for layout in ${WORKER_LAYOUTS:-flash cross}; do
    python3 benchmarks/benchmark_worker.py --layout "$layout" --profile \
      --out "$OUT/worker_$layout" > "$OUT/benchmark_worker_$layout.log" 2>&1 || status=1
    head -10 "$OUT/benchmark_worker_$layout.log"
  done
}

eviction() {
  timeout "${EVICTION_TIMEOUT_S:-300}" python3 benchmarks/benchmark_eviction.py \
    --out "$OUT/eviction" --enforce-eager > "$OUT/benchmark_eviction.log" 2>&1 \
    || { status=1; tail -20 "$OUT/benchmark_eviction.log"; }
  sed -n '/per new prompt/,$p' "$OUT/benchmark_eviction.log" | cut -c1-90 | head -60
}

# Every example in examples/ on the trained test model, shrunk to its 1024-token
# context: the offline round trip, the multi-turn demo with a host cache that holds
# the conversations only compressed, and the server with two client requests.
examples() {
  trained_model || { status=1; return; }
  python3 examples/offline_compressed_offload.py "$MODEL_DIR" --kv-offloading-size 1 \
    --max-model-len 1024 --document-entries 16 > "$OUT/example_offline.log" 2>&1 || status=1
  grep -E "^(===|\[)" "$OUT/example_offline.log" | cut -c1-160
  python3 examples/multi_turn_long_prefix.py "$MODEL_DIR" --conversations 8 --turns 3 \
    --document-entries 16 --answer-tokens 16 --max-model-len 1024 --gpu-kv-blocks 128 \
    --kv-offloading-size 0.015 > "$OUT/example_multi_turn.log" 2>&1 || status=1
  tail -4 "$OUT/example_multi_turn.log"
  # The test model's tokenizer has no chat template; the client sends a chat request.
  printf '%s' "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:" \
    > /tmp/chat.jinja
  bash examples/serve_compressed_offload.sh "$MODEL_DIR" --max-model-len 1024 \
    --gpu-memory-utilization 0.3 --chat-template /tmp/chat.jinja > "$OUT/example_serve.log" 2>&1 &
  local server=$! up=0
  local fetch='import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1]).read().decode())'
  for _ in $(seq 120); do
    if python3 -c "$fetch" http://localhost:8000/health > /dev/null 2>&1; then up=1; break; fi
    sleep 1
  done
  if [ $up = 1 ]; then
    # 30 lines of system prompt: about 700 tokens, inside the 1024-token context.
    { python3 examples/openai_client_request.py --system-entries 30 \
      && python3 examples/openai_client_request.py --system-entries 30; } \
      > "$OUT/example_client.log" 2>&1 || status=1
    python3 -c "$fetch" http://localhost:8000/metrics | grep -E "^vllm:kv_offload_" \
      >> "$OUT/example_client.log"
    tail -15 "$OUT/example_client.log"
  else
    echo "the example server did not come up (example_serve.log)"; status=1
  fi
  kill "$server" 2> /dev/null; wait "$server" 2> /dev/null
}

vllm_phase() {
  python3 -m pytest tests/offload -q -rs -p no:cacheprovider --deselect tests/offload/test_e2e_gpu.py \
    > "$OUT/pytest_offload_cpu.log" 2>&1 || status=1
  tail -1 "$OUT/pytest_offload_cpu.log"
  e2e
  offload
}

fidelity() {
  ATTENTION_BACKEND=${KVCOMPRESS_ATTENTION_BACKEND:-TRITON_ATTN} \
    bash benchmarks/run_fidelity_host.sh "${FIDELITY_LEVEL:-quick}" || status=1
}

stage
for phase in "${@:-build}"; do
  case $phase in
    build) build || exit 1 ;;
    kernels) ;;
    codec) codec ;;
    sizes) sizes ;;
    compare) compare ;;
    vllm) vllm_phase ;;
    e2e) e2e ;;
    offload) offload ;;
    worker) worker ;;
    eviction) eviction ;;
    profile) profile ;;
    sass) sass ;;
    racecheck) racecheck ;;
    fidelity) fidelity ;;
    examples) examples ;;
    *) echo "unknown phase $phase" >&2; exit 2 ;;
  esac
done
exit $status
