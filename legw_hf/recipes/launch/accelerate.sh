#!/usr/bin/env bash
# BERT-large phase 1 on several nodes with accelerate launch: run it on every node, with its own NODE_RANK.
#   NODE_RANK=<0..num_machines-1> bash accelerate.sh [more Trainer flags]
# ACCELERATE_CONFIG picks the YAML: accelerate-multinode.yaml (DDP, the default), accelerate-deepspeed.yaml or
# accelerate-fsdp2.yaml. The nodes, processes and rank-0 address come from it.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
source "$HERE/job.sh"

ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-$HERE/accelerate-multinode.yaml}
NODE_RANK=${NODE_RANK:?set NODE_RANK to the index of this node, 0 to num_machines-1}

"$PYTHON" -m legw_hf.cli launch-check --accelerate-config "$ACCELERATE_CONFIG"
read -r -a batch <<< "$(batch_flags --accelerate-config "$ACCELERATE_CONFIG")"
# Under DeepSpeed, Trainer gets the YAML's DeepSpeed config too: it fills the "auto" fields and legw_hf checks it.
ds_config=$("$PYTHON" -c 'import sys, yaml
print((yaml.safe_load(open(sys.argv[1])).get("deepspeed_config") or {}).get("deepspeed_config_file", ""))' \
    "$ACCELERATE_CONFIG")
extra=()
if [[ -n "$ds_config" ]]; then
    extra=(--deepspeed "$ds_config")
fi
exec "$PYTHON" -m accelerate.commands.launch --config_file "$ACCELERATE_CONFIG" --machine_rank "$NODE_RANK" \
    "$SCRIPT" "${JOB_ARGS[@]}" "${batch[@]}" "${extra[@]}" "$@"
