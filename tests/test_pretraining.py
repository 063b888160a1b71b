"""``legw-hf pretrain`` run as users run it (``python -m legw_hf.pretraining``), at a size that takes seconds: both
phases, the LR of every update against NVIDIA's formula written out here, evaluation every eighth of a phase, the
unigram baseline counted here from the text, phase 2 starting from phase 1's moments, averaging, the report and
plots, a run interrupted after phase 1 and resumed, and the bad inputs."""

from __future__ import annotations

import json
import math
import os
import shutil
from collections import Counter
from pathlib import Path

import datasets
import pytest
import torch
from legw_oracle import nvidia_lr
from pretraining_run import PHASES, run_program, small_args
from procs import python_env
from safetensors.torch import load_file

from legw_hf.pretraining.program import main


@pytest.fixture(scope="module")
def finished(corpus, tmp_path_factory) -> tuple[Path, str]:
    output_dir = tmp_path_factory.mktemp("run") / "out"
    return output_dir, run_program(small_args(corpus, output_dir))


def test_both_phases_train_on_their_plan_and_the_report_compares_last_and_averaged(finished, corpus):
    output_dir, output = finished
    plan = json.loads((output_dir / "pretraining_plan.json").read_text())
    sizes, histories = {}, {}
    for phase in plan["phases"]:
        name, p = phase["name"], phase["plan"]
        _, _, batch, per_device, base_batch, base_lr, base_warmup, epochs = PHASES[name]
        sequences = p["dataset_size"]
        sizes[name] = sequences
        assert p["batch_size"] == batch and p["base_batch_size"] == base_batch
        peak = base_lr * math.sqrt(batch / base_batch)
        steps_per_epoch = math.ceil(sequences / batch)
        total = math.ceil(epochs * steps_per_epoch)
        warmup_fraction = base_warmup / math.ceil(sequences / base_batch) * (batch / base_batch) / epochs
        history = json.loads((output_dir / name / f"checkpoint-{total}" / "trainer_state.json").read_text())
        histories[name] = history["log_history"]
        logged = {e["step"]: e["learning_rate"] for e in history["log_history"] if "learning_rate" in e}
        assert sorted(logged) == list(range(1, total + 1))
        for step, lr in logged.items():
            expected = nvidia_lr(step, peak=peak, total=total, warmup_fraction=warmup_fraction)
            assert lr == pytest.approx(expected, rel=1e-9, abs=1e-12), (name, step)
        # The plan the phase's Trainer recorded is the one the program printed.
        recorded = json.loads((output_dir / name / "legw_plan.json").read_text())
        assert [entry["plan"] for entry in recorded] == [p], name
        # Evaluation every eighth of the phase (no --eval_steps given), not after every logged update.
        evaluated = [e for e in history["log_history"] if "eval_mlm_loss" in e]
        every = max(1, total // 8)
        assert [e["step"] for e in evaluated] == list(range(every, total + 1, every)), (name, total)
        # The console: one line per evaluation, in place of Trainer's dict per logged update.
        lines = [line for line in output.splitlines() if line.startswith(f"{name} update ")]
        assert lines == [
            f"{name} update {e['step']}/{total}: validation MLM loss {e['eval_mlm_loss']:.3f} "
            f"({abs(e['eval_below_unigram']):.3f} {'below' if e['eval_below_unigram'] > 0 else 'ABOVE'} the unigram "
            f"level {e['eval_unigram_loss']:.3f}), accuracy {e['eval_accuracy']:.3f} "
            f"(most frequent token: {e['eval_most_frequent_accuracy']:.3f})"
            for e in evaluated
        ]
        assert f"global batch {batch} = {per_device} per device x {batch // per_device} accumulation x 1" in output
    assert f"phase1: seq 32 (5 predictions), {sizes['phase1']} sequences" in output
    # Trainer's INFO stream stays out of the default console (--log_level info brings it back: the second run)
    assert "***** Running training *****" not in output and "{'loss'" not in output and "Saving model" not in output

    report = json.loads((output_dir / "report.json").read_text())
    assert set(report["models"]) == {"last", "averaged (last 3, every 2 updates)"}
    # The unigram baseline, counted here from the training text and the validation masks the run cached.
    for phase, seq in (("phase1", 32), ("phase2", 64)):
        loss, accuracy, tokens = unigram_baseline_of(corpus, seq)
        baseline = report["baselines"][f"{phase} (seq {seq})"]
        assert baseline["unigram_loss"] == pytest.approx(loss, rel=1e-9)
        assert baseline["unigram_perplexity"] == pytest.approx(math.exp(loss), rel=1e-9)
        assert baseline["most_frequent_accuracy"] == pytest.approx(accuracy, rel=1e-12)
        assert baseline["masked_tokens"] == tokens
        # Every evaluation during training logged the same baseline beside the model's loss.
        logged = [e for e in histories[phase] if "eval_mlm_loss" in e]
        assert logged and all(e["eval_unigram_loss"] == pytest.approx(loss, rel=1e-9) for e in logged)
        for results in report["validation"].values():
            metrics = results[f"{phase} (seq {seq})"]
            assert metrics["masked_tokens"] == tokens
            assert metrics["perplexity"] == pytest.approx(math.exp(metrics["mlm_loss"]))
            assert metrics["below_unigram"] == pytest.approx(loss - metrics["mlm_loss"])
    assert "unigram baseline (training frequencies)" in output
    last = report["validation"]["last"]["phase2 (seq 64)"]
    margin = last["below_unigram"]
    assert f"last, phase2 (seq 64): {abs(margin):.2f} nats {'below' if margin > 0 else 'ABOVE'} the unigram" in output
    for plot in ("lr_schedule.png", "loss.png"):
        assert (output_dir / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "***** Pretraining report *****" in output and "averaged (last 3, every 2 updates)" in output


def unigram_baseline_of(corpus, seq_len: int) -> tuple[float, float, int]:
    """Loss and accuracy of predicting each masked validation token by its add-one smoothed training frequency, with
    the run's tokenizer and validation masks (read from its cache), and the number of masked tokens."""
    from tokenizers import Tokenizer

    (tokenizer_file,) = corpus["cache"].glob("wordpiece-*-600/tokenizer.json")
    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    counts = Counter()
    for line in corpus["train"].read_text().splitlines():
        counts.update(tokenizer.encode(" ".join(line.split()), add_special_tokens=False).ids)
    (masked_file,) = corpus["cache"].glob(f"validation-*/masked-{seq_len}-*.arrow")
    labels = [label for row in datasets.Dataset.from_file(str(masked_file))["labels"] for label in row if label >= 0]
    total, vocabulary = sum(counts.values()), tokenizer.get_vocab_size()
    loss = -sum(math.log((counts[label] + 1) / (total + vocabulary)) for label in labels) / len(labels)
    most_frequent = max(counts, key=lambda token: (counts[token], -token))
    return loss, sum(label == most_frequent for label in labels) / len(labels), len(labels)


def test_the_averaged_model_is_the_mean_of_the_last_checkpoints(finished):
    output_dir, _ = finished
    checkpoints = sorted((output_dir / "phase2").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert len(checkpoints) == 3 and all(
        int(p.name.split("-")[1]) % 2 == 0 or p == checkpoints[-1] for p in checkpoints
    )
    weights = [load_file(p / "model.safetensors") for p in checkpoints]
    averaged = load_file(output_dir / "averaged" / "model.safetensors")
    for key, value in averaged.items():
        expected = torch.stack([w[key].double() for w in weights]).mean(0).to(value.dtype)
        torch.testing.assert_close(value, expected, rtol=0, atol=1e-7)


def test_phase_2_starts_from_phase_1s_moments_with_the_step_count_restarted(finished):
    output_dir, _ = finished
    phase1_end = json.loads((output_dir / "phase1" / "phase_complete.json").read_text())["checkpoint"]
    before = torch.load(output_dir / "phase1" / phase1_end / "optimizer.pt", weights_only=True)
    phase2 = sorted((output_dir / "phase2").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[0]
    steps = int(phase2.name.split("-")[1])
    after = torch.load(phase2 / "optimizer.pt", weights_only=True)
    beta2 = after["param_groups"][0]["betas"][1]
    phase1_steps = int(phase1_end.split("-")[1])
    for index, state in after["state"].items():
        assert state["step"].item() == steps  # restarted: not phase1_steps + steps
        assert before["state"][index]["step"].item() == phase1_steps
        # v after s more updates is beta2^s v_carried + (non-negative new squares): a fresh v would be far below it.
        floor = beta2**steps * before["state"][index]["exp_avg_sq"]
        assert torch.all(state["exp_avg_sq"] >= floor * (1 - 1e-6))


def test_a_run_stopped_after_phase_1_resumes_into_phase_2_and_ends_as_an_uninterrupted_run(finished, corpus, tmp_path):
    uninterrupted, _ = finished
    output_dir = tmp_path / "out"
    args = small_args(corpus, output_dir)
    # What a run stopped after phase 1 leaves on disk (phase 2 had saved nothing yet): the finished run's files but
    # phase 2's, the averaged model and the report.
    after_phase_2 = {"phase2", "averaged", "report.json", "lr_schedule.png", "loss.png"}

    def later_files(folder: str, names: list[str]) -> set[str]:
        return after_phase_2 & set(names) if folder == str(uninterrupted) else set()

    shutil.copytree(uninterrupted, output_dir, ignore=later_files)
    assert (output_dir / "phase1" / "phase_complete.json").exists() and not (output_dir / "phase2").exists()

    output = run_program(args)
    assert "holds this run: resuming it" in output and "phase1 already finished" in output
    assert "Optimizer moments carried over from" in output
    name = json.loads((uninterrupted / "phase2" / "phase_complete.json").read_text())["checkpoint"]
    resumed = load_file(output_dir / "phase2" / name / "model.safetensors")
    reference = load_file(uninterrupted / "phase2" / name / "model.safetensors")
    for key in reference:
        torch.testing.assert_close(resumed[key], reference[key], rtol=0, atol=0)


def test_a_second_run_reuses_the_cache_picks_the_largest_micro_batch_and_moves_foreign_files_aside(
    finished, corpus, tmp_path, capsys
):
    del finished  # the module's first run made the cache (if another test had not); this run must find it
    output_dir = tmp_path / "again"
    output_dir.mkdir()
    (output_dir / "notes.txt").write_text("mine")
    args = small_args(corpus, output_dir, phase1_epochs="0.1", phase2_epochs="0.2", average_last="0")
    assert main(args) == 2  # a folder with files of the user's: refused, untouched
    assert "output_dir holds files that are not a legw-hf pretrain run" in capsys.readouterr().err
    assert (output_dir / "notes.txt").read_text() == "mine"

    # On an install without matplotlib (its import blocked here) the default is to skip the plots, and say so.
    blocker = tmp_path / "without-matplotlib" / "matplotlib"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('matplotlib is not installed here')\n")
    env = {"PYTHONPATH": f"{blocker.parent}{os.pathsep}{python_env()['PYTHONPATH']}"}
    flags = ["--auto_micro_batch", "true", "--overwrite_output_dir", "true", "--log_level", "info"]
    output = run_program([*args, *flags], env=env)
    assert "No plots: matplotlib is not installed" in output and not list(output_dir.glob("*.png"))
    # --log_level info: Trainer's own stream, as in transformers' example scripts, after the program's plan
    assert output.index("LEGW plan") < output.index("***** Running training *****")
    (aside,) = output_dir.glob("replaced-*")  # told to overwrite: moved aside, never deleted
    assert (aside / "notes.txt").read_text() == "mine" and (output_dir / "report.json").is_file()
    line = next(text for text in output.splitlines() if "Preprocessing reused from the cache" in text)
    for step in ("train:tokenized", "train:packed-32", "train:packed-64", "validation:packed-64"):
        assert step in line
    assert "Reusing the WordPiece tokenizer" in output
    assert "Tokenizing train documents" not in output
    # On this machine's memory every divisor of the per-process batch fits: no accumulation is needed.
    for phase, seq in (("phase1", 32), ("phase2", 64)):
        line = next(text for text in output.splitlines() if f"{phase}: seq {seq} " in text)
        assert (
            "global batch 32 = 32 per device x 1 accumulation x 1 processes (--auto_micro_batch: micro-batch 32" in line
        )
        assert "tried 1, 2, 4, 8, 16, 32" in line


# ----------------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"train_file": "/nonexistent/train.txt"}, "--train_file must be an existing text file"),
        ({"train_file": "EMPTY"}, "--train_file must hold at least one non-blank document"),
        (
            {"validation_file": "TINY"},
            "validation sequences of 32 tokens for phase1, fewer than --min_validation_sequences 8",
        ),
        ({"phase2_seq_len": "1024"}, "--phase2_seq_len must be at most the model's 512 positions"),
        ({"phase1_global_batch_size": "40"}, "--phase1_global_batch_size must be a multiple of per-device batch"),
        ({"learning_rate": "0.1"}, "--learning_rate is set per phase by this program: use --phase1_base_lr"),
        ({"average_last": "50"}, "--average_last must be at most phase 2's"),
        ({"phase1_base_warmup_steps": "1000"}, "--phase1_base_warmup_steps must give a warmup shorter than training"),
        ({"resume_from_checkpoint": "x"}, "--resume_from_checkpoint is not needed"),
        ({"bogus_flag": "1"}, "flags must be flags of legw-hf pretrain or of Trainer"),
        ({"recipe": "nope"}, "argument --recipe: invalid choice: 'nope'"),
        ({"output_dir": "UNWRITABLE"}, "--output_dir must be a folder this process can write in (/proc:"),
        ({"plots": "maybe"}, "argument --plots: Truthy value expected: got maybe"),
    ],
)
def test_bad_input_is_refused_before_anything_is_written(corpus, tmp_path, capsys, changes, message):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    output_dir = tmp_path / "out"
    values = {"EMPTY": str(empty), "TINY": str(corpus["tiny"]), "UNWRITABLE": "/proc/legw-hf/out"}
    changes = {key: values.get(value, value) for key, value in {"output_dir": str(output_dir), **changes}.items()}
    assert main(small_args(corpus, **changes)) == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines[-1].startswith("legw-hf pretrain: error: ") and message in lines[-1]
    if not set(changes) & NEEDS_THE_DATA:  # refused before any work: that one line is all the user sees
        assert len(lines) == 1, lines
    assert not output_dir.exists()


#: Settings only the prepared data can check (file contents, sequence counts, the plan's length).
NEEDS_THE_DATA = {"train_file", "validation_file", "average_last", "phase1_base_warmup_steps"}


def test_an_output_directory_of_another_run_is_refused_and_left_as_it_is(finished, corpus, capsys):
    output_dir, _ = finished
    before = {p: p.stat().st_mtime_ns for p in output_dir.rglob("*")}
    assert main(small_args(corpus, output_dir, phase1_base_lr="0.03")) == 2
    error = capsys.readouterr().err
    assert "--output_dir holds a different pretraining run (differs in: phases)" in error
    assert "--overwrite_output_dir" in error
    assert {p: p.stat().st_mtime_ns for p in output_dir.rglob("*")} == before


def test_the_cli_subcommand_runs_the_same_program(corpus, tmp_path):
    import subprocess
    import sys

    from procs import python_env

    output_dir = tmp_path / "out"
    args = small_args(corpus, output_dir, learning_rate="0.1")
    result = subprocess.run(
        [sys.executable, "-m", "legw_hf.cli", "pretrain", *args],
        env=python_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert "legw-hf pretrain: error: --learning_rate is set per phase by this program" in result.stderr
    assert not output_dir.exists()
