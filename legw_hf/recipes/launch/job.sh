# shellcheck shell=bash
# The training job every launch script here starts: BERT-large with LEGW + LAMB (nvidia preset), base settings from
# NVIDIA's recipe (`legw-hf plan --recipe bert-large-phase1`, `... phase2`). Sourced by deepspeed.sh, torchrun.sh,
# accelerate.sh and slurm.sbatch. EDIT the values below, or set any of them in the environment.

PYTHON=${PYTHON:-python}
# The run_mlm.py-style Trainer script shipped beside this file (LegwTrainer via its one import line), or your own.
SHIPPED_SCRIPT="$(dirname "${BASH_SOURCE[0]}")/run_mlm.py"
SCRIPT=${SCRIPT:-$SHIPPED_SCRIPT}
TRAIN_FILE=${TRAIN_FILE:-}                      # EDIT: your training text (one document per line)
if [[ ! -f "$SCRIPT" ]]; then  # name the setting instead of a Python error on every rank
    echo "job.sh: SCRIPT=$SCRIPT is not a file: set SCRIPT to your Trainer script (a run_mlm.py-style script" \
        "using LegwTrainer, as the run_mlm.py shipped beside job.sh)" >&2
    exit 2
fi
if [[ -n "$TRAIN_FILE" && ! -f "$TRAIN_FILE" || -z "$TRAIN_FILE" && "$SCRIPT" == "$SHIPPED_SCRIPT" ]]; then
    echo "job.sh: TRAIN_FILE=$TRAIN_FILE is not a file: set TRAIN_FILE to your training text (one document" \
        "per line), which the script reads with --train_file" >&2
    exit 2
fi
# One phase per job: 1: seq 128; 2: seq 512. The script starts from its own initialisation; for phase 2 from phase
# 1's weights and LAMB moments in one job, run the two-phase program instead (docs/tutorial/pretrain-bert.md:
# torchrun ... -m legw_hf.pretraining --recipe bert-large).
PHASE=${PHASE:-1}
OUTPUT_DIR=${OUTPUT_DIR:-runs/bert-large-phase$PHASE}
PRECISION=${PRECISION:-fp16}                    # fp16 (dynamic loss scale) or bf16, as the DeepSpeed config; fp32
RECIPES=${RECIPES:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
# The phase's length is NVIDIA's: 7038 updates at 65536 (phase 1) or 1563 at 32768 (phase 2) sequences; as epochs of
# your dataset that is 461,242,368 (phase 1) or 51,216,384 (phase 2) divided by its number of sequences.
TRAIN_EPOCHS=${TRAIN_EPOCHS:-1}
if [[ "$PHASE" == 1 ]]; then
    GLOBAL_BATCH=${GLOBAL_BATCH:-65536}         # 65536 or 32768; LEGW re-plans from the base below
    MICRO_BATCH=${MICRO_BATCH:-64}              # per GPU at seq 128 on an 80 GB GPU
    BASE=(--legw_base_batch_size 65536 --learning_rate 6e-3 --legw_base_warmup_steps 2000.9034 --max_seq_length 128)
else
    GLOBAL_BATCH=${GLOBAL_BATCH:-32768}
    MICRO_BATCH=${MICRO_BATCH:-16}              # per GPU at seq 512 on an 80 GB GPU
    BASE=(--legw_base_batch_size 32768 --learning_rate 4e-3 --legw_base_warmup_steps 200.064 --max_seq_length 512)
fi

JOB_ARGS=(
    --output_dir "$OUTPUT_DIR" ${TRAIN_FILE:+--train_file "$TRAIN_FILE"}
    "${BASE[@]}" --legw_decay poly_run --legw_power 0.5
    --legw_optimizer lamb --legw_optimizer_preset nvidia --weight_decay 0.01
    --legw_global_batch_size "$GLOBAL_BATCH" --num_train_epochs "$TRAIN_EPOCHS"
    --hidden_size 1024 --num_hidden_layers 24 --num_attention_heads 16 --intermediate_size 4096 --vocab_size 30522
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
