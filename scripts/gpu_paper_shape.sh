#!/usr/bin/env bash
# The paper-shape SAE training benchmark (benchmarks/sae_train_paper_shape.py) on one GPU:
# d_in 4096, 65,536 features, batch 4,096; standard and batchtopk, exact fp32 then TF32.
# Each (arch, precision) runs in its own process (a clean peak-memory reading) and writes
# $OUT/<arch>_<precision>.json; the whole log goes to $OUT/paper_shape.log.
#
# Installs nothing from the network. Needs python3 with CUDA torch, numpy, safetensors, tqdm
# and pydantic; vLLM is not needed (importing the benchmark never imports it). A machine
# without pydantic (the nvidia-h200 device image has none) takes it from wheels in .whl/:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
#     typing-inspection==0.4.5 typing-extensions
# and run it with .whl carried. Estimated (not yet measured): 6 minutes on an H200 at the
# defaults. The TF32 pass is skipped when the fp32 pass took more than BUDGET_S - 180 s
# (BUDGET_S defaults to 480).
#
#   OUT=runs/gpu bash scripts/gpu_paper_shape.sh        # STEPS=200 WARMUP=10 by default
#   DEVICE=cpu EXTRA=--smoke bash scripts/gpu_paper_shape.sh   # a dry run of this script on CPU
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-runs/gpu_paper_shape}"
STEPS="${STEPS:-200}"
WARMUP="${WARMUP:-10}"
BUDGET_S="${BUDGET_S:-480}"
PY="${PYTHON:-python3}"
DEVICE="${DEVICE:-cuda}"
read -r -a EXTRA_ARGS <<<"${EXTRA:-}"
mkdir -p "$OUT"
LOG="$OUT/paper_shape.log"
export PYTHONUNBUFFERED=1

if ! "$PY" -c "import pydantic" 2>/dev/null; then
  if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/paper-shape-site .whl/*.whl
    export PYTHONPATH="/tmp/paper-shape-site${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "pydantic is not installed and there is no .whl/ to install it from (see this script's header)" | tee -a "$LOG" >&2
    exit 1
  fi
fi
if [ "$DEVICE" = cuda ]; then
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device visible')"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv >>"$LOG" 2>&1 || true

# The trainer's final checkpoint is ~6 GiB at this shape (weights + Adam state): write it to RAM
# when /dev/shm has room (it is deleted right after; it is not timed either way).
shm_kb="$(df -k --output=avail /dev/shm 2>/dev/null | tail -1 | tr -d ' ')"
if [ "${shm_kb:-0}" -gt $((16 * 1024 * 1024)) ] 2>/dev/null; then
  export TMPDIR=/dev/shm
fi

run() {  # arch precision [extra args]; a failed run is logged and the next one still runs
  local arch="$1" prec="$2"
  shift 2
  echo "== $arch $prec ($SECONDS s elapsed)" | tee -a "$LOG"
  "$PY" -m benchmarks.sae_train_paper_shape --device "$DEVICE" --arch "$arch" --steps "$STEPS" \
    --warmup-steps "$WARMUP" --out "$OUT/${arch}_${prec}.json" "$@" "${EXTRA_ARGS[@]}" 2>&1 |
    tee -a "$LOG" || echo "== $arch $prec FAILED" | tee -a "$LOG"
}

run standard fp32
run batchtopk fp32
if [ "$SECONDS" -lt $((BUDGET_S - 180)) ]; then
  run standard tf32 --tf32
  run batchtopk tf32 --tf32
else
  echo "skipping the TF32 pass: $SECONDS s used of $BUDGET_S" | tee -a "$LOG"
fi
echo "done in $SECONDS s" | tee -a "$LOG"
