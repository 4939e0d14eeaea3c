#!/usr/bin/env bash
# The GPU check of issue 19: in one go, on one data-centre GPU (sized for under ten minutes on
# an H200), for SmolLM2-135M (smollm2) and Gemma-3-270m (gemma3):
#   1. capture ratio   benchmarks/capture.py: the capture pass with the Gram against a plain pass
#   2. speed           benchmarks/speed.py: pruned vs dense prefill/decode against theory
#   3. quality grid    benchmarks/quality.py: one seed, 30% and 40%, gprune / flap / wanda_sp+lsq
# and prints each benchmark's figures (its last lines: Gram and capture ratios; prefill speedup
# over theory; gprune's held-out ppl over the best baseline at 30% and 40%) with a label, then
# all of them again.
#
#   benchmarks/gpu_check.sh               # on a machine with a CUDA GPU
#   benchmarks/gpu_check.sh --dry-run     # CPU smoke: tiny model, tiny budgets (runs anywhere)
#
# Python: $GPRUNE_PYTHON, else .venv/bin/python (built with `make setup` when missing). The
# lock installs CPU torch: on a GPU machine install torch's CUDA build into that Python first
# (docker/Dockerfile.cuda shows how). Outputs and the artifact store: $GPU_CHECK_OUT
# (default .gprune/gpu_check). A model whose embedded spec is unknown is skipped, said in one line.
set -euo pipefail
cd "$(dirname "$0")/.."

DRY=0
case "${1:-}" in
  --dry-run) DRY=1 ;;
  "") ;;
  *) echo "usage: benchmarks/gpu_check.sh [--dry-run]" >&2; exit 2 ;;
esac

export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" HF_DATASETS_OFFLINE="${HF_DATASETS_OFFLINE:-1}"
export DO_NOT_TRACK=1 PREFECT_SERVER_ANALYTICS_ENABLED=false TOKENIZERS_PARALLELISM=false
OUT="${GPU_CHECK_OUT:-.gprune/gpu_check}"
export GPRUNE_STORE="$OUT/store"
mkdir -p "$OUT"

if [[ -n "${GPRUNE_PYTHON:-}" ]]; then
  PY="$GPRUNE_PYTHON"
else
  [[ -x .venv/bin/python ]] || make setup
  PY=.venv/bin/python
fi

if (( DRY )); then
  DEVICE=cpu
  MODELS=(tiny:llama)
  CAPTURE=(--n 2 --seq-len 32 --batch 2 --repeats 1)
  SPEED=(--sparsities 0.3 0.4 --prompt-tokens 32 --decode-tokens 4 --repeats 1)
  QUALITY=(--capture-sequences 2 --capture-seq-len 32 --eval-tokens 128 --eval-seq-len 64)
else
  DEVICE=cuda
  MODELS=(smollm2 gemma3)
  CAPTURE=(--n 32 --seq-len 512 --batch 8 --repeats 3)
  SPEED=(--sparsities 0.3 0.4 --prompt-tokens 512 --batch 8 --decode-tokens 64 --repeats 5
         --dtype bfloat16)
  QUALITY=(--capture-sequences 32 --capture-seq-len 512 --eval-tokens 8192)
  if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "error: no CUDA GPU visible to $PY (torch $("$PY" -c 'import torch; print(torch.__version__)')); install torch's CUDA build or use --dry-run" >&2
    exit 1
  fi
  "$PY" -c "import torch; p = torch.cuda.get_device_properties(0); print(f'hardware: {p.name}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}, CUDA {torch.version.cuda}')"
fi

FIGURES=()

# run LABEL LOG LINES COMMAND...: run a benchmark, stdout into LOG (stderr into LOG.stderr);
# print and remember the last LINES lines of its stdout (each benchmark prints its figures last)
run() {
  local label="$1" log="$2" lines="$3"; shift 3
  local started=$SECONDS figure
  echo "== $label: $*"
  "$@" > "$log" 2> "$log.stderr" || {
    echo "error: $label failed; the end of $log(.stderr):" >&2
    tail -n 10 "$log" "$log.stderr" >&2
    exit 1
  }
  while IFS= read -r figure; do
    echo "$label ($((SECONDS - started)) s): $figure"
    FIGURES+=("$label: $figure")
  done < <(tail -n "$lines" "$log")
}

known() {   # is $1 a model spec this checkout knows (tiny:*, or an embedded name)?
  [[ "$1" == tiny:* ]] || "$PY" -c "import sys; from gprune.models.assets import EMBEDDED; sys.exit(0 if sys.argv[1] in EMBEDDED else 1)" "$1"
}

for model in "${MODELS[@]}"; do
  if ! known "$model"; then
    echo "skip $model: no embedded model spec '$model' in this checkout (gprune.models.assets.EMBEDDED)"
    FIGURES+=("$model: skipped (unknown model spec)")
    continue
  fi
  tag="${model//:/-}"
  run "$model capture" "$OUT/capture-$tag.log" 2 \
      "$PY" benchmarks/capture.py --model "$model" --device "$DEVICE" "${CAPTURE[@]}"
  run "$model speed" "$OUT/speed-$tag.log" 1 \
      "$PY" benchmarks/speed.py --model "$model" --device "$DEVICE" "${SPEED[@]}"
  run "$model quality" "$OUT/quality-$tag.log" 2 \
      "$PY" benchmarks/quality.py --model "$model" --device "$DEVICE" --seeds 0 --groups main \
      --sparsities 0.3 0.4 --methods gprune flap wanda_sp:reconstruct=lsq \
      --out "$OUT/quality-$tag" "${QUALITY[@]}"
done

echo "== figures ($( ((DRY)) && echo "dry run, CPU, tiny budgets: not GPU figures" || echo "$DEVICE"), ${SECONDS} s in all)"
printf '%s\n' "${FIGURES[@]}"
