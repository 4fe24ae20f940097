#!/usr/bin/env bash
# One node, one process per GPU (or NPROC CPU processes with gloo).
#   launch/single_node.sh CONFIG DATA RUN [--set section.key=value ...]
# Environment:
#   NPROC         processes on this node (default: the number of GPUs, else 2); with NCCL (the
#                 default with GPUs) at most one per GPU: more stop the script before torchrun;
#                 torchrun's gpu, cpu and auto pass (gpu where torch sees no GPU stops it too)
#   PYTHON        the Python whose torch counts the GPUs (default .venv/bin/python)
#   MAX_RESTARTS  group restarts after a failed worker (default 3); training resumes from the
#                 newest complete checkpoint in RUN
#   OMP_NUM_THREADS  CPU threads per process (default 1, whatever NPROC)
set -euo pipefail
[ $# -ge 3 ] || { sed -n '2,/^set -euo pipefail/ s/^# //p' "$0"; exit 2; }  # the usage above
CONFIG=$1 DATA=$2 RUN=$3; shift 3
CALLER=$PWD  # (the paths given are relative to it: from_caller, below)
cd "$(dirname "$0")/.."
source launch/torchrun_env.sh  # TORCHRUN, PYTHON, NPROC, CHECK_NPROC, MAX_RESTARTS, OMP_...
from_caller "$CALLER" "$@"  # CONFIG, DATA, RUN and a train.init_from: absolute
set -- ${ARGS[@]+"${ARGS[@]}"}
# NOTE: the checks each worker makes before its process group (the config, DATA, RUN, NPROC
# against the GPUs), made once here: torchrun would restart the group on such an error
# MAX_RESTARTS times, printing it again each time and ending in its ChildFailedError traceback
# with exit 1 instead of 2.
"$PYTHON" -m trainer.train --check ${CHECK_NPROC[@]+"${CHECK_NPROC[@]}"} \
    --config "$CONFIG" --data "$DATA" --run-dir "$RUN" "$@"
exec "$TORCHRUN" --standalone --nproc_per_node="$NPROC" --max-restarts="$MAX_RESTARTS" \
    -m trainer.train --config "$CONFIG" --data "$DATA" --run-dir "$RUN" "$@"
