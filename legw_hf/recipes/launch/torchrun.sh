#!/usr/bin/env bash
# BERT-large phase 1 on several nodes with torchrun: run it on every node, the same command with its own NODE_RANK.
#   NNODES=64 GPUS_PER_NODE=8 NODE_RANK=<0..NNODES-1> MASTER_ADDR=<first node> bash torchrun.sh [more Trainer flags]
# Set DS_CONFIG to a DeepSpeed config to train under DeepSpeed (Trainer starts it); unset, it is plain DDP.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
source "$HERE/job.sh"

# EDIT: the cluster, and the address and port at which every node reaches the rendezvous on the first one.
NNODES=${NNODES:-64}  # as the hostfile, the accelerate configs and slurm.sbatch
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
NODE_RANK=${NODE_RANK:?set NODE_RANK to the index of this node, 0 to NNODES-1}
MASTER_ADDR=${MASTER_ADDR:?set MASTER_ADDR to the address of the first node}
MASTER_PORT=${MASTER_PORT:-29500}
JOB_ID=${JOB_ID:-legw-bert}
RDZV_BACKEND=${RDZV_BACKEND:-c10d}  # c10d: ranks by arrival; static: ranks follow NODE_RANK

read -r -a batch <<< "$(batch_flags --nodes "$NNODES" --gpus-per-node "$GPUS_PER_NODE")"
extra=()
if [[ -n "${DS_CONFIG:-}" ]]; then
    extra=(--deepspeed "$DS_CONFIG")
fi
exec "$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$GPUS_PER_NODE" \
    --rdzv_backend "$RDZV_BACKEND" --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv_id "$JOB_ID" \
    "$SCRIPT" "${JOB_ARGS[@]}" "${batch[@]}" "${extra[@]}" "$@"
