# Sourced (from the repository root) by single_node.sh and multi_node.sh: the torchrun and the
# Python to use, the processes per node and the CPU threads of each.
TORCHRUN=${TORCHRUN:-$( [ -x .venv/bin/torchrun ] && echo .venv/bin/torchrun || echo torchrun )}
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
if [ -z "${NPROC:-}" ]; then
    # the CUDA devices torch will use (CUDA_VISIBLE_DEVICES and MIG respected; `nvidia-smi -L`
    # counted MIG lines too): one process each, as NCCL needs
    GPUS=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
    NPROC=$( [ "${GPUS:-0}" -gt 0 ] && echo "$GPUS" || echo 2 )
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
