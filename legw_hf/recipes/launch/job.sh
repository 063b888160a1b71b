# shellcheck shell=bash
# The training job every launch script here starts: BERT-large phase 1 with LEGW + LAMB (nvidia preset), base
# settings from NVIDIA's recipe (see `legw-hf plan --recipe bert-large-phase1`). Sourced by deepspeed.sh,
# torchrun.sh, accelerate.sh and slurm.sbatch. EDIT the values below, or set any of them in the environment.

PYTHON=${PYTHON:-python}
SCRIPT=${SCRIPT:-examples/run_mlm.py}           # a Trainer script using LegwTrainer / LegwTrainingArguments
OUTPUT_DIR=${OUTPUT_DIR:-runs/bert-large-phase1}
GLOBAL_BATCH=${GLOBAL_BATCH:-65536}             # 65536 or 32768 for phase 1; LEGW re-plans from the base below
MICRO_BATCH=${MICRO_BATCH:-64}                  # per GPU: 64 at seq 128 on an 80 GB GPU (phase 2, seq 512: 16)
PRECISION=${PRECISION:-fp16}                    # fp16 (dynamic loss scale) or bf16, as the DeepSpeed config; fp32
# The recipe's length is 7038 updates at 65536 = 461,242,368 sequences: epochs = that / your dataset's sequences.
TRAIN_EPOCHS=${TRAIN_EPOCHS:-1}
RECIPES=${RECIPES:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}

JOB_ARGS=(
    --output_dir "$OUTPUT_DIR"
    --legw_base_batch_size 65536 --learning_rate 6e-3 --legw_base_warmup_steps 2000.9034
    --legw_decay poly --legw_power 0.5
    --legw_optimizer lamb --legw_optimizer_preset nvidia --weight_decay 0.01
    --legw_global_batch_size "$GLOBAL_BATCH" --num_train_epochs "$TRAIN_EPOCHS"
    --max_seq_length 128 --hidden_size 1024 --num_hidden_layers 24 --num_attention_heads 16
    --intermediate_size 4096 --vocab_size 30522
    --save_strategy steps --save_steps 200 --logging_steps 10 --report_to none
)
if [[ "$PRECISION" != fp32 ]]; then
    JOB_ARGS+=("--$PRECISION")
fi

# The per-device batch and accumulation that form GLOBAL_BATCH on this cluster (an error names the valid ones).
# Arguments: how the cluster is described, e.g. --nodes 64 --gpus-per-node 8, or --hostfile FILE.
batch_flags() {
    "$PYTHON" -m legw_hf.cli batch-flags --global-batch "$GLOBAL_BATCH" --micro-batch "$MICRO_BATCH" "$@"
}
