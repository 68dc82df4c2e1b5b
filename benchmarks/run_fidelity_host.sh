#!/usr/bin/env bash
# The fidelity evaluation on the GPU host, in one call: trains the small Llama
# (benchmarks/train_tiny_llama.py) into $MODEL_DIR, then runs
# benchmarks/benchmark_fidelity.py on it; JSON, PNG and logs go under $OUT.
#   bash benchmarks/run_fidelity_host.sh [full|quick|baseline]      (default: full)
# Needs the carried .gpu/fidelity/ (data.tar.xz, tokenizer/) from
# benchmarks/prepare_fidelity_data.py, vLLM importable (the offline runtime staged
# with .gpu/stage.sh) and vllm_kvcompress._C built in place; it installs nothing.
# Environment:
#   OUT=/tmp/out  MODEL_DIR=/tmp/tiny-llama  TRAIN_BUDGET_S=240 (training loop cap)
#   TOTAL_S=480   the whole call: the sweep gets what training leaves, less 20 s
#   RETRAIN=1     train even if $MODEL_DIR already holds a model (a warm host)
#   ATTENTION_BACKEND=TRITON_ATTN   passed to vLLM (default: vLLM's choice)
#   FIDELITY_ARGS="..."             extra arguments for benchmark_fidelity.py
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
start=$(date +%s)
OUT=${OUT:-/tmp/out}
MODEL_DIR=${MODEL_DIR:-/tmp/tiny-llama}
sweep=${1:-full}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export VLLM_USE_FLASHINFER_SAMPLER=${VLLM_USE_FLASHINFER_SAMPLER:-0}

case $sweep in
  full) sweep_args=() ;;
  quick) sweep_args=(--quick) ;;
  baseline) sweep_args=(--baseline-only) ;;
  *) echo "usage: $0 [full|quick|baseline]" >&2; exit 2 ;;
esac
if [ ! -f .gpu/fidelity/data.tar.xz ] || [ ! -d .gpu/fidelity/tokenizer ]; then
  echo "carry .gpu/fidelity/ (benchmarks/prepare_fidelity_data.py makes it)" >&2
  exit 2
fi
python3 -c "import importlib.util as u, sys; sys.exit(not (u.find_spec('vllm') and u.find_spec('vllm_kvcompress')))" \
  || { echo "vllm or vllm_kvcompress not on the path: stage the runtime (. .gpu/stage.sh DIR)" >&2; exit 2; }

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/device.csv" 2>&1

if [ -n "${RETRAIN:-}" ] || [ ! -f "$MODEL_DIR/model.safetensors" ]; then
  python3 benchmarks/train_tiny_llama.py --data .gpu/fidelity/data.tar.xz \
      --tokenizer .gpu/fidelity/tokenizer --out "$MODEL_DIR" \
      --time-budget-s "${TRAIN_BUDGET_S:-240}" > "$OUT/train.log" 2>&1 \
    || { tail -30 "$OUT/train.log"; exit 1; }
fi
grep -E "^(train:|model:|timing:|best step)" "$OUT/train.log" 2> /dev/null
cp "$MODEL_DIR/training_summary.json" "$OUT/"
echo "training done: $(( $(date +%s) - start )) s"

deadline=$(( ${TOTAL_S:-480} - ($(date +%s) - start) - 20 ))
backend=()
[ -n "${ATTENTION_BACKEND:-}" ] && backend=(--attention-backend "$ATTENTION_BACKEND")
# shellcheck disable=SC2086  # FIDELITY_ARGS is a list of words on purpose
python3 benchmarks/benchmark_fidelity.py --model "$MODEL_DIR" --data .gpu/fidelity/data.tar.xz \
    --out "$OUT/fidelity" --deadline-s "$deadline" "${sweep_args[@]}" "${backend[@]}" \
    ${FIDELITY_ARGS:-} > "$OUT/fidelity.log" 2>&1
status=$?
# The table, the skipped points and the recommendation are the log's last lines.
sed -n '/^point /,$p' "$OUT/fidelity.log"
[ $status -eq 0 ] || tail -40 "$OUT/fidelity.log"
echo "total: $(( $(date +%s) - start )) s"
exit $status
