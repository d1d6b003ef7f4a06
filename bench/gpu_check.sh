#!/usr/bin/env bash
# Every GPU check of the kernels and of the 24 GB step in one run of at most 10 minutes: the GPU tests,
# bench/kernels.py, bench/train_step.py and bench/teacher_fidelity.py.
#
#   bench/gpu_wheels.sh                 # here, once: bitsandbytes, liger-kernel, transformers wheels into .whl/
#   bash bench/gpu_check.sh "$OUT"      # on the GPU machine, carrying .whl
#
# Writes to the folder given (default bench/results): gpu_check.log (everything printed, with the time of every
# step), kernels.json, train_step.json, teacher_fidelity.json. Each step has its own time limit, so one that hangs
# costs only its share and the others still report.
set -u
cd "$(dirname "$0")/.."
OUT_DIR=${1:-bench/results}
mkdir -p "$OUT_DIR"
exec > >(tee "$OUT_DIR/gpu_check.log") 2>&1
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/alignkd_site \
      .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/alignkd_site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET ALIGNKD_BACKEND
step() {
  local limit=$1; shift
  echo "=== $* (limit ${limit} s) start $(date -u +%T)"
  timeout "$limit" "$@"
  echo "=== rc $? end $(date -u +%T)"
}
date -u +%FT%TZ
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 - <<'PY'
import importlib.metadata as md
import torch
print("python packages:", ", ".join(f"{n} {md.version(n)}" for n in
      ("torch", "triton", "transformers", "bitsandbytes", "liger-kernel", "peft")), "| CUDA", torch.version.cuda)
PY
step 150 python3 -m pytest -m gpu -q -rfEs -p no:cacheprovider
step 100 python3 bench/kernels.py --iters 10 --out "$OUT_DIR/kernels.json"
step 240 python3 bench/train_step.py --out "$OUT_DIR/train_step.json"
step 80 python3 bench/teacher_fidelity.py --out "$OUT_DIR/teacher_fidelity.json"
