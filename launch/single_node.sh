#!/usr/bin/env bash
# One node, one process per GPU (or NPROC CPU processes with gloo).
#   launch/single_node.sh CONFIG DATA RUN [--set section.key=value ...]
# Environment:
#   NPROC         processes on this node (default: the number of GPUs, else 2); with NCCL (the
#                 default with GPUs) at most one per GPU: more stop the script before torchrun
#   PYTHON        the Python whose torch counts the GPUs (default .venv/bin/python)
#   MAX_RESTARTS  group restarts after a failed worker (default 3); training resumes from the
#                 newest complete checkpoint in RUN
#   OMP_NUM_THREADS  CPU threads per process (default 1, whatever NPROC)
set -euo pipefail
[ $# -ge 3 ] || { sed -n '2,/^set -euo pipefail/ s/^# //p' "$0"; exit 2; }  # the usage above
CONFIG=$1 DATA=$2 RUN=$3; shift 3
# NOTE: from the caller's directory, as given: the command below runs from the repository
# root, where a relative RUN put the run inside the checkout and DATA read its data/.
for v in CONFIG DATA RUN; do [[ ${!v} = /* ]] || printf -v "$v" %s "$PWD/${!v}"; done
# So is train.init_from, the path a --set gives (a TOML string's quotes taken off): relative,
# it named a source in the checkout (missing there, or another run of that name).
given=()
for word in "$@"; do
    if [[ $word =~ ^(--set=)?train\.init_from=(.+)$ ]]; then
        src=${BASH_REMATCH[2]}
        [[ ${#src} -ge 2 && ( $src = \"*\" || $src = \'*\' ) ]] && src=${src:1:${#src}-2}
        [[ -z $src || $src = /* || $src = \~* ]] ||
            word="${BASH_REMATCH[1]}train.init_from=$PWD/$src"
    fi
    given+=("$word")
done
set -- ${given[@]+"${given[@]}"}
cd "$(dirname "$0")/.."
source launch/torchrun_env.sh  # TORCHRUN, PYTHON, NPROC, CHECK_NPROC, MAX_RESTARTS, OMP_...
# NOTE: the checks each worker makes before its process group (the config, DATA, RUN, NPROC
# against the GPUs), made once here: torchrun would restart the group on such an error
# MAX_RESTARTS times, printing it again each time and ending in its ChildFailedError traceback
# with exit 1 instead of 2.
"$PYTHON" -m trainer.train --check ${CHECK_NPROC[@]+"${CHECK_NPROC[@]}"} \
    --config "$CONFIG" --data "$DATA" --run-dir "$RUN" "$@"
exec "$TORCHRUN" --standalone --nproc_per_node="$NPROC" --max-restarts="$MAX_RESTARTS" \
    -m trainer.train --config "$CONFIG" --data "$DATA" --run-dir "$RUN" "$@"
