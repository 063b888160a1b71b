"""The run_mlm.py-style example: LEGW is a one-line change, and both versions really train.

The example sets logging up as transformers' upstream scripts do (``basicConfig()`` with no level, the
``transformers`` logger following ``--log_level``), so these runs show what a user of those scripts sees.
"""

from __future__ import annotations

import ast
import json
import math
import subprocess
import sys

import pytest
from launch import launch
from procs import REPO, python_env

from legw_hf import plan_from_dict

LEGW_LINE_MARK = "# LEGW"
TINY_RUN = [
    *["--train_file", str(REPO.parent / "shared" / "data" / "wikitext-2" / "valid.txt")],
    *"--max_train_samples 64 --max_seq_length 32 --vocab_size 600 --num_train_epochs 1".split(),
    *"--per_device_train_batch_size 8 --gradient_accumulation_steps 2 --learning_rate 1e-3".split(),
    *"--save_strategy no --report_to none --disable_tqdm true --logging_steps 1".split(),
]
LEGW_FLAGS = ["--legw_base_batch_size", "8", "--legw_base_warmup_epochs", "0.125"]


PLAN_LINE = "LEGW plan (legw): batch 16 (k=2 x base 8)"


def trained(stdout: str, updates: int) -> None:
    """The run logged ``updates`` finite training losses, one per update, and its ``train_loss`` is their mean."""
    logs = [ast.literal_eval(line) for line in stdout.splitlines() if line.startswith("{'loss': ")]
    losses = [float(entry["loss"]) for entry in logs]
    assert len(losses) == updates and all(math.isfinite(loss) for loss in losses), losses
    (summary,) = [ast.literal_eval(line) for line in stdout.splitlines() if line.startswith("{'train_runtime': ")]
    assert float(summary["train_loss"]) == pytest.approx(sum(losses) / updates, rel=2e-3)


def run(script, output_dir, *args, launcher="python", launcher_args=()):
    return launch(
        launcher, script, "--output_dir", output_dir, *TINY_RUN, *args,
        launcher_args=launcher_args, timeout=300, check=False,
    )  # fmt: skip


def plain_version(repo, tmp_path):
    source = (repo / "examples" / "run_mlm.py").read_text().splitlines(keepends=True)
    plain = [line for line in source if not line.rstrip().endswith(LEGW_LINE_MARK)]
    assert len(source) - len(plain) == 1, "the LEGW change must be exactly one marked line"
    script = tmp_path / "run_mlm_plain.py"
    script.write_text("".join(plain))
    return script


def test_legw_version_trains_with_the_plan_shown_and_recorded(repo, tmp_path):
    result = run(repo / "examples" / "run_mlm.py", tmp_path / "legw", *LEGW_FLAGS)
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert "***** Running training *****" in output  # Trainer's own INFO lines are shown, and so is the plan
    assert output.count(PLAN_LINE) == 1
    assert "'legw_k': '2'" in result.stdout
    trained(result.stdout, updates=4)  # 64 sequences at batch 16, one epoch
    # BertForMaskedLM ignores num_items_in_batch: LegwTrainer says so and averages the accumulated losses
    assert "BertForMaskedLM.forward takes **kwargs, but its loss does not depend on num_items_in_batch" in output

    (entry,) = json.loads((tmp_path / "legw" / "legw_plan.json").read_text())
    cli = subprocess.run(
        [sys.executable, "-m", "legw_hf.cli", "plan", "--json", "--base-batch", "8", "--base-lr", "1e-3"]
        + "--base-warmup-epochs 0.125 --epochs 1 --dataset-size 64 --batch 16".split(),
        capture_output=True,
        text=True,
        env=python_env(),
        check=True,
    )
    (expected,) = json.loads(cli.stdout)
    assert {key: entry[key] for key in expected} == expected
    assert entry["from_update"] == 0 and plan_from_dict(entry["plan"]).summary() == expected


@pytest.mark.multiprocess
@pytest.mark.parametrize(
    ("main_level", "replica_level"),
    [
        ("passive", "warning"),  # the main process shows Trainer's INFO lines and the plan, once
        ("warning", "info"),  # the main process hides both, as it hides Trainer's; the replica shows them
    ],
)
def test_the_plan_is_shown_where_trainers_info_lines_are(repo, tmp_path, main_level, replica_level):
    result = run(
        repo / "examples" / "run_mlm.py",
        tmp_path / "ddp",
        *LEGW_FLAGS,
        "--use_cpu",
        "true",
        "--per_device_train_batch_size",
        "4",
        *("--log_level", main_level, "--log_level_replica", replica_level),
        launcher="torchrun",
        launcher_args=["--tee", "3"],  # each line prefixed with its rank: [default0]:, [default1]:
    )
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    # one process of the two logs at INFO: Trainer's banner and the plan appear once, from whichever it is
    assert output.count("***** Running training *****") == 1
    assert output.count(PLAN_LINE) == 1  # per-device 4 x accumulation 2 x 2 processes = 16
    ranks = [line for line in output.splitlines() if PLAN_LINE in line]
    assert ranks[0].startswith("[default1]:" if main_level == "warning" else "[default0]:"), ranks
    assert (tmp_path / "ddp" / "legw_plan.json").is_file()  # recorded by the main process, whatever it shows


def test_plain_version_is_an_ordinary_trainer_script(repo, tmp_path):
    script = plain_version(repo, tmp_path)
    refused = run(script, tmp_path / "plain", *LEGW_FLAGS)
    assert refused.returncode != 0 and "--legw_base_batch_size" in refused.stderr
    result = run(script, tmp_path / "plain")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "LEGW" not in result.stdout
    trained(result.stdout, updates=4)
