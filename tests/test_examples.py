"""The run_mlm.py-style example: LEGW is a one-line change, and both versions really train."""

from __future__ import annotations

import subprocess
import sys

from procs import REPO, python_env

LEGW_LINE_MARK = "# LEGW"
TINY_RUN = [
    *["--train_file", str(REPO.parent / "shared" / "data" / "wikitext-2" / "valid.txt")],
    *"--max_train_samples 64 --max_seq_length 32 --vocab_size 600 --num_train_epochs 1".split(),
    *"--per_device_train_batch_size 8 --gradient_accumulation_steps 2 --learning_rate 1e-3".split(),
    *"--save_strategy no --report_to none --disable_tqdm true --logging_steps 1".split(),
]
LEGW_FLAGS = ["--legw_base_batch_size", "8", "--legw_base_warmup_epochs", "0.125"]


def run(script, output_dir, *args):
    return subprocess.run(
        [sys.executable, str(script), "--output_dir", str(output_dir), *TINY_RUN, *args],
        capture_output=True,
        text=True,
        env=python_env(),
        timeout=300,
    )


def plain_version(repo, tmp_path):
    source = (repo / "examples" / "run_mlm.py").read_text().splitlines(keepends=True)
    plain = [line for line in source if not line.rstrip().endswith(LEGW_LINE_MARK)]
    assert len(source) - len(plain) == 1, "the LEGW change must be exactly one marked line"
    script = tmp_path / "run_mlm_plain.py"
    script.write_text("".join(plain))
    return script


def test_legw_version_trains_with_the_plan(repo, tmp_path):
    result = run(repo / "examples" / "run_mlm.py", tmp_path / "legw", *LEGW_FLAGS)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "LEGW plan (legw): batch 16 (k=2 x base 8)" in result.stdout
    assert "'legw_k': '2'" in result.stdout
    assert "train_loss" in result.stdout


def test_plain_version_is_an_ordinary_trainer_script(repo, tmp_path):
    script = plain_version(repo, tmp_path)
    refused = run(script, tmp_path / "plain", *LEGW_FLAGS)
    assert refused.returncode != 0 and "--legw_base_batch_size" in refused.stderr
    result = run(script, tmp_path / "plain")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "LEGW" not in result.stdout and "train_loss" in result.stdout
