"""Shipped DeepSpeed configs and `legw-hf ds-config`: parsed by DeepSpeed itself at a stated world size, the batch
arithmetic, the recipes' LEGW plans against a written-out formula, launch-file agreement, and bad input."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from launch import free_port, launch
from legw_oracle import legw_lr, update_epoch
from procs import REPO, python_env
from test_cli import run_cli

from legw_hf.integrations.deepspeed import SHIPPED_CONFIGS, deepspeed_config
from legw_hf.recipes import PHASES, recipe_file, recipe_files

SHIPPED = REPO / "legw_hf" / "recipes" / "deepspeed"


def parse_with_deepspeed(tmp_path: Path, entries: list[dict]) -> list[dict]:
    """What ``DeepSpeedConfig`` makes of each config, in a child process (it needs a process group)."""
    entries_file, output = tmp_path / "entries.json", tmp_path / "parsed.json"
    entries_file.write_text(json.dumps(entries))
    env = {"VALIDATE_OUTPUT_DIR": str(tmp_path / "trainer-out"), "MASTER_PORT": str(free_port())}
    launch("python", REPO / "tests" / "scripts" / "validate_ds_configs.py", entries_file, output, env=env, timeout=600)
    return json.loads(output.read_text())


def test_shipped_configs_are_the_generators_auto_form_and_leave_schedule_and_optimizer_to_legw():
    assert sorted(p.name for p in SHIPPED.glob("*.json")) == sorted(SHIPPED_CONFIGS)
    for name, (zero, precision) in SHIPPED_CONFIGS.items():
        config = json.loads((SHIPPED / name).read_text())
        assert config == deepspeed_config(zero=zero, precision=precision), name
        assert "optimizer" not in config and "scheduler" not in config
        assert config["train_micro_batch_size_per_gpu"] == config["gradient_accumulation_steps"] == "auto"
        assert config["zero_optimization"]["stage"] == zero and config[precision]["enabled"] is True
        if precision == "fp16":
            assert config["fp16"]["loss_scale"] == 0  # dynamic loss scaling
        # ZeRO-3: Trainer's save_model gathers a model file (zero_to_fp32.py cannot write BERT's tied embeddings)
        assert config["zero_optimization"].get("stage3_gather_16bit_weights_on_model_save") is (zero == 3 or None)


# (phase, global batch, nodes, GPUs per node, micro-batch): the recipe's shapes on 80 GB GPUs
RECIPE_SHAPES = [
    ("bert-large-phase1", 65536, 64, 8, 64),
    ("bert-large-phase1", 32768, 32, 8, 64),
    ("bert-large-phase1", 32768, 16, 8, 64),
    ("bert-large-phase2", 32768, 64, 8, 16),
]

GENERATED = [
    # global batch, nodes, GPUs, micro, extra flags
    (65536, 64, 8, 64, []),
    (32768, 32, 8, 64, ["--zero", "2", "--precision", "bf16"]),
    (32768, 64, 8, 16, ["--zero", "3", "--recipe", "bert-large-phase2"]),
    (65536, 16, 8, 32, ["--zero", "2", "--offload-optimizer", "cpu"]),
    (4096, 2, 1, 8, ["--zero", "3", "--precision", "bf16", "--offload-optimizer", "cpu"]),
]


@pytest.fixture(scope="module")
def parsed_by_deepspeed(tmp_path_factory) -> dict[str, list[tuple]]:
    """The configs of the three tests below, all parsed in one child process (``parse_with_deepspeed``: starting it
    costs more than the parsing): the shipped configs at each of the recipe's shapes, filled as Trainer fills them;
    the ``GENERATED`` configs, written by ``legw-hf ds-config`` (its result kept for the test to read); and a config
    for 2 × 2 GPUs parsed at a world size of 8. Per group, (what the test knows of each config, what DeepSpeed made
    of it)."""
    folder = tmp_path_factory.mktemp("deepspeed")
    groups: dict[str, list[tuple[dict, object]]] = {"shipped": [], "generated": [], "does not add up": []}
    for name, (zero, precision) in sorted(SHIPPED_CONFIGS.items()):
        for _, batch, nodes, gpus, micro in RECIPE_SHAPES:
            accumulation = batch // (nodes * gpus * micro)
            trainer = {
                "per_device_train_batch_size": micro,
                "gradient_accumulation_steps": accumulation,
                precision: True,
            }
            entry = {"path": str(SHIPPED / name), "world_size": nodes * gpus, "trainer": trainer}
            groups["shipped"].append((entry, (batch, micro, accumulation, zero, precision)))
    for index, (batch, nodes, gpus, micro, extra) in enumerate(GENERATED):
        output = folder / f"ds{index}.json"
        flags = ["--global-batch", str(batch), "--nodes", str(nodes), "--gpus-per-node", str(gpus)]
        result = run_cli("ds-config", *flags, "--micro-batch", str(micro), *extra, "--output", str(output))
        groups["generated"].append(({"path": str(output), "world_size": nodes * gpus, "trainer": None}, result))
    config = folder / "does-not-add-up.json"
    flags = "ds-config --global-batch 64 --nodes 2 --gpus-per-node 2 --micro-batch 8".split()
    result = run_cli(*flags, "--output", str(config))
    groups["does not add up"].append(({"path": str(config), "world_size": 8, "trainer": None}, result))
    parsed = iter(parse_with_deepspeed(folder, [entry for group in groups.values() for entry, _ in group]))
    return {name: [(known, next(parsed)) for _, known in group] for name, group in groups.items()}


def test_every_shipped_config_parses_in_deepspeed_once_trainer_fills_it(parsed_by_deepspeed):
    for (batch, micro, accumulation, zero, precision), got in parsed_by_deepspeed["shipped"]:
        assert "error" not in got, got
        assert (got["train_batch_size"], got["micro_batch"], got["accumulation"]) == (batch, micro, accumulation)
        assert got["zero_stage"] == zero and got[precision] is True
        # LAMB (nvidia preset) pre-normalises: Trainer's "auto" clipping became 0, so gradients are clipped once
        assert got["gradient_clipping"] == 0.0
        assert got["optimizer_block"] is None and got["scheduler_block"] is None
        assert got["dynamic_loss_scale"] is (precision == "fp16")


def test_generated_configs_parse_in_deepspeed_with_the_derived_accumulation(parsed_by_deepspeed):
    for (batch, nodes, gpus, micro, extra), (result, got) in zip(
        GENERATED, parsed_by_deepspeed["generated"], strict=True
    ):
        assert result.returncode == 0, result.stderr
        accumulation = batch // (nodes * gpus * micro)
        assert f"gradient accumulation {accumulation}" in result.stdout
        assert f"--per_device_train_batch_size {micro} --gradient_accumulation_steps {accumulation}" in result.stdout
        assert f"LEGW plan (legw): batch {batch}" in result.stdout
        assert "error" not in got, got
        assert (got["train_batch_size"], got["micro_batch"], got["accumulation"]) == (batch, micro, accumulation)
        assert got["zero_stage"] == (int(extra[extra.index("--zero") + 1]) if "--zero" in extra else 1)
        assert got["bf16"] is ("bf16" in extra) and got["fp16"] is ("bf16" not in extra)
        assert got["gradient_clipping"] == 0.0
        offloaded = "cpu" in extra
        assert got["offload_device"] == ("cpu" if offloaded else None)
        # offloaded, the client LAMB is kept: DeepSpeed would refuse it and accelerate would swap in DeepSpeedCPUAdam
        assert got["force_ds_cpu_optimizer"] is (not offloaded)


def test_a_config_that_does_not_add_up_fails_in_deepspeeds_parser_too(parsed_by_deepspeed):
    # the cross-check of the test above: DeepSpeed's parser really does check the world size it was given
    ((result, got),) = parsed_by_deepspeed["does not add up"]
    assert result.returncode == 0, result.stderr
    assert "64 != 8 * 2 * 8" in got["error"]


def test_recipe_plans_follow_legw_from_nvidias_settings():
    result = run_cli("plan", "--recipe", "bert-large-phase1", "--json")
    assert result.returncode == 0, result.stderr
    at_64k, at_32k = json.loads(result.stdout)
    assert (at_64k["batch"], at_64k["peak_lr"], at_64k["total_steps"]) == (65536, 6e-3, 7038)
    assert at_64k["warmup_steps"] == math.ceil(0.2843 * 7038) == 2001
    # 32K: √(1/2) of the LR, twice the steps, the same warmup steps (half the warmup epochs ... times 2 steps/epoch)
    assert at_32k["batch"] == 32768 and at_32k["peak_lr"] == pytest.approx(6e-3 / math.sqrt(2), rel=1e-12)
    assert (at_32k["total_steps"], at_32k["warmup_steps"]) == (14076, 2001)
    assert at_32k["warmup_epochs"] == pytest.approx(0.2843 / 2)
    (phase2,) = json.loads(run_cli("plan", "--recipe", "bert-large-phase2", "--json").stdout)
    assert (phase2["batch"], phase2["peak_lr"], phase2["total_steps"], phase2["warmup_steps"]) == (
        32768,
        4e-3,
        1563,
        201,
    )

    # NVIDIA's run at 64K (7038 updates, warmup 0.2843 of them) is the base, counted as one epoch: at 32K, k = 1/2
    plan = PHASES["bert-large-phase1"].plan(32768)
    nvidia = dict(base_lr=6e-3, k=0.5, base_warmup_epochs=0.2843, epochs=1, decay="poly_run", power=0.5)
    for update in (0, 1, 999, 2000, 2001, 7000, 14075):
        expected = legw_lr(update_epoch(update, 14076), **nvidia)
        assert plan.lr_for_update(update) == pytest.approx(expected, rel=1e-9), update


def test_recipe_settings_can_be_overridden_and_a_dataset_size_counts_real_epochs():
    result = run_cli(
        "plan", "--recipe", "bert-large-phase1", "--dataset-size", "157000000", "--batch", "65536", "--json"
    )
    assert result.returncode == 0, result.stderr
    (row,) = json.loads(result.stdout)
    # the recipe's 461M sequences, now as 2.94 epochs of a 157M-sequence dataset (each epoch ends in a partial batch)
    epochs = 65536 * 7038 / 157000000
    assert row["epochs"] == pytest.approx(epochs, rel=1e-12)
    assert row["total_steps"] == math.ceil(epochs * math.ceil(157000000 / 65536)) == 7040
    result = run_cli("plan", "--recipe", "bert-large-phase1", "--base-lr", "0.011", "--batch", "65536", "--json")
    assert json.loads(result.stdout)[0]["peak_lr"] == 0.011


@pytest.mark.parametrize(
    ("batch", "nodes", "gpus", "micro", "words"),
    [
        (65000, 64, 8, 64, ["--global-batch must be a multiple of", "= 32768", "no micro-batch gives 65000"]),
        (32768, 3, 8, 64, ["3 x 8 x 64 = 1536", "nearest global batches for micro-batch 64: 32256 or 33792"]),
        (32768, 16, 8, 48, ["16 x 8 x 48 = 6144", "30720 or 36864", "micro-batches that give 32768: 32 or 64"]),
        (1000, 2, 4, 3, ["2 x 4 x 3 = 24", "984 or 1008", "micro-batches that give 1000: 1 or 5"]),
    ],
)
def test_unreachable_global_batch_names_the_nearest_valid_ones(tmp_path, batch, nodes, gpus, micro, words):
    output = tmp_path / "ds.json"
    result = run_cli(
        *f"ds-config --global-batch {batch} --nodes {nodes} --gpus-per-node {gpus} --micro-batch {micro}".split(),
        "--output",
        str(output),
    )
    assert result.returncode == 2 and not output.exists()
    line = result.stderr.strip()
    assert line.startswith("legw-hf ds-config: error: ") and "\n" not in line
    for word in words:
        assert word in line
    # every suggestion really works: a multiple of the GPUs x micro-batch, or a micro-batch dividing the batch
    suggested = line.split("nearest global batches for micro-batch ")[1].split(":")[1].split(";")[0]
    for value in suggested.replace(")", "").split(" or "):
        assert int(value) % (nodes * gpus * micro) == 0
    if "micro-batches that give" in line:
        for value in line.split("give ")[1].split(": ")[1].split(")")[0].split(" or "):
            assert batch % (nodes * gpus * int(value)) == 0


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        ("--zero 0 --offload-optimizer cpu", "--offload-optimizer needs ZeRO stage 1, 2 or 3"),
        ("--zero 4", "--zero must be one of 0, 1, 2, 3, got 4"),
        ("--precision fp8", "--precision must be one of 'fp16', 'bf16', got 'fp8'"),
        ("--offload-optimizer nvme", "--offload-optimizer must be one of 'none', 'cpu', got 'nvme'"),
        ("--recipe bert-base", "invalid choice: 'bert-base'"),
    ],
)
def test_bad_ds_config_settings_are_one_line_errors(tmp_path, flags, words):
    output = tmp_path / "ds.json"
    base = "ds-config --global-batch 64 --nodes 2 --gpus-per-node 2 --micro-batch 8".split()
    result = run_cli(*base, *flags.split(), "--output", str(output))
    assert result.returncode == 2 and words in result.stderr and not output.exists()


def test_an_existing_output_file_is_never_overwritten(tmp_path):
    output = tmp_path / "ds.json"
    output.write_text("mine")
    result = run_cli(
        *"ds-config --global-batch 64 --nodes 2 --gpus-per-node 2 --micro-batch 8 --output".split(), str(output)
    )
    assert result.returncode == 2 and "--output must not exist already" in result.stderr
    assert output.read_text() == "mine"


def test_stdout_form_prints_the_config_and_the_summary_separately():
    result = run_cli(*"ds-config --global-batch 64 --nodes 2 --gpus-per-node 2 --micro-batch 8".split())
    assert result.returncode == 0
    assert json.loads(result.stdout)["gradient_accumulation_steps"] == 2
    assert "global batch 64 = 2 nodes x 2 GPUs x micro-batch 8 x gradient accumulation 2" in result.stderr


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_hostfile_and_accelerate_config_give_the_world_and_must_agree(tmp_path):
    hostfile = write(tmp_path / "hostfile", "# two nodes\nnode-a slots=8\nnode-b slots=8  # second\n\n")
    node = write(
        tmp_path / "node.yaml",
        "distributed_type: MULTI_GPU\nnum_machines: 2\nnum_processes: 16\nmachine_rank: 0\n"
        "main_process_ip: node-a\nmain_process_port: 29500\n",
    )
    result = run_cli(
        "launch-check", "--hostfile", hostfile, "--accelerate-config", node, "--nodes", "2", "--gpus-per-node", "8"
    )
    assert result.returncode == 0 and "2 nodes, 16 processes" in result.stdout
    # ds-config reads the cluster from them
    result = run_cli(*"ds-config --global-batch 512 --micro-batch 16 --hostfile".split(), hostfile)
    assert result.returncode == 0 and json.loads(result.stdout)["gradient_accumulation_steps"] == 2

    three = write(tmp_path / "three", "a slots=8\nb slots=8\nc slots=8\n")
    result = run_cli("launch-check", "--hostfile", three, "--accelerate-config", node)
    assert result.returncode == 2
    assert "--nodes must agree between the launch files: 3 nodes x 8 processes (hostfile" in result.stderr
    assert "but 2 nodes x 8 processes (accelerate config" in result.stderr
    result = run_cli(
        "ds-config",
        "--global-batch",
        "512",
        "--micro-batch",
        "16",
        "--hostfile",
        hostfile,
        "--nodes",
        "2",
        "--gpus-per-node",
        "4",
    )
    assert result.returncode == 2 and "--gpus-per-node must agree" in result.stderr


@pytest.mark.parametrize(
    ("hostfile", "yaml", "words"),
    [
        ("a slots=8\nb slots=4\n", None, "--gpus-per-node must be the same on every node"),
        ("a slots=8\na slots=8\n", None, "--hostfile lists host 'a' twice"),
        ("a gpus=8\n", None, "--hostfile line 1 must read 'hostname slots=N'"),
        ("a slots=0\n", None, "--hostfile line 1 must read 'hostname slots=N' with N >= 1"),
        (None, "num_machines: 2\nnum_processes: 3\nmain_process_ip: a\n", "num_processes in "),
        (None, "num_machines: 2\nnum_processes: 4\nmachine_rank: 2\nmain_process_ip: a\n", "machine_rank in"),
        (None, "num_machines: 2\nnum_processes: 4\n", "main_process_ip in"),
    ],
)
def test_launch_files_that_contradict_themselves_are_refused(tmp_path, hostfile, yaml, words):
    flags = []
    if hostfile is not None:
        flags += ["--hostfile", write(tmp_path / "hostfile", hostfile)]
    if yaml is not None:
        flags += ["--accelerate-config", write(tmp_path / "node.yaml", yaml)]
    output = tmp_path / "ds.json"
    result = run_cli("ds-config", "--global-batch", "64", "--micro-batch", "4", *flags, "--output", str(output))
    assert result.returncode == 2 and words in result.stderr and not output.exists(), result.stderr


def test_recipes_are_installed_listed_and_copied_without_touching_existing_files(tmp_path):
    listed = run_cli("recipes").stdout.split()
    assert listed == [str(p) for p in recipe_files()]
    assert {"zero1-fp16.json", "hostfile"} <= {Path(p).name for p in listed}
    (tmp_path / "launch").mkdir()
    (tmp_path / "launch" / "hostfile").write_text("my cluster\n")
    result = run_cli("recipes", "--copy", str(tmp_path))
    assert result.returncode == 0
    assert (tmp_path / "launch" / "hostfile").read_text() == "my cluster\n"
    assert f"kept   {tmp_path / 'launch' / 'hostfile'} (exists)" in result.stdout
    assert (tmp_path / "deepspeed" / "zero1-fp16.json").read_text() == recipe_file("zero1-fp16.json").read_text()


def test_a_missing_deepspeed_is_named_with_its_install_command(tmp_path):
    # DeepSpeed made unimportable in a child process, as on a machine without the extra
    code = (
        "import sys; sys.modules['deepspeed'] = None\n"
        "from legw_hf import LegwTrainingArguments, SettingError\n"
        "try:\n"
        f"    LegwTrainingArguments(output_dir={str(tmp_path / 'out')!r}, use_cpu=True,\n"
        f"                          deepspeed={str(SHIPPED / 'zero1-bf16.json')!r})\n"
        "except SettingError as error:\n"
        "    print(error)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=python_env(), timeout=300)
    assert "deepspeed needs DeepSpeed, which is not installed: pip install 'legw_hf[deepspeed]'" in result.stdout, (
        result.stdout + result.stderr
    )
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("phase", "name"), [("1", "bert-large-phase1"), ("2", "bert-large-phase2")])
def test_the_launch_job_uses_the_recipes_base_settings(phase, name):
    launch_dir = REPO / "legw_hf" / "recipes" / "launch"
    script = f'source {launch_dir / "job.sh"}; printf "%s\\n" "$SCRIPT" "${{JOB_ARGS[@]}}"'
    train_file = REPO.parent / "shared" / "data" / "wikitext-2" / "valid.txt"
    env = {key: value for key, value in os.environ.items() if key != "SCRIPT"} | {
        "PHASE": phase,
        "TRAIN_FILE": str(train_file),
    }
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env, check=True, timeout=60)
    script_path, *words = result.stdout.split("\n")
    assert Path(script_path) == launch_dir / "run_mlm.py"  # the Trainer script shipped beside job.sh
    flag = {words[i]: words[i + 1] for i in range(len(words) - 1) if words[i].startswith("--")}
    assert flag["--train_file"] == str(train_file)
    recipe = PHASES[name]
    assert int(flag["--legw_base_batch_size"]) == recipe.base_batch_size
    assert float(flag["--learning_rate"]) == recipe.base_lr
    assert float(flag["--legw_base_warmup_steps"]) == pytest.approx(recipe.base_warmup_steps, rel=1e-12)
    assert float(flag["--legw_power"]) == recipe.power and int(flag["--max_seq_length"]) == recipe.seq_len
    assert int(flag["--legw_global_batch_size"]) == recipe.global_batches[0]
    assert flag["--legw_optimizer_preset"] == "nvidia" and "--fp16" in words


def test_a_copied_launch_recipe_names_a_missing_training_file_or_script(tmp_path):
    # From a copy of the recipes, as an installed package gives them: the shipped run_mlm.py is the default script,
    # and without TRAIN_FILE (or with a SCRIPT that is not there) the launch stops with one line, exit 2.
    copied = tmp_path / "recipes"
    assert run_cli("recipes", "--copy", str(copied)).returncode == 0
    assert (copied / "launch" / "run_mlm.py").read_text() == (REPO / "examples" / "run_mlm.py").read_text()
    base = {key: value for key, value in os.environ.items() if key not in ("SCRIPT", "TRAIN_FILE")}
    cases = [
        ({}, "job.sh: TRAIN_FILE= is not a file: set TRAIN_FILE to your training text"),
        ({"TRAIN_FILE": str(tmp_path / "missing.txt")}, f"job.sh: TRAIN_FILE={tmp_path / 'missing.txt'} is not a file"),
        ({"SCRIPT": "train.py"}, "job.sh: SCRIPT=train.py is not a file: set SCRIPT to your Trainer script"),
    ]
    for settings, message in cases:
        result = subprocess.run(
            ["bash", str(copied / "launch" / "torchrun.sh")], capture_output=True, text=True, env=base | settings,
            cwd=tmp_path, timeout=60,
        )  # fmt: skip
        assert result.returncode == 2 and result.stdout == "", (settings, result.stderr)
        assert result.stderr.startswith(message), (settings, result.stderr)


@pytest.mark.parametrize("name", ["accelerate-multinode.yaml", "accelerate-deepspeed.yaml", "accelerate-fsdp2.yaml"])
def test_shipped_accelerate_configs_parse_in_accelerate_and_agree_with_themselves(tmp_path, name):
    from accelerate.commands.config.config_args import load_config_from_file

    copied = tmp_path / "recipes"
    assert run_cli("recipes", "--copy", str(copied)).returncode == 0
    config = load_config_from_file(str(copied / "launch" / name))
    assert (config.num_machines, config.num_processes, config.machine_rank) == (64, 512, 0)
    assert config.main_process_ip and config.main_process_port
    if name == "accelerate-fsdp2.yaml":
        assert config.fsdp_config["fsdp_version"] == 2
    # launch-check reads the same numbers; the DeepSpeed config file is found from where one launches (the copy),
    # and the copied hostfile describes the same cluster as shipped.
    for flags in ([], ["--hostfile", "launch/hostfile"]):
        result = subprocess.run(
            [sys.executable, "-m", "legw_hf.cli", "launch-check", *flags, "--accelerate-config", f"launch/{name}"],
            capture_output=True,
            text=True,
            cwd=copied,
            env=python_env(),
            timeout=120,
        )
        assert result.returncode == 0 and "64 nodes, 512 processes" in result.stdout, (flags, result.stderr)
    if name == "accelerate-deepspeed.yaml":
        elsewhere = run_cli("launch-check", "--accelerate-config", str(copied / "launch" / name))
        assert elsewhere.returncode == 2
        assert "deepspeed_config_file in " in elsewhere.stderr
        assert "must name an existing DeepSpeed config" in elsewhere.stderr
