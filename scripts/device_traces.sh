#!/usr/bin/env bash
# Generate the shipped trace set on one GPU: SmolLM2-135M-Instruct from its GGUF,
# configs/teacher_smollm2.py:gpu, resumable parts under OUT_DIR, then compacted + summarised.
#   bash scripts/device_traces.sh GGUF_FILE OUT_DIR [SECONDS]
# SECONDS bounds the generation (default 300); what finished by then is kept (the generator is
# resumable: rerun the same command to continue).  Wheels in .whl/ are installed first if present.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
GGUF="$1"; DIR="$2"; LIMIT="${3:-300}"
PY="${PYTHON:-python3}"
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
read -r -a extra <<< "${EXTRA_ARGS:-}"  # further --config.KEY=VALUE flags, space-separated
args=(--config=configs/teacher_smollm2.py:gpu "--config.teacher.model=$GGUF"
      "--config.out_dir=$DIR" "${extra[@]}")
t0=$(date +%s)
timeout "$LIMIT" "$PY" -m regift_jax.generate_traces "${args[@]}" --config.progress=False
echo "generation exit code $? after $(( $(date +%s) - t0 ))s"
"$PY" -m regift_jax.generate_traces "${args[@]}" --config.finalize_only=True 2>&1 | tail -40
