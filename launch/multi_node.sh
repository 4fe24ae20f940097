#!/usr/bin/env bash
# Several nodes with c10d rendezvous: run this same command on every node.
#   MASTER_ADDR=node0 NNODES=2 launch/multi_node.sh CONFIG DATA RUN [--set ...]
# Environment:
#   MASTER_ADDR   host of the rendezvous (any one of the nodes; required); one that does not
#                 resolve stops the script with an error naming it, exit 2
#   MASTER_PORT   its TCP port (default 29400); must be reachable from every node, and no
#                 other job's on MASTER_ADDR: a job that finds it taken joins that job's
#                 rendezvous store and dies when that job ends. Held by anything else (a web
#                 server, say), the script stops with an error naming it, exit 2; so it
#                 does on a port below 1024 that this user may not bind (not root)
#   NNODES        number of nodes, or MIN:MAX for an elastic range (default 2)
#   NPROC         processes per node (default: the node's GPU count, else 2); with NCCL (the
#                 default with GPUs) at most one per GPU: more stop the script before torchrun;
#                 torchrun's gpu, cpu and auto pass (gpu where torch sees no GPU stops it too)
#   PYTHON        the Python whose torch counts the GPUs (default .venv/bin/python)
#   RDZV_ID       a job id shared by all nodes of one run (default: footprints)
#   MAX_RESTARTS  group restarts after a failure (default 3); all ranks resume from RUN's newest
#                 complete checkpoint, so RUN must be on storage every node sees
#   NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME  the network interface to use, if not the default
#   OMP_NUM_THREADS  CPU threads per process (default 1, whatever NPROC)
set -euo pipefail
[ $# -ge 3 ] || { sed -n '2,/^set -euo pipefail/ s/^# //p' "$0"; exit 2; }  # the usage above
# (not ${MASTER_ADDR:?}: bash's own words, "line 21: MASTER_ADDR: ...", and exit 1, where every
# other setting this script refuses is one "error:" line and exit 2)
if [ -z "${MASTER_ADDR:-}" ]; then
    echo "error: MASTER_ADDR is not set: give the rendezvous host, the same on every node" \
        "(e.g. MASTER_ADDR=node0)" >&2
    exit 2
fi
CONFIG=$1 DATA=$2 RUN=$3; shift 3
CALLER=$PWD  # (the paths given are relative to it: from_caller, below)
cd "$(dirname "$0")/.."
source launch/torchrun_env.sh  # TORCHRUN, PYTHON, NPROC, CHECK_NPROC, MAX_RESTARTS, OMP_...
from_caller "$CALLER" "$@"  # CONFIG, DATA, RUN and a train.init_from: absolute
set -- ${ARGS[@]+"${ARGS[@]}"}
# NOTE: a fresh rendezvous store each round (hosted by rank 0's node) instead of one shared
# across restarts: restarted workers then cannot read the previous attempt's addresses, and the
# nodes need no restart counter in common (each agent keeps its own).
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
NNODES=${NNODES:-2} MASTER_PORT=${MASTER_PORT:-29400}
need_number MASTER_PORT 1 65535
if ! [[ $NNODES =~ ^[0-9]{1,9}(:[0-9]{1,9})?$ ]] ||
        (( 10#${NNODES%%:*} < 1 || 10#${NNODES%%:*} > 10#${NNODES#*:} )); then
    echo "error: NNODES=$NNODES: give the number of nodes, or MIN:MAX with 1 <= MIN <= MAX" >&2
    exit 2
fi
# NOTE: the checks each worker makes before its process group (the config, DATA, RUN, NPROC
# against the GPUs), made once here: torchrun would restart the group on such an error
# MAX_RESTARTS times, printing it again each time and ending in its ChildFailedError traceback
# with exit 1 instead of 2.
# (an elastic job's late node joins a group whose rank 0 holds RUN's lock: --elastic skips it;
# on more than one node rank 0 may start on another, which has the metrics.address this one
# may lack: --multi-node)
CHECK_NODES=()
[[ $NNODES == *:* ]] && CHECK_NODES=(--elastic)
(( 10#${NNODES#*:} > 1 )) && CHECK_NODES+=(--multi-node)
"$PYTHON" -m trainer.train --check ${CHECK_NPROC[@]+"${CHECK_NPROC[@]}"} \
    ${CHECK_NODES[@]+"${CHECK_NODES[@]}"} --config "$CONFIG" --data "$DATA" --run-dir "$RUN" "$@"
# NOTE: torchrun hung, silently and for ever, on a MASTER_PORT held by something that is not
# a rendezvous store: its agent, finding the port taken, joins it as a store client, whose
# handshake waits without a time limit. A store there (another agent of this job) passes.
"$PYTHON" -m launch.port_check "$MASTER_ADDR" "$MASTER_PORT"
exec "$TORCHRUN" --nnodes="$NNODES" --nproc_per_node="$NPROC" \
    --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" \
    --rdzv-id="${RDZV_ID:-footprints}" --max-restarts="$MAX_RESTARTS" \
    -m trainer.train --config "$CONFIG" --data "$DATA" --run-dir "$RUN" "$@"
