# Sourced (from the repository root) by single_node.sh and multi_node.sh: the torchrun and the
# Python to use, the processes per node (and CHECK_NPROC, their part of the --check before
# torchrun), the CPU threads of each, and from_caller for the paths the caller gave.
TORCHRUN=${TORCHRUN:-$( [ -x .venv/bin/torchrun ] && echo .venv/bin/torchrun || echo torchrun )}
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}

# need_number NAME MIN [MAX]: the variable NAME holds a whole number in [MIN, MAX], or the script
# stops naming it (torchrun's own checks ended in a traceback: NPROC=0 in a bare AssertionError,
# NNODES=abc in "invalid literal for int()").
need_number() {
    local value=${!1}
    if ! [[ $value =~ ^[0-9]{1,9}$ ]] || (( 10#$value < $2 )) || (( ${3:+10#$value > $3} )); then
        echo "error: $1=$value: give a whole number from $2${3:+ to $3}" >&2
        exit 2
    fi
}

# from_caller DIR [ARG ...]: the paths given relative to DIR, the caller's directory, made
# absolute: CONFIG, DATA and RUN in place, and train.init_from's in a --set among the ARGs,
# which come back in ARGS.
# NOTE: the scripts run from the repository root, where a relative RUN put the run inside the
# checkout, DATA read its data/, and an init_from named a source there (missing, or another run
# of that name). The --set's value is a TOML string's: its quotes are taken off.
from_caller() {
    local dir=$1 v word src
    shift
    for v in CONFIG DATA RUN; do [[ ${!v} = /* ]] || printf -v "$v" %s "$dir/${!v}"; done
    ARGS=()
    for word in "$@"; do
        if [[ $word =~ ^(--set=)?train\.init_from=(.+)$ ]]; then
            src=${BASH_REMATCH[2]}
            [[ ${#src} -ge 2 && ( $src = \"*\" || $src = \'*\' ) ]] && src=${src:1:${#src}-2}
            [[ -z $src || $src = /* || $src = \~* ]] ||
                word="${BASH_REMATCH[1]}train.init_from=$dir/$src"
        fi
        ARGS+=("$word")
    done
}

# the CUDA devices torch will use (CUDA_VISIBLE_DEVICES and MIG respected; `nvidia-smi -L`
# counted MIG lines too): one process each, as NCCL needs
gpu_count() {
    local n
    n=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null) || n=0
    [[ $n =~ ^[0-9]+$ ]] && echo "$n" || echo 0
}
if [ -z "${NPROC:-}" ]; then
    GPUS=$(gpu_count)
    NPROC=$( [ "$GPUS" -gt 0 ] && echo "$GPUS" || echo 2 )
fi
# NOTE: a number goes to trainer.train --check, which refuses more processes than GPUs under
# NCCL (they would share one) as every worker would, but once: torchrun restarted the group on
# it. torchrun's own words pass through, counted by torchrun.
# (The scripts expand it as ${CHECK_NPROC[@]+"${CHECK_NPROC[@]}"}: bash before 4.4 calls an
# empty array unbound under set -u.)
case $NPROC in
    # NOTE: torchrun's "gpu" on a machine where torch sees no GPU ended in its traceback,
    # "ValueError: Cuda is not available.", exit 1
    gpu) [ "$(gpu_count)" -gt 0 ] || { echo "error: NPROC=gpu: $PYTHON's torch sees no CUDA" \
             "device here: give a number of processes (gloo on the CPU), or run on a GPU node" >&2
             exit 2; }
         CHECK_NPROC=() ;;
    cpu|auto) CHECK_NPROC=() ;;
    *) need_number NPROC 1; CHECK_NPROC=(--nproc "$NPROC") ;;
esac
MAX_RESTARTS=${MAX_RESTARTS:-3}
need_number MAX_RESTARTS 0
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
