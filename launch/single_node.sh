#!/usr/bin/env bash
# One node, one process per GPU (or NPROC CPU processes with gloo).
#   launch/single_node.sh CONFIG DATA RUN [--set section.key=value ...]
# Environment:
#   NPROC         processes on this node (default: the number of GPUs, else 2)
#   PYTHON        the Python whose torch counts the GPUs (default .venv/bin/python)
#   MAX_RESTARTS  group restarts after a failed worker (default 3); training resumes from the
#                 newest complete checkpoint in RUN
#   OMP_NUM_THREADS  CPU threads per process (default 1 with several CPU processes)
set -euo pipefail
[ $# -ge 3 ] || { sed -n '2,/^set -euo pipefail/ s/^# //p' "$0"; exit 2; }  # the usage above
CONFIG=$1 DATA=$2 RUN=$3; shift 3
cd "$(dirname "$0")/.."
TORCHRUN=${TORCHRUN:-$( [ -x .venv/bin/torchrun ] && echo .venv/bin/torchrun || echo torchrun )}
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
if [ -z "${NPROC:-}" ]; then
    # the CUDA devices torch will use (CUDA_VISIBLE_DEVICES and MIG respected; `nvidia-smi -L`
    # counted MIG lines too): one process each, as NCCL needs
    GPUS=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
    NPROC=$( [ "${GPUS:-0}" -gt 0 ] && echo "$GPUS" || echo 2 )
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec "$TORCHRUN" --standalone --nproc_per_node="$NPROC" --max-restarts="${MAX_RESTARTS:-3}" \
    -m trainer.train --config "$CONFIG" --data "$DATA" --run-dir "$RUN" "$@"
