#!/usr/bin/env bash
# BERT-large phase 1 on several nodes with DeepSpeed's launcher.
#   bash deepspeed.sh [more Trainer flags]
# Run it on the first host of the hostfile: DeepSpeed starts every node's processes over passwordless ssh (pdsh).
# Without ssh between nodes, run it on every node with NO_SSH=1 NODE_RANK=<this node's line in the hostfile, from 0>.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
source "$HERE/job.sh"

# EDIT: the hostfile, and the address at which the other nodes reach the first one.
HOSTFILE=${HOSTFILE:-$HERE/hostfile}
MASTER_ADDR=${MASTER_ADDR:-$(awk '!/^[[:space:]]*(#|$)/ {print $1; exit}' "$HOSTFILE")}
MASTER_PORT=${MASTER_PORT:-29500}
DS_CONFIG=${DS_CONFIG:-$RECIPES/deepspeed/zero1-$PRECISION.json}   # zero2-*, zero3-* for the other stages

"$PYTHON" -m legw_hf.cli launch-check --hostfile "$HOSTFILE"
launcher=(--hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT")
if [[ -n "${NO_SSH:-}" ]]; then
    launcher+=(--no_ssh --node_rank "${NODE_RANK:?set NODE_RANK with NO_SSH}")
fi
read -r -a batch <<< "$(batch_flags --hostfile "$HOSTFILE")"
exec "$PYTHON" -m deepspeed.launcher.runner "${launcher[@]}" "$SCRIPT" \
    "${JOB_ARGS[@]}" "${batch[@]}" --deepspeed "$DS_CONFIG" "$@"
