"""The package as a user installs it: the wheel built from this checkout, installed into a fresh virtual environment
with no extras (``pip install legw_hf-*.whl``, torch kept on the CPU build by ``constraints/cpu.txt``), and its
commands run from a folder outside the checkout, with nothing of the checkout importable: ``legw-hf --version``,
``legw-hf plan``, ``legw-hf recipes --copy``, a seconds-long ``legw-hf pretrain`` (no matplotlib: no plots, said
once), the copied torchrun recipe training the shipped ``run_mlm.py`` on 2 processes, and the main job at its
default size, which must end 0.3 nats below the unigram level (about 5 minutes). Marked ``wheel``;
``make test-wheel`` runs it (about 12 minutes), and CI runs it after ``make test``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from pretraining_run import small_args, write_corpus
from procs import REPO

import legw_hf

pytestmark = pytest.mark.wheel


def run(command: list[str], cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    # An environment a user's shell would have: no PYTHONPATH (nothing of the checkout importable), no CI.
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "CI")}
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> tuple[Path, Path]:
    """A fresh venv holding the wheel and its declared dependencies only; a working folder outside the checkout."""
    root = tmp_path_factory.mktemp("wheel")
    outside = root / "work"
    outside.mkdir()
    # Built from a copy: setuptools writes build/ into the source tree, and the checkout is not the test's to change.
    source = root / "source"
    skipped = shutil.ignore_patterns(".*", "build", "dist", "runs", "*.egg-info", "__pycache__")
    shutil.copytree(REPO, source, ignore=skipped)
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(root / "dist"), str(source)], cwd=outside)
    (wheel,) = (root / "dist").glob("legw_hf-*.whl")
    run([sys.executable, "-m", "venv", str(root / "venv")], cwd=outside)
    bin_dir = root / "venv" / "bin"
    run([str(bin_dir / "pip"), "install", "-q", "-c", str(REPO / "constraints" / "cpu.txt"), str(wheel)], cwd=outside)
    return bin_dir, outside


def test_the_wheel_installs_without_extras_and_imports_from_the_venv(venv):
    bin_dir, outside = venv
    python = str(bin_dir / "python")
    found = run([python, "-c", "import legw_hf, torch; print(legw_hf.__file__, torch.__version__)"], outside)
    module_file, torch_version = found.stdout.split()
    assert Path(module_file).is_relative_to(bin_dir.parent) and not Path(module_file).is_relative_to(REPO)
    assert torch_version.startswith("2.13.0")  # the constraint held: the CPU build, not a newer CUDA one
    missing = run([python, "-c", "import importlib.util as u; print(u.find_spec('matplotlib'))"], outside)
    assert missing.stdout.strip() == "None"  # no extras came along


def test_version_plan_and_recipes_run_from_outside_the_checkout(venv):
    bin_dir, outside = venv
    legw = str(bin_dir / "legw-hf")
    assert run([legw, "--version"], outside).stdout.strip() == f"legw-hf {legw_hf.__version__}"
    flags = "plan --base-batch 256 --base-lr 0.1 --base-warmup-epochs 0.5 --epochs 90 --dataset-size 1281167"
    plan = run([legw, *flags.split(), "--batch", "1024", "--json"], outside)
    (row,) = json.loads(plan.stdout)
    assert row["batch"] == 1024 and row["peak_lr"] == pytest.approx(0.1 * 2)  # √(1024/256) = 2
    run([legw, "recipes", "--copy", "recipes"], outside)
    for shipped in ("launch/job.sh", "launch/run_mlm.py", "launch/hostfile", "deepspeed/zero3-bf16.json"):
        assert (outside / "recipes" / shipped).is_file(), shipped
    # the Trainer script job.sh runs by default, with the wheel's dependencies alone
    script_help = run([str(bin_dir / "python"), "recipes/launch/run_mlm.py", "--help"], outside)
    assert "--legw_base_batch_size" in script_help.stdout and "--train_file" in script_help.stdout
    check = run([legw, "launch-check", "--hostfile", "launch/hostfile", "--accelerate-config",
                 "launch/accelerate-multinode.yaml"], outside / "recipes")  # fmt: skip
    assert "64 nodes, 512 processes" in check.stdout


def test_a_seconds_long_pretrain_runs_from_the_wheel(venv):
    bin_dir, outside = venv
    corpus = write_corpus(outside)
    args = small_args(corpus, outside / "run", phase1_epochs="0.25", phase2_epochs="0.25", average_last="0")
    result = run([str(bin_dir / "legw-hf"), "pretrain", *args], outside)
    output = result.stdout + result.stderr
    assert "No plots: matplotlib is not installed" in output
    report = json.loads((outside / "run" / "report.json").read_text())
    assert set(report["validation"]) == {"last"} and report["baselines"]
    assert not list((outside / "run").glob("*.png"))


def test_the_shipped_trainer_script_trains_under_the_torchrun_recipe_from_the_wheel(venv):
    """The copied recipes as shipped: torchrun.sh starts job.sh's default script (run_mlm.py beside it) on 2 CPU
    processes, reading TRAIN_FILE, at the 2-node test's toy size (96 blocks, global batch 16, base batch 8)."""
    from launch import free_port
    from test_multinode import JOB_FLAGS

    bin_dir, outside = venv
    recipes = outside / "recipes"
    if not recipes.is_dir():
        run([str(bin_dir / "legw-hf"), "recipes", "--copy", str(recipes)], outside)
    (outside / "text").mkdir()
    corpus = write_corpus(outside / "text")
    settings = {
        "PYTHON": str(bin_dir / "python"),
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "TRAIN_FILE": str(corpus["train"]),
        "NNODES": "1",
        "GPUS_PER_NODE": "2",
        "NODE_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "GLOBAL_BATCH": "16",
        "MICRO_BATCH": "4",
        "PRECISION": "fp32",
        "OUTPUT_DIR": str(outside / "torchrun-job"),
    }
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "CI")} | settings
    result = subprocess.run(
        ["bash", str(recipes / "launch" / "torchrun.sh"), *JOB_FLAGS],
        cwd=outside, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (entry,) = json.loads((outside / "torchrun-job" / "legw_plan.json").read_text())
    assert entry["batch"] == 16 and entry["k"] == 16 / 8
    results = json.loads((outside / "torchrun-job" / "all_results.json").read_text())
    assert results["train_samples"] == 96 and results["train_loss"] > 0


def test_the_main_job_at_its_default_size_learns_from_the_wheel(venv):
    """`legw-hf pretrain` as the README's quick start runs it (`make main`), from the wheel alone: both phases of
    the tiny recipe on the embedded corpus, ending at least 0.3 nats below the unigram level (about 5 minutes)."""
    bin_dir, outside = venv
    result = run([str(bin_dir / "legw-hf"), "pretrain", "--output_dir", "main"], outside, timeout=1500)
    assert "Pretraining report" in result.stdout + result.stderr
    validation = json.loads((outside / "main" / "report.json").read_text())["validation"]
    assert [model.split()[0] for model in validation] == ["last", "averaged"]
    for model, phases in validation.items():
        (phase2,) = [metrics for name, metrics in phases.items() if name.startswith("phase2")]
        assert phase2["below_unigram"] >= 0.3, (model, phase2)
