#!/usr/bin/env bash
# Launch training with torchrun on this machine.
#
#   ./run_train.sh                                   # debug model on the bundled data
#   NGPU=8 CONFIG_FILE=./train_configs/llama3_8b.toml ./run_train.sh --training.steps 100
#
# NGPU        processes to start (default: the number of visible GPUs, or 1 without a GPU;
#             without a GPU every process trains on the CPU over gloo, so any layout can be
#             tried on a laptop, e.g. NGPU=4 ./run_train.sh --parallelism.tensor_parallel_degree 2)
# CONFIG_FILE TOML file (default ./train_configs/debug_model.toml)
# LOG_RANK    comma-separated ranks whose output is shown (default 0)
# MAX_RESTARTS how many times torchrun restarts a failed job (default 0)
# LOG_DIR     every rank's full stdout/stderr is kept under
#             $LOG_DIR/<run>_<random>/attempt_<n>/<local rank>/ (default ./outputs/torchrun_logs),
#             whatever LOG_RANK shows; torchrun's failure summary names the rank that failed
# DRY_RUN=1   plan instead of training: build the layout for NGPU ranks in this one process
#             (fake process group, no GPU) and predict memory and step time (docs/planning.md)
# Extra arguments are passed to the trainer (--section.key value).
set -euo pipefail
cd "$(dirname "$0")"

# The GPUs this host shows: asked of torch (an import, ~2 s) once, only when an answer needs
# it, and not at all when CUDA_VISIBLE_DEVICES is set and empty.
visible_gpus=""
probe_gpus() {
  [ -n "$visible_gpus" ] && return 0
  if [ -n "${CUDA_VISIBLE_DEVICES+set}" ] && [ -z "${CUDA_VISIBLE_DEVICES}" ]; then
    visible_gpus=0
  else
    visible_gpus=$(python3 -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
  fi
}
if [ -z "${NGPU:-}" ]; then
  probe_gpus
  NGPU=$(( visible_gpus > 0 ? visible_gpus : 1 ))
fi
CONFIG_FILE=${CONFIG_FILE:-./train_configs/debug_model.toml}
LOG_RANK=${LOG_RANK:-0}
MAX_RESTARTS=${MAX_RESTARTS:-0}
LOG_DIR=${LOG_DIR:-./outputs/torchrun_logs}

if [ "${DRY_RUN:-0}" = "1" ]; then
  exec python3 scripts/plan.py --world_size "${NGPU}" --job.config_file "${CONFIG_FILE}" "$@"
fi

export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
# One intra-op thread per CPU process unless told otherwise, so ranks do not oversubscribe cores.
if [ -z "${OMP_NUM_THREADS:-}" ]; then
  probe_gpus
  if [ "$visible_gpus" = "0" ]; then
    export OMP_NUM_THREADS=$(( $(nproc) / NGPU > 0 ? $(nproc) / NGPU : 1 ))
  fi
fi

exec torchrun --nproc_per_node="${NGPU}" --rdzv_backend c10d --rdzv_endpoint="localhost:0" \
  --max-restarts="${MAX_RESTARTS}" --local-ranks-filter "${LOG_RANK}" --role rank --tee 3 --log-dir "${LOG_DIR}" \
  -m torchtitan.train --job.config_file "${CONFIG_FILE}" "$@"
