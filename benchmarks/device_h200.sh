#!/usr/bin/env bash
# One prepared benchmark for a lent NVIDIA H100/H200 (issue 8): a Llama-3-8B-shaped model with
# random weights in bf16, sequence 2048, FSDP mesh on one chip: SFT tokens/s and MFU (LoRA and
# full fine-tuning), generation tokens/s at batch 64; baseline transformers(+PEFT) on the same
# card in a separate process.  Finishes in about 5 minutes.  Usage:
#   bash benchmarks/device_h200.sh [OUT_DIR]          # default benchmarks/results/device
#   SMOKE=1 bash benchmarks/device_h200.sh /tmp/dev   # tiny model on CPU: checks the script
# Needs python3 with jax[cuda], flax, optax, torch, transformers, peft; if a folder .whl/ of
# wheels exists (packages missing on the machine), they are installed to /tmp/site first.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-benchmarks/results/device}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"
extra=(${BENCH_ARGS:-})
# full fine-tuning of the 8B model adds ~1.5 minutes (compile + steps): FULL=1 to include it
[ -n "${FULL:-}" ] || extra+=(--skip_full)
if [ -n "${SMOKE:-}" ]; then extra+=(--smoke --batch 2 --steps 2); export JAX_PLATFORMS=cpu; fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version \
  --format=csv,noheader
timeout "${JAX_TIMEOUT:-240}" "$PY" benchmarks/device_h200.py --part jax --out "$OUT" \
  "${extra[@]}" 2>&1 | tee "$OUT/device_jax.log"
timeout "${TORCH_TIMEOUT:-120}" "$PY" benchmarks/device_h200.py --part torch --out "$OUT" \
  "${extra[@]}" 2>&1 | tee "$OUT/device_torch.log"
"$PY" benchmarks/device_h200.py --part report --out "$OUT"
