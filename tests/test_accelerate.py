"""LEGW in accelerate loops: one step per real update, skipped fp16 steps, checkpoints, and 2 real processes."""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import warnings

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from launch import launch, split_runs
from legw_oracle import legw_poly_lr
from procs import REPO
from test_ramp import written_out
from torch.utils.data import DataLoader, TensorDataset

from legw_hf import LegwConfig, Polynomial, SettingError
from legw_hf.integrations.accelerate import create_legw_scheduler, ramped_updates
from legw_hf.ramp import AutoRamp, BatchRamp, RampController, ramp_from_decisions, ramped_plan, read_decisions


@pytest.fixture
def fresh_accelerate_state():
    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def run_loop(accelerator, model, optimizer, loader, scheduler, epochs: int, poison: set[int] = frozenset()):
    """A standard accelerate loop; returns the LR each optimizer step (applied or skipped) used."""
    lrs, step = [], 0
    for _ in range(epochs):
        for x, y in loader:
            with accelerator.accumulate(model):
                loss = torch.nn.functional.mse_loss(model(x).squeeze(-1), y)
                if step in poison:
                    loss = loss * math.inf
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    lrs.append(optimizer.param_groups[0]["lr"])
                    step += 1
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
    return lrs


def setup(accelerator, dataset_size=50, per_device=4, seed=0, scaler=None):
    torch.manual_seed(seed)
    x = torch.randn(dataset_size, 6)
    data = TensorDataset(x, x.sum(-1))
    model = torch.nn.Linear(6, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.9)
    if scaler is not None:
        accelerator.scaler = scaler  # accelerate makes none on CPU; a GPU fp16 run has this one
    model, optimizer, loader = accelerator.prepare(model, optimizer, DataLoader(data, batch_size=per_device))
    config = LegwConfig(base_batch_size=4, base_lr=0.02, base_warmup_epochs=0.2, decay=Polynomial(power=2.0))
    return model, optimizer, loader, config


def expected(update: int, *, batch: int, spe: int, epochs: float) -> float:
    return legw_poly_lr(
        update,
        base_lr=0.02,
        base_batch=4,
        batch=batch,
        base_warmup_epochs=0.2,
        epochs=epochs,
        steps_per_epoch=spe,
        power=2.0,
    )


def test_steps_once_per_accumulated_update(fresh_accelerate_state):
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=3)
    model, optimizer, loader, config = setup(accelerator)
    scheduler = create_legw_scheduler(accelerator, optimizer, config, loader, num_epochs=2, batch_size=12)
    # 50 examples in 13 micro-batches of 4; windows of 3 micro-batches -> 5 updates per epoch (last one short)
    assert (scheduler.plan.batch_size, scheduler.plan.steps_per_epoch, scheduler.plan.total_steps) == (12, 5, 10)
    lrs = run_loop(accelerator, model, optimizer, loader, scheduler, epochs=2)
    assert scheduler.updates == 10
    assert lrs == pytest.approx([expected(n, batch=12, spe=5, epochs=2) for n in range(10)])


def test_skipped_fp16_steps_hold_the_schedule(fresh_accelerate_state):
    accelerator = Accelerator(cpu=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    model, optimizer, loader, config = setup(accelerator, scaler=scaler)
    scheduler = create_legw_scheduler(accelerator, optimizer, config, loader, num_epochs=2)
    lrs = run_loop(accelerator, model, optimizer, loader, scheduler, epochs=2, poison={1, 2, 10})
    assert scaler.get_scale() == 256.0 / 8
    assert scheduler.updates == 26 - 3
    applied, wanted = 0, []
    for step in range(26):
        wanted.append(expected(applied, batch=4, spe=13, epochs=2))
        applied += step not in {1, 2, 10}
    assert lrs == pytest.approx(wanted)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_save_state_and_load_state_restore_the_progress(fresh_accelerate_state, tmp_path):
    accelerator = Accelerator(cpu=True)
    model, optimizer, loader, config = setup(accelerator)
    scheduler = create_legw_scheduler(accelerator, optimizer, config, loader, num_epochs=2)
    run_loop(accelerator, model, optimizer, loader, scheduler, epochs=1)
    accelerator.save_state(str(tmp_path / "state"))
    lr_after_one_epoch = optimizer.param_groups[0]["lr"]

    AcceleratorState._reset_state(True)
    accelerator = Accelerator(cpu=True)
    model, optimizer, loader, config = setup(accelerator)
    restored = create_legw_scheduler(accelerator, optimizer, config, loader, num_epochs=2)
    assert restored.updates == 0
    accelerator.load_state(str(tmp_path / "state"))
    assert restored.updates == 13
    assert optimizer.param_groups[0]["lr"] == lr_after_one_epoch == expected(13, batch=4, spe=13, epochs=2)


def test_refuses_an_unprepared_dataloader_and_a_wrong_batch(fresh_accelerate_state):
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    _, optimizer, loader, config = setup(accelerator)
    with pytest.raises(SettingError, match="^batch_size must equal .* = 8, got 16"):
        create_legw_scheduler(accelerator, optimizer, config, loader, num_epochs=2, batch_size=16)
    with pytest.raises(SettingError, match="^train_dataloader must be the dataloader returned by accelerator.prepare"):
        create_legw_scheduler(accelerator, optimizer, config, DataLoader(loader.dataset), num_epochs=2)


# ------------------------------------------------------------ examples/accelerate_loop.py on 2 processes
# The example's flags of the two-process runs the tests read; all of them run in one launch (`two_processes`).
PLANNED_LR_LOOP = "--base-batch-size 8 --per-device-batch-size 8 --gradient-accumulation-steps 2 --epochs 3"
PLANNED_LR_LOOP += " --dataset-size 250 --optimizer lamb --output-dir {folder}/state"
RAMP_LOOP = "--base-batch-size 8 --per-device-batch-size 2 --epochs 3 --dataset-size 64 --batch-ramp 8@0,16@1,32@2"
AUTO_RAMP_LOOP = "--base-batch-size 4 --per-device-batch-size 2 --epochs 3 --dataset-size 128 --target-noise 5"
AUTO_RAMP_LOOP += " --batch-ramp auto --max-batch 32 --ramp-patience 4 --decision-log {folder}/decisions.jsonl"


def ramp_loop_expected() -> list[tuple[int, float]]:
    """(batch, LR) of every update of RAMP_LOOP, written out (LEGW poly power 2 per stage batch)."""
    stages = [(8, 0.0), (16, 1.0), (32, 2.0)]
    return written_out(stages, dataset_size=64, epochs=3, base_batch=8, base_lr=0.05, base_warmup_epochs=0.25, power=2)


def load_example(repo):
    """examples/accelerate_loop.py as a module, to run its main() in this process."""
    spec = importlib.util.spec_from_file_location("accelerate_loop", repo / "examples" / "accelerate_loop.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    return example


RESUMED_LOOP = "--optimizer lamb --base-batch-size 4 --per-device-batch-size 4 --epochs 2 --dataset-size 96"
TWO_PROCESS_RUNS = {
    "planned_lr": PLANNED_LR_LOOP,
    "ramp": f"{RAMP_LOOP} --optimizer lamb --parameters-out {{folder}}/ramp.pt",
    "ramp_stopped": f"{RAMP_LOOP} --optimizer lamb --stop-after 10 --output-dir {{folder}}/ramp-state",
    "auto_ramp": AUTO_RAMP_LOOP,
    "uninterrupted": f"{RESUMED_LOOP} --parameters-out {{folder}}/uninterrupted.pt",
    "interrupted": f"{RESUMED_LOOP} --stop-after 5 --output-dir {{folder}}/resumable",
}


def loop_runs(folder, runs: dict[str, str], launcher: str, processes: int) -> dict[str, tuple[str, str]]:
    """``runs`` (name -> the example's flags; ``{folder}`` in them is ``folder``) in one launch of
    tests/scripts/accelerate_loop_runs.py, each run logging its LRs to ``folder/<name>.rank<N>``: name -> the run's
    stdout and stderr. Only the main process writes on stdout; on stderr, with several processes, the other ranks'
    lines may land beside another run's."""
    argv = {
        name: [*flags.format(folder=folder).split(), "--lr-log", str(folder / name)] for name, flags in runs.items()
    }
    (folder / "runs.json").write_text(json.dumps(argv))
    script = REPO / "tests" / "scripts" / "accelerate_loop_runs.py"
    result = launch(launcher, script, folder / "runs.json", processes=processes, cwd=folder, timeout=600)
    stdout, stderr = split_runs(result.stdout), split_runs(result.stderr)
    assert list(stdout) == list(stderr) == list(runs), result.stdout[-3000:]
    return {name: (stdout[name], stderr[name]) for name in runs}


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """``TWO_PROCESS_RUNS`` in one ``accelerate launch`` of 2 processes: their folder, and each run's output."""
    folder = tmp_path_factory.mktemp("two_processes")
    return folder, loop_runs(folder, TWO_PROCESS_RUNS, "accelerate", processes=2)


def lr_rows(folder, name: str, rank: int) -> list[dict]:
    return [json.loads(line) for line in (folder / f"{name}.rank{rank}").read_text().splitlines()]


@pytest.mark.multiprocess
def test_accelerate_launch_two_processes_use_the_planned_lr_on_every_rank(two_processes):
    # LAMB (the example's SGD is the optimizer of the one-process tests above; the plan does not depend on it).
    # accelerate 1.x: `launch --cpu --num_processes 2` starts ONE process (its simple launcher); two CPU
    # processes over gloo need the multi-process launcher with ACCELERATE_USE_CPU set (launch.launch does).
    folder, outputs = two_processes
    # 250 examples over 2 ranks: 125 each, 16 micro-batches of 8, windows of 2 -> 8 updates per epoch
    for rank in (0, 1):
        rows = lr_rows(folder, "planned_lr", rank)
        assert {row["processes"] for row in rows} == {2}
        assert [row["update"] for row in rows] == list(range(24))
        wanted = [
            legw_poly_lr(
                n, base_lr=0.05, base_batch=8, batch=32, base_warmup_epochs=0.25, epochs=3, steps_per_epoch=8, power=2.0
            )
            for n in range(24)
        ]
        assert [row["lr"] for row in rows] == pytest.approx(wanted, rel=1e-12, abs=1e-15)
    stdout, _ = outputs["planned_lr"]
    assert "batch 32 (k=4 x base 8)" in stdout
    # both ranks applied the same updates: the saved model is one model
    saved = [path.name for path in (folder / "state").iterdir()]
    assert "model.safetensors" in saved and "custom_checkpoint_0.pkl" in saved


@pytest.mark.multiprocess
def test_accelerate_deepspeed_plugin_lamb_equals_the_plain_loop(repo, tmp_path, fresh_accelerate_state):
    # accelerate's DeepSpeed plugin counts one process on CPU-only machines (its train_batch_size disagrees with
    # DeepSpeed's world of 2), so this runs one process: ZeRO-2 still hands LAMB one flat buffer per param group,
    # spanning all its tensors, and the trust ratios must still be per tensor.
    config = tmp_path / "ds.json"
    config.write_text(
        json.dumps(
            {
                "zero_optimization": {"stage": 2},
                "gradient_clipping": 0.0,  # the nvidia preset pre-normalises: clip once
                "train_micro_batch_size_per_gpu": "auto",
                "gradient_accumulation_steps": "auto",
                "train_batch_size": "auto",
            }
        )
    )
    script, loop = repo / "examples" / "accelerate_loop.py", ["--optimizer", "lamb", "--epochs", "2"]
    with_deepspeed = dict(processes=1, launcher_args=["--use_deepspeed", "--deepspeed_config_file", str(config)])
    for run in ("ds", "plain"):
        outputs = ["--lr-log", tmp_path / run, "--parameters-out", tmp_path / f"{run}.pt"]
        if run == "ds":
            launch("accelerate", script, *loop, *outputs, cwd=tmp_path, timeout=300, **with_deepspeed)
        else:  # in this process
            load_example(repo).main([*loop, *map(str, outputs)])
    lrs = {
        run: [json.loads(line)["lr"] for line in (tmp_path / f"{run}.rank0").read_text().splitlines()]
        for run in ("ds", "plain")
    }
    assert lrs["ds"] == lrs["plain"] and len(lrs["ds"]) == 64
    trained = {run: torch.load(tmp_path / f"{run}.pt", weights_only=True) for run in ("ds", "plain")}
    for name, expected in trained["plain"].items():
        torch.testing.assert_close(trained["ds"][name], expected, rtol=1e-5, atol=1e-6, msg=name)

    # (a "scheduler" block in the plugin's config is refused: tests/test_sharded.py, in its DeepSpeed launch)


@pytest.mark.multiprocess
def test_accelerate_loop_resumed_at_another_world_size(two_processes, repo, tmp_path, fresh_accelerate_state):
    """2 processes save after 5 of 24 updates (global batch 8, the `interrupted` run); 1 process (this one) resumes:
    with the same per-device batch (global 4: the plan is re-derived, 5 updates at 8 are 10 at 4) and with
    accumulation 2 (global 8 kept)."""
    two, _ = two_processes
    resumed = f"{RESUMED_LOOP} --resume-from {two / 'resumable'}"
    one_process_runs = {
        "changing": resumed,
        "fixed": f"{resumed} --gradient-accumulation-steps 2 --parameters-out {tmp_path / 'fixed.pt'}",
    }
    example, notes = load_example(repo), {}
    for name, flags in one_process_runs.items():
        AcceleratorState._reset_state(True)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            example.main([*flags.split(), "--lr-log", str(tmp_path / name)])
        notes[name] = "".join(str(w.message) for w in caught)

    def lr(update: int, batch: int) -> float:  # LEGW written out: √k peak, k × 0.25 warmup epochs, poly power 2
        return legw_poly_lr(
            update,
            base_lr=0.05,
            base_batch=4,
            batch=batch,
            base_warmup_epochs=0.25,
            epochs=2,
            steps_per_epoch=96 // batch,
            power=2.0,
        )

    changing = lr_rows(tmp_path, "changing", 0)
    assert [row["update"] for row in changing] == list(range(10, 48)) and changing[0]["processes"] == 1
    assert [row["lr"] for row in changing] == pytest.approx([lr(n, 4) for n in range(10, 48)], rel=1e-12, abs=1e-15)
    assert "update 5 of the checkpoint's plan is update 10 of the current plan" in notes["changing"]
    # the same global batch by accumulation: the schedule and the weights continue as if never interrupted
    fixed, uninterrupted = lr_rows(tmp_path, "fixed", 0), lr_rows(two, "uninterrupted", 0)
    assert [row["lr"] for row in fixed] == [row["lr"] for row in uninterrupted][5:]
    expected = torch.load(two / "uninterrupted.pt", weights_only=True)
    for name, value in torch.load(tmp_path / "fixed.pt", weights_only=True).items():
        torch.testing.assert_close(value, expected[name], rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.multiprocess
def test_a_batch_ramp_on_two_processes_takes_each_stage_batch_at_its_lr(two_processes):
    """``--batch-ramp 8@0,16@1,32@2`` on 2 processes of 2 samples per micro-batch: every update takes its stage's
    batch (the two processes' samples add up to it) at LEGW's LR for that batch."""
    folder, _ = two_processes
    expected = ramp_loop_expected()
    rows = [lr_rows(folder, "ramp", rank) for rank in (0, 1)]
    assert [row["update"] for row in rows[0]] == list(range(len(expected))) == [row["update"] for row in rows[1]]
    assert [row["batch"] for row in rows[0]] == [batch for batch, _ in expected]
    assert [a["samples"] + b["samples"] for a, b in zip(*rows, strict=True)] == [batch for batch, _ in expected]
    for rank_rows in rows:
        assert [row["lr"] for row in rank_rows] == pytest.approx([lr for _, lr in expected], rel=1e-12, abs=1e-15)


@pytest.mark.multiprocess
def test_a_two_process_ramp_resumed_in_one_process_derives_each_stage_s_accumulation_again(
    two_processes, repo, tmp_path, fresh_accelerate_state, recwarn
):
    """The ramp's state saved by 2 processes after 10 updates (inside the second stage), loaded by one: every stage
    now accumulates twice the micro-batches, each update takes its stage's batch at its LR, and the run ends where
    the uninterrupted 2-process run ended (up to the order of the sums)."""
    two, _ = two_processes
    example = load_example(repo)
    outputs = ["--lr-log", tmp_path / "resumed", "--parameters-out", tmp_path / "resumed.pt"]
    example.main(
        [*RAMP_LOOP.split(), "--optimizer", "lamb", "--resume-from", str(two / "ramp-state"), *map(str, outputs)]
    )
    expected = ramp_loop_expected()
    rows = lr_rows(tmp_path, "resumed", 0)
    assert [row["update"] for row in rows] == list(range(10, len(expected)))
    assert {row["processes"] for row in rows} == {1}
    assert [row["samples"] for row in rows] == [batch for batch, _ in expected[10:]]
    assert [row["lr"] for row in rows] == pytest.approx([lr for _, lr in expected[10:]], rel=1e-12, abs=1e-15)
    assert not [w for w in recwarn if "plan changed" in str(w.message)]  # the same updates: nothing to convert
    whole = torch.load(two / "ramp.pt", weights_only=True)
    for name, value in torch.load(tmp_path / "resumed.pt", weights_only=True).items():
        torch.testing.assert_close(value, whole[name], rtol=1e-5, atol=1e-6, msg=name)


def test_a_scheduled_ramp_resumed_mid_ramp_ends_bit_identical(repo, tmp_path, fresh_accelerate_state):
    """The example's shuffled loop, stopped after 10 updates (inside the second stage) with ``save_state`` and
    resumed with ``load_state``, ends with the uninterrupted run's weights, bit for bit."""
    example = load_example(repo)
    loop = [*RAMP_LOOP.replace("--per-device-batch-size 2", "--per-device-batch-size 4").split(), "--optimizer", "lamb"]
    runs = (
        ["--parameters-out", tmp_path / "whole.pt"],
        ["--stop-after", "10", "--output-dir", tmp_path / "stopped"],
        ["--resume-from", tmp_path / "stopped", "--parameters-out", tmp_path / "resumed.pt"],
    )
    for flags in runs:
        AcceleratorState._reset_state(True)
        example.main([*loop, *map(str, flags)])
    whole, resumed = (torch.load(tmp_path / name, weights_only=True) for name in ("whole.pt", "resumed.pt"))
    assert whole.keys() == resumed.keys()
    assert all(torch.equal(whole[key], resumed[key]) for key in whole)


# The automatic batch ramp in one process (the last test reads its two-process run).

AUTO = {"max_batch": 64, "start_batch": 4, "patience": 5}


def noisy_regression_config() -> LegwConfig:
    return LegwConfig(base_batch_size=4, base_lr=0.02, base_warmup_epochs=0.1, decay=Polynomial(power=2.0))


def noisy_regression(accelerator, dataset_size=256, per_device=2, scaler=None):
    """Targets that are mostly noise: the gradient noise scale is in the hundreds of samples from the start."""
    torch.manual_seed(0)
    x = torch.randn(dataset_size, 6)
    data = TensorDataset(x, 0.1 * x.sum(-1) + 3.0 * torch.randn(dataset_size))
    model = torch.nn.Linear(6, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.9)
    if scaler is not None:
        accelerator.scaler = scaler  # accelerate makes none on CPU; a GPU fp16 run has this one
    model, optimizer, loader = accelerator.prepare(model, optimizer, DataLoader(data, batch_size=per_device))
    return model, optimizer, loader, noisy_regression_config()


def ramped_run(batch_ramp, *, stop=None, resume=None, save=None, overflows=frozenset()):
    """A ramped loop on the noisy regression: each update's batch, LR, samples and the estimates after it. The
    updates ``overflows`` overflow (an infinite loss) under fp16 loss scaling, whose GradScaler skips them."""
    AcceleratorState._reset_state(True)
    accelerator = Accelerator(cpu=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10) if overflows else None
    model, optimizer, loader, config = noisy_regression(accelerator, scaler=scaler)
    scheduler = create_legw_scheduler(accelerator, optimizer, config, loader, num_epochs=3, batch_ramp=batch_ramp)
    if resume:
        accelerator.load_state(resume)
    rows = []
    for update in ramped_updates(accelerator, scheduler, loader, model):
        if update.index == stop:
            break
        samples = 0
        for x, y in update.micro_batches():
            loss = torch.nn.functional.mse_loss(model(x).squeeze(-1), y)
            update.backward(loss * math.inf if update.index in overflows else loss)
            samples += len(y)
        row = {"update": update.index, "batch": update.batch_size, "lr": optimizer.param_groups[0]["lr"]}
        trace, signal = (getattr(getattr(scheduler, "noise", None), name, None) for name in ("trace", "signal"))
        rows.append(row | {"samples": samples, "trace": trace, "signal": signal})
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    if save:
        accelerator.save_state(save)
    return scheduler, rows, [p.detach().clone() for p in model.parameters()]


def test_an_automatic_ramp_doubles_by_the_noise_scale_and_replays_as_a_scheduled_ramp(tmp_path, caplog):
    log = tmp_path / "decisions.jsonl"
    with caplog.at_level(logging.INFO, logger="legw_hf.integrations.accelerate"):
        scheduler, rows, _ = ramped_run(AutoRamp(**AUTO, log=log))
    decisions = scheduler.decisions
    assert len(decisions) >= 2 and read_decisions(log) == decisions
    assert sum("AutoRamp: batch" in record.getMessage() for record in caplog.records) == len(decisions)
    for decision in decisions:  # the first update at the new batch, from the progress the run had reached
        assert rows[decision.update]["batch"] == decision.new_batch == 2 * rows[decision.update - 1]["batch"]
        assert decision.samples == sum(row["samples"] for row in rows[: decision.update])
        assert decision.epoch == decision.samples / 256 and decision.b_simple >= 3 * decision.old_batch * (1 - 1e-9)
    assert [row["samples"] for row in rows] == [row["batch"] for row in rows]
    assert [row["update"] for row in rows] == list(range(scheduler.plan.total_steps))

    # the same estimates make the same decisions
    replayed, samples = RampController(AutoRamp(**AUTO), 4, dataset_size=256, epochs=3), 0
    for row in rows:
        samples += row["batch"]
        replayed.observe(update=row["update"], samples=samples, trace=row["trace"], signal=row["signal"])
    assert replayed.decisions == decisions

    # the decisions as a scheduled ramp: every update at the same batch and LR, the same plan
    text = ramp_from_decisions(read_decisions(log))
    assert text == scheduler.plan.ramp.to_text()
    scheduled, scheduled_rows, _ = ramped_run(text)
    assert [(row["batch"], row["lr"]) for row in scheduled_rows] == [(row["batch"], row["lr"]) for row in rows]
    assert scheduled.plan == scheduler.plan
    stages = [(stage.batch_size, stage.start) for stage in BatchRamp.parse(text).stages]
    config = noisy_regression_config()
    expected = written_out(
        stages, dataset_size=256, epochs=3, base_batch=4, base_lr=0.02, base_warmup_epochs=0.1, power=2
    )
    assert [row["batch"] for row in rows] == [batch for batch, _ in expected]
    assert [row["lr"] for row in rows] == pytest.approx([lr for _, lr in expected], rel=1e-12, abs=1e-15)
    assert ramped_plan(config, text, dataset_size=256, epochs=3, micro_step_samples=2) == scheduler.plan


def test_an_automatic_ramp_resumed_from_save_state_continues_exactly(tmp_path):
    whole, whole_rows, whole_weights = ramped_run(AutoRamp(**AUTO))
    stop = whole.decisions[1].update + 2  # inside the third stage
    state = tmp_path / "state"
    stopped, _, _ = ramped_run(AutoRamp(**AUTO), stop=stop, save=state)
    assert stopped.decisions == whole.decisions[:2]
    resumed, rows, weights = ramped_run(AutoRamp(**AUTO), resume=state)
    assert rows == whole_rows[stop:]
    assert resumed.decisions == whole.decisions and resumed.plan == whole.plan
    assert all(torch.equal(a, b) for a, b in zip(weights, whole_weights, strict=True))


def decisions_from_rows(rows, skipped=()):
    """A RampController's decisions from the estimates after each update of ``rows``, shown ``skipped`` or not."""
    controller, samples = RampController(AutoRamp(**AUTO), 4, dataset_size=256, epochs=3), 0
    for row in rows:
        samples += row["batch"]
        if row["update"] not in skipped:
            controller.observe(update=row["update"], samples=samples, trace=row["trace"], signal=row["signal"])
    return controller.decisions


def noisy_expected(text):
    """(batch, LR) of every update of the scheduled ramp ``text`` on the noisy regression, written out."""
    stages = [(stage.batch_size, stage.start) for stage in BatchRamp.parse(text).stages]
    return written_out(stages, dataset_size=256, epochs=3, base_batch=4, base_lr=0.02, base_warmup_epochs=0.1, power=2)


def test_an_fp16_skipped_update_of_a_scheduled_ramp_keeps_plan_and_data_in_step():
    """Updates 2, 64 (the first at batch 8) and 100 overflow: the GradScaler skips them, but they took their
    micro-batches, so the plan moves on with the data: each update takes its stage batch and its own LR."""
    scheduler, rows, weights = ramped_run("4@0,8@1,16@2", overflows={2, 64, 100})
    assert scheduler.accelerator.scaler.get_scale() == 2.0**10 / 2**3
    want = noisy_expected("4@0,8@1,16@2")
    assert len(want) == 64 + 32 + 16 == scheduler.updates == len(rows)
    assert [row["samples"] for row in rows] == [batch for batch, _ in want] == [row["batch"] for row in rows]
    assert [row["lr"] for row in rows] == pytest.approx([lr for _, lr in want], rel=1e-12, abs=1e-15)
    assert all(torch.isfinite(w).all() for w in weights)


def test_an_automatic_ramp_shows_its_controller_no_fp16_skipped_update():
    """Updates 1 and 9 overflow: the plan moves on with their samples, but the decision rule is not shown them (not
    their statistics, which were not recorded, nor their count toward the patience)."""
    scheduler, rows, _ = ramped_run(AutoRamp(**AUTO), overflows={1, 9})
    decisions = scheduler.decisions
    assert decisions and decisions_from_rows(rows, skipped={1, 9}) == decisions != decisions_from_rows(rows)
    assert decisions[0].update == AUTO["patience"] + 1  # 5 applied updates at the start batch: 0 and 2-5
    want = noisy_expected(ramp_from_decisions(decisions))
    assert scheduler.updates == len(rows) == len(want)
    assert [row["samples"] for row in rows] == [batch for batch, _ in want] == [row["batch"] for row in rows]
    assert [row["lr"] for row in rows] == pytest.approx([lr for _, lr in want], rel=1e-12, abs=1e-15)


@pytest.mark.parametrize(
    ("batch_ramp", "accumulation", "field", "words"),
    [
        (AutoRamp(max_batch=2, start_batch=4), 1, "max_batch", "must be >= the start batch (4)"),
        (AutoRamp(max_batch=48, start_batch=4), 1, "max_batch", "the nearest: 32, 64"),
        (AutoRamp(max_batch=64), 1, "start_batch", "at least 2 gradient estimates per update"),
        (
            AutoRamp(max_batch=64, start_batch=5),
            1,
            "start_batch",
            "per-device batch x processes = 2; the nearest: 4, 6",
        ),
        (AutoRamp(max_batch=64, start_batch=4), 2, "gradient_accumulation_steps", "must be 1 with batch_ramp"),
        ("auto", 1, "batch_ramp", "AutoRamp(max_batch="),
    ],
)
def test_an_automatic_ramp_with_bad_settings_is_refused_before_any_work(batch_ramp, accumulation, field, words):
    AcceleratorState._reset_state(True)
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=accumulation)
    _, optimizer, loader, config = noisy_regression(accelerator)
    with pytest.raises(SettingError) as caught:
        create_legw_scheduler(accelerator, optimizer, config, loader, num_epochs=3, batch_ramp=batch_ramp)
    assert caught.value.field == field and words in str(caught.value)
    AcceleratorState._reset_state(True)


def test_an_automatic_ramp_needs_update_backward(fresh_accelerate_state):
    accelerator = Accelerator(cpu=True)
    model, optimizer, loader, config = noisy_regression(accelerator)
    scheduler = create_legw_scheduler(accelerator, optimizer, config, loader, num_epochs=3, batch_ramp=AutoRamp(**AUTO))
    update = next(ramped_updates(accelerator, scheduler, loader, model))
    for x, y in update.micro_batches():
        accelerator.backward(torch.nn.functional.mse_loss(model(x).squeeze(-1), y) / update.accumulation)
    with pytest.raises(RuntimeError, match="call update.backward"):
        scheduler.step()


@pytest.mark.multiprocess
def test_an_automatic_ramp_on_two_processes_decides_alike_on_every_rank_and_replays(two_processes):
    """``--batch-ramp auto`` on 2 processes of 2 samples per micro-batch (2 gradient estimates per update at the start
    batch of 4) on targets with much noise: the batch doubles, every rank takes each update at the batch and LR of the
    scheduled ramp written from the decision log, and the ranks' estimates agree."""
    folder, outputs = two_processes
    decisions = read_decisions(folder / "decisions.jsonl")
    assert decisions and decisions[0].old_batch == 4
    text = ramp_from_decisions(decisions)
    stdout, _ = outputs["auto_ramp"]
    assert f"decided batch ramp: {text}" in stdout
    stages = [(stage.batch_size, stage.start) for stage in BatchRamp.parse(text).stages]
    expected = written_out(
        stages, dataset_size=128, epochs=3, base_batch=4, base_lr=0.05, base_warmup_epochs=0.25, power=2.0
    )
    rows = [lr_rows(folder, "auto_ramp", rank) for rank in (0, 1)]
    assert [row["batch"] for row in rows[0]] == [batch for batch, _ in expected] == [row["batch"] for row in rows[1]]
    assert [a["samples"] + b["samples"] for a, b in zip(*rows, strict=True)] == [batch for batch, _ in expected]
    for rank_rows in rows:
        assert [row["lr"] for row in rank_rows] == pytest.approx([lr for _, lr in expected], rel=1e-12, abs=1e-15)
    assert [(row["trace"], row["signal"]) for row in rows[0]] == [(row["trace"], row["signal"]) for row in rows[1]]
    replayed, samples = RampController(AutoRamp(max_batch=32, patience=4), 4, dataset_size=128, epochs=3), 0
    for row in rows[0]:
        samples += row["batch"]
        replayed.observe(update=row["update"], samples=samples, trace=row["trace"], signal=row["signal"])
    assert replayed.decisions == decisions


def test_a_prepared_dataloader_that_drops_its_last_batch_is_read_as_dropping_it(fresh_accelerate_state):
    # accelerate keeps the user's drop_last in the prepared loader's _drop_last; its own drop_last reads False
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(11, 6), torch.randn(11))
    model = torch.nn.Linear(6, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    config = LegwConfig(base_batch_size=2, base_lr=0.02, base_warmup_epochs=0.2)
    model, optimizer, dropping = accelerator.prepare(model, optimizer, DataLoader(data, batch_size=2, drop_last=True))
    keeping = accelerator.prepare(DataLoader(data, batch_size=2))
    plain = create_legw_scheduler(accelerator, optimizer, config, dropping, num_epochs=1)
    assert plain.plan.drop_last is True
    ramped = create_legw_scheduler(accelerator, optimizer, config, dropping, num_epochs=2, batch_ramp="2@0,4@1")
    # 11 examples, the last one dropped: 5 updates of 2, then 10 samples at 4 (3 updates, the last one past the end)
    assert ramped.plan.dataset_size == 10
    assert [(s.batch_size, s.updates) for s in ramped.plan.stages] == [(2, 5), (4, 3)]
    with pytest.raises(SettingError, match="train_dataloader must give whole micro-batches"):
        create_legw_scheduler(accelerator, optimizer, config, keeping, num_epochs=2, batch_ramp="2@0,4@1")
