"""The shipped launch recipes run as a simulated 2-node job: two launchers on 127.0.0.1, node ranks 0 and 1, one
CPU process each (gloo), training the LEGW + LAMB ``run_mlm.py`` job for a few updates.

Each recipe is used as a cluster user would: copied with ``legw-hf recipes --copy``, the lines marked EDIT changed
(nodes, GPUs per node, the rank-0 address), then started on every "node". Both ranks must apply the same LR at every
update, equal to LEGW written out for a global batch that counts both nodes, and end with identical parameters.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from launch import free_port
from legw_oracle import legw_lr, update_epoch
from procs import REPO, python_env

pytestmark = pytest.mark.multiprocess

# run_mlm.py at toy size: 96 blocks of 32 tokens, global batch 16 = 4 per device x accumulation 2 x 2 nodes
GLOBAL_BATCH, MICRO_BATCH, BLOCKS = 16, 4, 96
BASE_BATCH, BASE_LR, BASE_WARMUP_STEPS = 8, 2e-3, 2
JOB_FLAGS = [
    *("--legw_base_batch_size", str(BASE_BATCH), "--learning_rate", str(BASE_LR)),
    *("--legw_base_warmup_steps", str(BASE_WARMUP_STEPS)),
    *("--max_seq_length", "32", "--hidden_size", "32", "--num_hidden_layers", "1", "--num_attention_heads", "2"),
    *("--intermediate_size", "64", "--vocab_size", "800", "--max_train_samples", str(BLOCKS)),
    *("--save_strategy", "no", "--logging_steps", "1", "--disable_tqdm", "true", "--use_cpu"),
]


def expected_lrs() -> list[float]:
    """LEGW for the job's flags (tests/legw_oracle.py): k = 16/8, the base's 2 warmup steps as epochs, then job.sh's
    NVIDIA-style polynomial of the run's progress, power 0.5, over one epoch of 96/16 = 6 updates."""
    spe = BLOCKS // GLOBAL_BATCH
    base_warmup_epochs = BASE_WARMUP_STEPS / math.ceil(BLOCKS / BASE_BATCH)
    schedule = dict(base_warmup_epochs=base_warmup_epochs, epochs=1, decay="poly_run", power=0.5)
    k = GLOBAL_BATCH / BASE_BATCH
    return [legw_lr(update_epoch(u, spe), base_lr=BASE_LR, k=k, **schedule) for u in range(spe)]


@pytest.fixture(scope="module")
def recipes(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("recipes")
    subprocess.run(
        [sys.executable, "-m", "legw_hf.cli", "recipes", "--copy", str(folder)], check=True, env=python_env()
    )
    return folder


def edit_yaml(path: Path, **changes) -> None:
    config = yaml.safe_load(path.read_text())
    config.update(changes)
    path.write_text(yaml.safe_dump(config))


def job_env(output: Path, **settings: str) -> dict[str, str]:
    """job.sh's settings for the toy job (the probed run_mlm.py), the rank-0 address, and ``settings``."""
    env = python_env() | {
        "PYTHON": sys.executable,
        "SCRIPT": str(REPO / "tests" / "scripts" / "run_mlm_probe.py"),
        "GLOBAL_BATCH": str(GLOBAL_BATCH),
        "MICRO_BATCH": str(MICRO_BATCH),
        "PRECISION": "fp32",
        "OUTPUT_DIR": str(output),
        "MASTER_ADDR": "127.0.0.1",
        **settings,
    }
    env.pop("CI", None)  # transformers prints Trainer's lines twice with it; a user's shell has no CI
    return env


def run_two_nodes(script: Path, output: Path, env: dict, extra: list[str] = ()) -> list[dict]:
    """Start ``script`` once per node (NODE_RANK 0 and 1) at the same time; the per-rank records."""
    env = job_env(output, **env)
    nodes = [
        subprocess.Popen(
            ["bash", str(script), *JOB_FLAGS, *extra],
            cwd=REPO,
            env=env | {"NODE_RANK": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    logs = []
    try:
        logs = [node.communicate(timeout=600)[0] for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    for node, log in zip(nodes, logs, strict=True):
        assert node.returncode == 0, log[-4000:]
    return [json.loads((output / f"rank{rank}.json").read_text()) for rank in (0, 1)], logs


def check_one_job_over_two_nodes(records: list[dict], output: Path) -> None:
    assert sorted(r["process_index"] for r in records) == [0, 1]
    assert all(r["world_size"] == 2 for r in records)
    first, second = records
    # 4 per device x accumulation 2 x 2 nodes: the plan's global batch counts both nodes
    assert first["plan"]["batch"] == second["plan"]["batch"] == GLOBAL_BATCH
    assert first["plan"]["k"] == GLOBAL_BATCH / BASE_BATCH and first["global_step"] == BLOCKS // GLOBAL_BATCH
    assert first["lrs"] == second["lrs"]
    assert first["lrs"] == pytest.approx(expected_lrs(), rel=1e-9)
    assert first["parameters_sha256"] == second["parameters_sha256"]
    (entry,) = json.loads((output / "legw_plan.json").read_text())
    assert entry["batch"] == GLOBAL_BATCH


def test_accelerate_recipe_as_two_nodes(recipes, tmp_path):
    config = recipes / "launch" / "accelerate-multinode.yaml"
    edited = tmp_path / "node.yaml"
    edited.write_text(config.read_text())
    edit_yaml(edited, num_machines=2, num_processes=2, main_process_ip="127.0.0.1", main_process_port=free_port())
    env = {"ACCELERATE_CONFIG": str(edited)}
    records, logs = run_two_nodes(recipes / "launch" / "accelerate.sh", tmp_path / "out", env)
    assert "2 nodes, 2 processes: the sources agree" in logs[0]
    check_one_job_over_two_nodes(records, tmp_path / "out")


def test_deepspeed_recipe_as_two_nodes_with_a_shipped_config(recipes, tmp_path):
    # DeepSpeed's launcher without ssh: each node starts its own processes (--no_ssh --node_rank), as on clusters
    # without ssh between nodes; with ssh it is the same launcher started once. The shipped ZeRO-1 bf16 config trains.
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    env = {
        "HOSTFILE": str(hostfile),
        "NO_SSH": "1",
        "MASTER_PORT": str(free_port()),
        "PRECISION": "bf16",
        "DS_ACCELERATOR": "cpu",
    }
    records, logs = run_two_nodes(recipes / "launch" / "deepspeed.sh", tmp_path / "out", env)
    assert f"--deepspeed {recipes / 'deepspeed' / 'zero1-bf16.json'}" in logs[0]
    check_one_job_over_two_nodes(records, tmp_path / "out")


def test_slurm_recipe_starts_the_torchrun_recipe_as_two_nodes(recipes, tmp_path):
    """No SLURM here: a stand-in ``srun`` starts its command once per node with SLURM_NODEID set, as srun does; the
    batch script derives everything else from SLURM's variables and starts torchrun.sh on each node. This is also
    the torchrun recipe's 2-node test: torchrun.sh runs as a user starting it on each node would, with the node
    count, GPUs per node and rank-0 address the batch script exported, which the records check."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    srun = bin_dir / "srun"
    srun.write_text(
        "#!/usr/bin/env bash\n"
        "# stand-in for srun --ntasks-per-node=1: one task per node, SLURM_NODEID set in each\n"
        'while [[ "$1" == --* ]]; do shift; done\n'
        "pids=()\n"
        'for ((node = 0; node < SLURM_JOB_NUM_NODES; node++)); do SLURM_NODEID=$node "$@" & pids+=($!); done\n'
        'status=0; for pid in "${pids[@]}"; do wait "$pid" || status=1; done; exit $status\n'
    )
    srun.chmod(0o755)
    output = tmp_path / "out"
    env = job_env(
        output,
        PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        SLURM_JOB_NUM_NODES="2",
        SLURM_GPUS_ON_NODE="1",
        SLURM_JOB_ID="4242",
        SLURM_JOB_NODELIST="node[0-1]",
        SLURM_SUBMIT_DIR=str(recipes.parent),
        RECIPES=str(recipes),
        MASTER_PORT=str(free_port()),
    )
    result = subprocess.run(
        ["bash", str(recipes / "launch" / "slurm.sbatch"), *JOB_FLAGS],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    records = [json.loads((output / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    check_one_job_over_two_nodes(records, output)
