"""`legw-hf plan`: the installed console script, its table, JSON, plot and one-line errors."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from legw_hf.cli import main

IMAGENET_ARGS = [
    *"plan --base-batch 1024 --base-lr".split(),
    repr(2**2.5),
    *"--base-warmup-epochs 0.3125 --epochs 90 --dataset-size 1281167".split(),
]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    beside_python = Path(sys.executable).with_name("legw-hf")
    executable = str(beside_python) if beside_python.exists() else shutil.which("legw-hf")
    assert executable, "the legw-hf console script is not installed"
    return subprocess.run([executable, *args], capture_output=True, text=True, timeout=120)


def test_json_has_one_object_per_batch_with_the_documented_keys():
    batches = [1024 * 2**j for j in range(6)]
    result = run_cli(*IMAGENET_ARGS, *[a for b in batches for a in ("--batch", str(b))], "--power", "2", "--json")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [row["batch"] for row in rows] == batches
    for j, row in enumerate(rows):
        assert {"batch", "k", "peak_lr", "warmup_epochs", "warmup_steps", "steps_per_epoch", "total_steps"} <= set(row)
        assert row["k"] == 2**j
        assert row["peak_lr"] == 2 ** (2.5 + 0.5 * j)
        assert row["warmup_epochs"] == 0.3125 * 2**j
        spe = math.ceil(1281167 / row["batch"])
        assert row["steps_per_epoch"] == spe
        assert row["total_steps"] == 90 * spe
        assert row["warmup_steps"] == math.ceil(0.3125 * 2**j * spe)


def test_text_table_has_a_row_per_batch(capsys):
    assert main([*IMAGENET_ARGS, "--batch", "1024", "--batch", "32768"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split() == [
        "batch",
        "k",
        "peak_lr",
        "warmup_epochs",
        "warmup_steps",
        "steps_per_epoch",
        "total_steps",
    ]
    assert lines[2].split() == ["1024", "1", "5.65685", "0.3125", "392", "1252", "112680"]
    assert lines[3].split() == ["32768", "32", "32", "10", "400", "40", "3600"]


def test_plot_writes_a_png(tmp_path):
    target = tmp_path / "plan.png"
    assert main([*IMAGENET_ARGS, "--batch", "1024", "--batch", "8192", "--plot", str(target)]) == 0
    data = target.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_base_steps_and_other_decays(capsys):
    assert (
        main(
            [
                "plan",
                "--base-batch",
                "100",
                "--base-lr",
                "0.1",
                "--base-warmup-steps",
                "5",
                "--base-steps",
                "60",
                "--dataset-size",
                "1000",
                "--batch",
                "400",
                "--decay",
                "multistep",
                "--milestones",
                "3",
                "5",
                "--gamma",
                "0.5",
                "--json",
            ]
        )
        == 0
    )
    (row,) = json.loads(capsys.readouterr().out)
    assert (row["warmup_epochs"], row["steps_per_epoch"], row["total_steps"], row["warmup_steps"]) == (2.0, 3, 18, 6)


def with_changes(args: list[str], change: list[str]) -> list[str]:
    """``args`` with each flag in ``change`` (other than the repeatable --batch) dropped, then ``change``."""
    replaced = {flag for flag in change if flag.startswith("--") and flag != "--batch"}
    kept, skip = [], False
    for index, item in enumerate(args):
        if skip:
            skip = False
        elif item in replaced:
            skip = index + 1 < len(args) and not args[index + 1].startswith("--")
        else:
            kept.append(item)
    return kept + change


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (["--base-batch", "0"], "--base-batch must be an integer >= 1, got 0"),
        (["--base-lr", "-0.1"], "--base-lr must be a finite number > 0, got -0.1"),
        (["--dataset-size", "0"], "--dataset-size must be an integer >= 1, got 0"),
        (["--epochs", "0"], "--epochs must be a finite number > 0, got 0.0"),
        (["--batch", "0"], "--batch must be an integer >= 1, got 0"),
        (["--base-warmup-epochs", "3"], "--base-warmup-epochs must give a warmup shorter than training (90 epochs)"),
        (["--rule", "cubic"], "argument --rule: invalid choice: 'cubic'"),
        (["--decay", "step"], "argument --decay: invalid choice: 'step'"),
        (
            ["--decay", "multistep", "--milestones", "30", "95"],
            "--milestones must lie after the warmup and inside training, in (10, 90) epochs",
        ),
        (["--decay", "multistep", "--milestones", "60", "30"], "--milestones must be strictly increasing"),
        (["--power", "0"], "--power must be a finite number > 0, got 0.0"),
        (["--end-lr", "100"], "--end-lr must not exceed the peak LR (32)"),
        (["--gamma", "0.5"], "--gamma is not an option of the 'poly' decay"),
        (["--drop-last", "--batch", "2000000"], "--batch must not exceed dataset_size (1281167) with drop_last on"),
        (["--plot", "/nonexistent/dir/p.png"], "--plot must be a writable file path"),
    ],
)
def test_bad_input_is_one_line_with_status_2(change, message, capsys):
    with pytest.raises(SystemExit) as exited:
        main(with_changes([*IMAGENET_ARGS, "--batch", "32768"], change))
    assert exited.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("legw-hf")
    assert message in err


def test_console_script_error_has_no_traceback():
    result = run_cli(*with_changes(IMAGENET_ARGS, ["--base-batch", "0"]), "--batch", "4096")
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr == "legw-hf plan: error: --base-batch must be an integer >= 1, got 0\n"


def test_version_from_the_console_script_and_python_dash_m():
    import legw_hf

    assert run_cli("--version").stdout == f"legw-hf {legw_hf.__version__}\n"
    module = subprocess.run([sys.executable, "-m", "legw_hf", "--version"], capture_output=True, text=True, timeout=120)
    assert module.returncode == 0 and module.stdout == f"legw-hf {legw_hf.__version__}\n"


@pytest.mark.parametrize(
    "command", ["plan", "ds-config", "batch-flags", "launch-check", "average-checkpoints", "recipes"]
)
def test_every_subcommand_help_says_what_it_does_and_lists_closed_choices(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    page = capsys.readouterr().out
    summary = page.split("\n\n")[1]  # after the usage block: the description
    assert summary.endswith(".") and len(summary) > 20, page[:400]
    if command == "ds-config":
        for choices in ("--zero {0,1,2,3}", "--precision {fp16,bf16}", "--offload-optimizer {none,cpu}"):
            assert choices in " ".join(page.split()), choices


def test_errors_name_the_flag_as_typed(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["recipes", "--copy", "/proc/legw-hf/recipes"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith("legw-hf recipes: error: --copy must be a directory legw-hf can create")
